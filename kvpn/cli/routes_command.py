"""`kvpn routes`: the route plan (before connecting) or the live routes, and `--explain`.

Thin: parse options, build the plan (or read the live session), render. Every problem the
user can fix becomes a one-line :class:`UserError`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from ipaddress import IPv4Network
from pathlib import Path

import typer

from kvpn.cli.errors import UserError
from kvpn.routes.discovery import DiscoveryError, discover
from kvpn.routes.explain import explain as explain_address
from kvpn.routes.explain import resolve_target
from kvpn.routes.kubeconfig import KubeconfigError, KubeTarget, load_kube_target, resolve_host
from kvpn.routes.local_routes import read_local_routes
from kvpn.routes.plan import DEFAULT_TUN, ConflictPolicy, LocalRoute, plan_routes
from kvpn.routes.prefixes import parse_ipv4_cidr
from kvpn.routes.render import RoutesView, render_text, view_json
from kvpn.routes.session_file import SESSIONS_DIR, find_live_session

OUTPUTS = ("text", "json")
TUNNEL_PEER_NOTE = (
    "with --transport direct, the shadow pod's address (the SSH peer) is also excluded "
    "when connect starts"
)


def _parse_cidrs(option: str, values: Sequence[str]) -> list[IPv4Network]:
    try:
        return [parse_ipv4_cidr(v) for v in values]
    except ValueError as exc:
        raise UserError(f"{option}: {exc}") from None


def _read_routes() -> list[LocalRoute]:
    try:
        return read_local_routes(skip_dev=None)
    except OSError as exc:
        raise UserError(str(exc)) from None


def _plan_view(
    target: KubeTarget,
    namespace: str | None,
    include: Sequence[str],
    exclude: Sequence[str],
    policy: ConflictPolicy,
    all_routes: Sequence[LocalRoute],
) -> RoutesView:
    include_cidrs = _parse_cidrs("--include-cidr", include)
    exclude_cidrs = _parse_cidrs("--exclude-cidr", exclude)
    try:
        addresses = list(resolve_host(target.host, target.port))
        if target.proxy is not None:
            addresses += [a for a in resolve_host(*target.proxy) if a not in addresses]
    except KubeconfigError as exc:
        raise UserError(str(exc)) from None

    from kubernetes import client

    target.configuration.retries = 1
    api = client.ApiClient(target.configuration)
    ns = namespace or target.namespace
    try:
        cluster = discover(client.CoreV1Api(api), ns)
    except DiscoveryError as exc:
        raise UserError(f"{target.server}: {exc}") from None
    finally:
        api.close()  # type: ignore[no-untyped-call]
    plan = plan_routes(
        cluster,
        include_cidrs=include_cidrs,
        exclude_cidrs=exclude_cidrs,
        apiserver_addresses=addresses,
        tunnel_peer=None,
        local_routes=[r for r in all_routes if r.dev != DEFAULT_TUN],
        on_conflict=policy,
        apiserver_name=target.server,
        notes=[TUNNEL_PEER_NOTE],
    )
    return RoutesView(plan, target.context, ns, live=False)


def run_routes(
    *,
    kubeconfig: str | None,
    context: str | None,
    namespace: str | None,
    include_cidrs: Sequence[str] = (),
    exclude_cidrs: Sequence[str] = (),
    on_conflict: str = "keep",
    explain: str | None = None,
    output: str = "text",
    sessions_dir: Path = SESSIONS_DIR,
) -> int:
    """Print the plan or the live routes (or explain one target). 0, or 1 if the plan is
    refused (``--on-conflict=fail`` met a conflict)."""
    if output not in OUTPUTS:
        raise UserError(f"--output must be one of {', '.join(OUTPUTS)} (got {output!r})")
    try:
        policy = ConflictPolicy(on_conflict)
    except ValueError:
        choices = ", ".join(p.value for p in ConflictPolicy)
        raise UserError(f"--on-conflict must be one of {choices} (got {on_conflict!r})") from None
    # Validate every option before talking to anything.
    _parse_cidrs("--include-cidr", include_cidrs)
    _parse_cidrs("--exclude-cidr", exclude_cidrs)
    target_address = None
    if explain is not None:
        try:
            target_address = resolve_target(explain)
        except ValueError as exc:
            raise UserError(f"--explain: {exc}") from None
    try:
        target = load_kube_target(kubeconfig, context)
    except KubeconfigError as exc:
        raise UserError(str(exc)) from None

    all_routes = _read_routes()
    session = find_live_session(target.context, sessions_dir)
    if session is not None:
        tun = session.routes.tun
        on_tun = {r.dst for r in all_routes if r.dev == tun}
        ignored = [
            name
            for name, given in (
                ("--include-cidr", include_cidrs),
                ("--exclude-cidr", exclude_cidrs),
                ("--on-conflict", on_conflict != "keep"),
                ("--namespace", namespace),
            )
            if given
        ]
        notes = (
            (f"{', '.join(ignored)} apply to a new plan; this is the live session's",)
            if ignored
            else ()
        )
        view = RoutesView(
            session.routes,
            session.context,
            session.namespace,
            live=True,
            session_id=session.session_id,
            pid=session.pid,
            missing_on_tun=tuple(n for n in session.routes.installed if n not in on_tun),
            notes=notes,
        )
    else:
        view = _plan_view(target, namespace, include_cidrs, exclude_cidrs, policy, all_routes)

    local = [r for r in all_routes if r.dev != view.plan.tun]
    if target_address is not None:
        address, name = target_address
        plan = view.plan
        if view.live:
            # Explain what the kernel has now, not what the session meant to install.
            actual = sorted({r.dst for r in all_routes if r.dev == plan.tun})
            plan = replace(plan, installed=tuple(actual))
        explanation = explain_address(address, plan, local, name=name)
        if output == "json":
            typer.echo(
                json.dumps(
                    {
                        "mode": "live" if view.live else "plan",
                        "context": view.context,
                        **explanation.to_json(),
                    },
                    indent=2,
                )
            )
        else:
            typer.echo(explanation.text)
    elif output == "json":
        typer.echo(json.dumps(view_json(view), indent=2))
    else:
        typer.echo(render_text(view))
    return 1 if view.plan.refused else 0
