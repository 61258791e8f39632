"""``kvpn clean`` and ``kvpn recover SVC``: read the cluster, plan (pure), apply or print.

The decisions live in :mod:`kvpn.cluster.cleanup`; this module only gathers its inputs (the
Services, kvpn's pods, the Deployments, the ``kvpn connect`` sessions alive on this
machine) and applies the plan with :mod:`kvpn.cluster.intercept_api`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from kvpn.cli.errors import UserError
from kvpn.cluster.cleanup import CleanupPlan, RecoverRefused, plan_clean, plan_recover
from kvpn.cluster.intercept_api import InterceptApiError, KubeClients, apply_cleanup
from kvpn.cluster.locks import Identity, read_lock
from kvpn.cluster.permissions import cleanup_permissions, require_permissions
from kvpn.cluster.shadow_pod import MANAGED_BY_LABEL
from kvpn.connect_session import STATE_DIR, ConnectOptions, load_cluster
from kvpn.intercept_session import InterceptOptions, now_utc
from kvpn.journal_replay import clean_journals, retire_sessions
from kvpn.routes.session_file import pid_alive, read_session

Out = Callable[[str], None]
KVPN_PODS = f"{MANAGED_BY_LABEL}=kvpn"


def live_connect_sessions(state_dir: Path = STATE_DIR) -> frozenset[str] | None:
    """Session ids of the ``kvpn connect`` processes still running on this machine; None
    when the session folder cannot be read (e.g. connect ran as root, clean does not)."""
    directory = state_dir / "sessions"
    if not directory.exists():
        return frozenset()
    if not os.access(directory, os.R_OK | os.X_OK):
        return None
    alive = set()
    for path in sorted(directory.glob("*.json")):
        session = read_session(path)
        if session is not None and pid_alive(session.pid):
            alive.add(session.session_id)
    return frozenset(alive)


def _kube(options: InterceptOptions) -> tuple[KubeClients, str]:
    configuration, namespace, _ = load_cluster(
        ConnectOptions(
            kubeconfig=options.kubeconfig, context=options.context, namespace=options.namespace
        )
    )
    return KubeClients.from_configuration(configuration), namespace


async def _apply(
    kube: KubeClients,
    plan: CleanupPlan,
    out: Out,
    *,
    dry_run: bool,
    ready_timeout: float,
    nothing: str = "nothing to clean",
) -> int:
    if not plan.actions:
        for note in plan.notes:
            out(f"note: {note}")
        out(nothing)
        return 0
    if dry_run:
        for line in plan.describe():
            out(f"would {line}" if not line.startswith("note: ") else line)
        return 0
    await require_permissions(kube.api, cleanup_permissions(plan.actions))
    problems = await apply_cleanup(kube, plan, out, ready_timeout=ready_timeout)
    for note in plan.notes:
        out(f"note: {note}")
    for problem in problems:
        out(f"kvpn: could not clean: {problem}")
    return 1 if problems else 0


async def run_clean(
    options: InterceptOptions, out: Out, *, all_namespaces: bool, dry_run: bool
) -> int:
    # First the journals of this user's dead sessions on this machine (local and cluster
    # changes, exactly as recorded, no heartbeat to wait for); then the cluster scan for
    # what no journal here records (a crashed session on another machine, a lost journal).
    replayed = await clean_journals(None, out, dry_run=dry_run)
    for problem in replayed.problems:
        out(f"kvpn: could not undo: {problem}")
    kube, namespace = _kube(options)
    scope = None if all_namespaces else namespace
    try:
        await require_permissions(kube.api, (), namespace=scope)  # "namespace X not found"
        services = await kube.list_services(scope)
        pods = await kube.list_pods(scope, KVPN_PODS)
        deployments = await kube.list_deployments(scope)
        plan = plan_clean(
            services,
            pods,
            deployments,
            me=Identity.of_this_process(),
            now=now_utc(),
            live_connect_sessions=live_connect_sessions(),
        )
        code = await _apply(
            kube,
            plan,
            out,
            dry_run=dry_run,
            ready_timeout=options.ready_timeout,
            nothing="nothing else to clean" if replayed.steps else "nothing to clean",
        )
        return 1 if replayed.problems else code
    except InterceptApiError as exc:
        raise UserError(str(exc)) from None
    finally:
        kube.close()


async def run_recover(options: InterceptOptions, name: str, out: Out, *, dry_run: bool) -> int:
    kube, namespace = _kube(options)
    try:
        await require_permissions(kube.api, (), namespace=namespace)  # "namespace X not found"
        service = await kube.read_service(namespace, name)
        plan = plan_recover(
            service,
            await kube.list_deployments(namespace),
            await kube.list_pods(namespace, KVPN_PODS),
            namespace=namespace,
            name=name,
            me=Identity.of_this_process(),
            now=now_utc(),
        )
        code = await _apply(kube, plan, out, dry_run=dry_run, ready_timeout=options.ready_timeout)
        _, lock = read_lock((service or {}).get("metadata", {}).get("annotations"))
        if code == 0 and not dry_run and lock is not None:
            await retire_sessions(None, {lock.session}, out)  # its journal here, if any
        return code
    except RecoverRefused as exc:
        raise UserError(str(exc)) from None
    except InterceptApiError as exc:
        raise UserError(str(exc)) from None
    finally:
        kube.close()
