"""The ``kvpn`` command line (also installed as ``kubectl-kvpn`` for ``kubectl kvpn ...``).

Commands are thin: parse options, call one library function, render the result. Errors the
user can fix are printed as one line and exit non-zero; tracebacks are for bugs only.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from kvpn.cli.errors import UserError

app = typer.Typer(
    name="kvpn",
    help="A developer VPN for Kubernetes: reach the cluster from your laptop, and route "
    "cluster traffic to your laptop.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

CidrList = Annotated[
    list[str] | None,
    typer.Option("--include-cidr", help="Also route this CIDR through kvpn (repeatable)."),
]
Kubeconfig = Annotated[
    str | None, typer.Option("--kubeconfig", help="Path of the kubeconfig file.")
]
Context = Annotated[str | None, typer.Option("--context", help="Kubeconfig context to use.")]
Namespace = Annotated[
    str | None,
    typer.Option("--namespace", "-n", help="Namespace to work in (default: the context's)."),
]
Heartbeat = Annotated[
    float,
    typer.Option(
        "--heartbeat",
        hidden=True,
        help="Seconds between lock heartbeats; the lock expires after 3 missed ones.",
    ),
]
SkipPortCheck = Annotated[
    bool,
    typer.Option(
        "--skip-port-check",
        help="Do not check that something listens on the LOCAL ports before starting.",
    ),
]
DryRun = Annotated[
    bool, typer.Option("--dry-run", help="Only print what would be done; change nothing.")
]
ExcludeCidrList = Annotated[
    list[str] | None,
    typer.Option("--exclude-cidr", help="Never route this CIDR through kvpn (repeatable)."),
]


@app.command("connect")
def connect(
    kubeconfig: str = typer.Option(None, "--kubeconfig", help="Path of the kubeconfig file."),
    context: str = typer.Option(None, "--context", help="Kubeconfig context to use."),
    namespace: str = typer.Option(
        None, "--namespace", "-n", help="Namespace of the shadow pod (default: the context's)."
    ),
    image: str = typer.Option(None, "--image", help="Shadow pod image."),
    transport: str = typer.Option(
        "portforward", "--transport", help="portforward (through the API server) or direct."
    ),
    offload: bool = typer.Option(
        True, "--offload/--no-offload", help="Use the TUN's TSO/checksum offload if available."
    ),
    dns_mode: str = typer.Option(
        "auto",
        "--dns-mode",
        help="How this machine is pointed at kvpn's resolver for cluster names: "
        "resolved (systemd-resolved: DNS server and domains on the TUN link, no file "
        "edited); resolv.conf (kvpn's nameserver and the pod search list written into "
        "/etc/resolv.conf, the original restored byte for byte); hosts (the cluster's "
        "services as a marked block in /etc/hosts, refreshed every 15 s); macos "
        "(/etc/resolver/ files, macOS only); off (no DNS: IPs only); auto (default: "
        "resolved where it manages /etc/resolv.conf, macos on macOS, else resolv.conf).",
    ),
    cluster_domain: str = typer.Option(
        "cluster.local", "--cluster-domain", help="The cluster's DNS domain."
    ),
    include_cidr: CidrList = None,
    exclude_cidr: ExcludeCidrList = None,
    on_conflict: str = typer.Option(
        "keep",
        "--on-conflict",
        help="A local route overlapping a cluster CIDR: keep it (default), override it with "
        "more specific routes, skip the whole cluster CIDR, or fail.",
    ),
    clean_leftovers: bool | None = typer.Option(
        None,
        "--clean-leftovers/--keep-leftovers",
        help="What crashed kvpn sessions left on this machine (and in the cluster): undo it "
        "first, or leave it (default: ask when run in a terminal, else say so and leave it).",
    ),
) -> None:
    """Connect this machine to the cluster: pod and service IPs and names become reachable.

    Runs in the foreground. Ctrl-C or SIGTERM undoes everything:
    DNS settings, TUN device, routes, shadow pod.
    DNS settings left by a crashed session are restored by the next one; its other
    leftovers are listed, and undone on request (see kvpn clean).
    """
    from kvpn.cli.connect_command import run_connect

    run_connect(
        kubeconfig=kubeconfig,
        context=context,
        namespace=namespace,
        image=image,
        transport=transport,
        offload=offload,
        dns_mode=dns_mode,
        cluster_domain=cluster_domain,
        include_cidrs=tuple(include_cidr or ()),
        exclude_cidrs=tuple(exclude_cidr or ()),
        on_conflict=on_conflict,
        clean_leftovers=clean_leftovers,
    )


# `kvpn up` is the same command as `kvpn connect`.
app.command("up", help="Alias of connect.")(connect)


@app.command("exchange")
def exchange(
    service: str = typer.Argument(..., help="Service (or deployment/NAME) to take over."),
    expose: str = typer.Option(
        ...,
        "--expose",
        help="LOCAL[:REMOTE][,...]: the local port that serves the service's REMOTE port "
        "(a port or targetPort of the service; default: LOCAL).",
    ),
    mode: str = typer.Option(
        "selector",
        "--mode",
        help="selector (default): point the service's selector at kvpn's shadow pod; "
        "scale: the shadow pod takes the workload's labels and the deployment is scaled to 0.",
    ),
    skip_port_check: SkipPortCheck = False,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
    image: str = typer.Option(None, "--image", help="Shadow pod image."),
    heartbeat: Heartbeat = 10.0,
) -> None:
    """Send all of a service's traffic to a local port.

    Runs in the foreground; Ctrl-C or SIGTERM restores the service (selector or replica
    count), and removes the shadow pod. A service held by someone else is refused.
    """
    from kvpn.cli.exchange_command import run_exchange_command
    from kvpn.intercept_session import InterceptOptions

    run_exchange_command(
        InterceptOptions(
            kubeconfig=kubeconfig,
            context=context,
            namespace=namespace,
            image=image,
            heartbeat_seconds=heartbeat,
            skip_port_check=skip_port_check,
        ),
        service,
        expose,
        mode,
    )


@app.command("mesh")
def mesh(
    service: str = typer.Argument(..., help="Service to share with the other developers."),
    expose: str = typer.Option(
        ...,
        "--expose",
        help="LOCAL[:REMOTE][,...]: the local port that serves the marked requests to the "
        "service's REMOTE port (a port or targetPort of the service; default: LOCAL).",
    ),
    version_mark: str = typer.Option(
        None,
        "--version-mark",
        help="KEY:VALUE or VALUE: requests whose header KEY (default: version; "
        "case-insensitive) equals VALUE come to this machine. Default: a random VALUE.",
    ),
    mode: str = typer.Option(
        "auto",
        "--mode",
        help="auto (default): a router pod takes over the service and routes each HTTP "
        "request by the header; manual: only a shadow pod carrying the service's selector "
        "labels plus KEY=VALUE, for your own Istio VirtualService/DestinationRule.",
    ),
    skip_port_check: SkipPortCheck = False,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
    image: str = typer.Option(None, "--image", help="Shadow (and router) pod image."),
    heartbeat: Heartbeat = 10.0,
) -> None:
    """Send only the requests carrying your header to a local port; all others keep going
    to the service's pods. Several developers can mesh one service, each with a mark.

    Runs in the foreground; Ctrl-C or SIGTERM leaves, and the last one to leave restores
    the service. `kvpn clean` / `kvpn recover` restore it after a crash.
    """
    from kvpn.cli.mesh_command import run_mesh_command
    from kvpn.intercept_session import InterceptOptions

    run_mesh_command(
        InterceptOptions(
            kubeconfig=kubeconfig,
            context=context,
            namespace=namespace,
            image=image,
            heartbeat_seconds=heartbeat,
            skip_port_check=skip_port_check,
        ),
        service,
        expose,
        version_mark,
        mode,
    )


@app.command("preview")
def preview(
    name: str = typer.Argument(..., help="Name of the new Service."),
    expose: str = typer.Option(
        ...,
        "--expose",
        help="LOCAL[:REMOTE][,...]: the service port REMOTE (default: LOCAL) reaches the "
        "local port LOCAL.",
    ),
    external: bool = typer.Option(
        False, "--external", help="Make the Service a LoadBalancer (reachable from outside)."
    ),
    skip_port_check: SkipPortCheck = False,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
    image: str = typer.Option(None, "--image", help="Shadow pod image."),
    heartbeat: Heartbeat = 10.0,
) -> None:
    """Publish a local process as a new Service in the cluster (removed on exit)."""
    from kvpn.cli.exchange_command import run_preview_command
    from kvpn.intercept_session import InterceptOptions

    run_preview_command(
        InterceptOptions(
            kubeconfig=kubeconfig,
            context=context,
            namespace=namespace,
            image=image,
            heartbeat_seconds=heartbeat,
            skip_port_check=skip_port_check,
        ),
        name,
        expose,
        external,
    )


@app.command("routes")
def routes(
    kubeconfig: str = typer.Option(None, "--kubeconfig", help="Path of the kubeconfig file."),
    context: str = typer.Option(None, "--context", help="Kubeconfig context to use."),
    namespace: str = typer.Option(
        None, "--namespace", "-n", help="Namespace to discover from (default: the context's)."
    ),
    include_cidr: CidrList = None,
    exclude_cidr: ExcludeCidrList = None,
    on_conflict: str = typer.Option(
        "keep",
        "--on-conflict",
        help="A local route overlapping a cluster CIDR: keep (default), override, skip or fail.",
    ),
    explain: str = typer.Option(
        None, "--explain", help="An IP or a host name: say where it goes and why."
    ),
    output: str = typer.Option("text", "--output", "-o", help="text or json."),
) -> None:
    """Show which addresses go to the cluster and why (the live state while connected)."""
    from kvpn.cli.routes_command import run_routes

    raise typer.Exit(
        run_routes(
            kubeconfig=kubeconfig,
            context=context,
            namespace=namespace,
            include_cidrs=include_cidr or [],
            exclude_cidrs=exclude_cidr or [],
            on_conflict=on_conflict,
            explain=explain,
            output=output,
        )
    )


@app.command("status")
def status(
    output: str = typer.Option("text", "--output", "-o", help="text or json."),
    state_dir: str = typer.Option("/run/kvpn", "--state-dir", hidden=True),
) -> None:
    """Show kvpn sessions on this machine: connected, reconnecting, degraded, unresponsive
    or dead; routes, DNS mode, flows and bytes, the shadow pod."""
    from pathlib import Path

    from kvpn.cli.status_command import run_status

    raise typer.Exit(run_status(output=output, state_dir=Path(state_dir)))


@app.command("clean")
def clean(
    dry_run: DryRun = False,
    all_namespaces: bool = typer.Option(
        False, "--all-namespaces", "-A", help="Look in every namespace, not just one."
    ),
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
) -> None:
    """Undo what your dead kvpn sessions left, on this machine and in the cluster.

    First replays the change journals of your sessions that died on this machine (TUN,
    routes, DNS, session files, shadow pods, services, replica counts, locks), newest
    first; then restores the services you exchanged whose heartbeat expired (selector,
    replicas), and deletes your dead sessions' shadow pods and preview services. Live
    sessions, and other users' sessions, are never touched.
    """
    from kvpn.cli.exchange_command import run_clean_command
    from kvpn.intercept_session import InterceptOptions

    run_clean_command(
        InterceptOptions(kubeconfig=kubeconfig, context=context, namespace=namespace),
        all_namespaces=all_namespaces,
        dry_run=dry_run,
    )


@app.command("recover")
def recover(
    service: str = typer.Argument(..., help="The service to restore."),
    dry_run: DryRun = False,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
) -> None:
    """Restore one service changed by a dead kvpn session (anyone's; never a live one)."""
    from kvpn.cli.exchange_command import run_recover_command
    from kvpn.intercept_session import InterceptOptions

    run_recover_command(
        InterceptOptions(kubeconfig=kubeconfig, context=context, namespace=namespace),
        service,
        dry_run=dry_run,
    )


def main() -> None:
    # Run as a kubectl plugin (kubectl finds `kubectl-kvpn` on PATH), usage says `kubectl kvpn`.
    invoked_as = os.path.basename(sys.argv[0]) if sys.argv else "kvpn"
    prog_name = "kubectl kvpn" if invoked_as.startswith("kubectl-") else "kvpn"
    from kvpn.cli.one_line import run_one_line

    try:
        sys.exit(run_one_line(app, prog_name))  # usage mistakes: one line, not a box
    except UserError as exc:
        typer.echo(f"kvpn: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
