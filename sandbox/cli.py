"""``kvpn-sandbox``: start, stop and look at sandbox clusters in network namespaces."""

from __future__ import annotations

import ipaddress
import sys

import typer

from sandbox import lifecycle
from sandbox.config import NODE_LINK_ADDRESS, SandboxConfig

app = typer.Typer(
    name="kvpn-sandbox",
    help="A Kubernetes look-alike in network namespaces, for kvpn's demo and tests.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class _CliError(Exception):
    pass


def _network(value: str, what: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(value, strict=True)
    except ValueError as exc:
        raise _CliError(f"invalid {what} {value!r}: {exc}") from None


def _config(name: str, **kw: object) -> SandboxConfig:
    """For an existing sandbox, the settings it was started with; else defaults plus ``kw``."""
    if not kw:
        saved = lifecycle.saved_config(name)
        if saved is not None:
            return saved
    try:
        return SandboxConfig(name=name, **kw)  # type: ignore[arg-type]
    except ValueError as exc:
        raise _CliError(str(exc)) from None


@app.command()
def up(
    name: str = typer.Option("kvpn", "--name", help="Sandbox name (several may run at once)."),
    pod_cidr: str = typer.Option("10.244.0.0/16", "--pod-cidr", help="Pod CIDR."),
    service_cidr: str = typer.Option("10.96.0.0/12", "--service-cidr", help="Service CIDR."),
    apiserver_address: str = typer.Option(
        str(NODE_LINK_ADDRESS), "--apiserver-address", help="Address of the API server."
    ),
    laptop_routes_pods: bool = typer.Option(
        False,
        "--laptop-routes-pods",
        help="Also route the pod CIDR from the laptop via the node (for benchmarks: direct "
        "access to pods without kvpn). Services stay unreachable.",
    ),
) -> None:
    """Start a sandbox cluster in the background; print KUBECONFIG, LAPTOP_NETNS, NODE_NETNS."""
    try:
        address = ipaddress.IPv4Address(apiserver_address)
    except ValueError:
        raise _CliError(f"invalid --apiserver-address {apiserver_address!r}") from None
    config = _config(
        name,
        pod_cidr=_network(pod_cidr, "--pod-cidr"),
        service_cidr=_network(service_cidr, "--service-cidr"),
        apiserver_address=address,
        laptop_routes_pods=laptop_routes_pods,
    )
    info = lifecycle.start(config)
    typer.echo(info.shell_lines(), nl=False)


@app.command()
def down(name: str = typer.Option("kvpn", "--name", help="Sandbox name.")) -> None:
    """Stop a sandbox and remove every namespace, link, rule, file and process it made."""
    removed = lifecycle.stop(_config(name))
    if removed:
        typer.echo(f"sandbox {name}: removed " + ", ".join(removed))
    else:
        typer.echo(f"sandbox {name}: nothing to remove")


@app.command()
def status(name: str = typer.Option("kvpn", "--name", help="Sandbox name.")) -> None:
    """Say what is running."""
    for line in lifecycle.describe(_config(name)):
        typer.echo(line)


@app.command("get")
def get(
    resource: str = typer.Argument(..., help="pods, services, deployments, endpoints or nodes."),
    name: str = typer.Option("kvpn", "--name", help="Sandbox name."),
    namespace: str = typer.Option("default", "--namespace", "-n", help="Namespace."),
    all_namespaces: bool = typer.Option(False, "--all-namespaces", "-A", help="All namespaces."),
) -> None:
    """List objects kubectl-style, through the official client from the laptop namespace."""
    from kubernetes import config as kube_config

    from sandbox import listing
    from sandbox.inside_netns import inside_netns

    config = _config(name)
    if not lifecycle.is_running(config):
        raise _CliError(f"sandbox {name!r} is not running")
    with inside_netns(config.laptop_netns):
        api_client = kube_config.new_client_from_config(  # type: ignore[no-untyped-call]
            str(config.kubeconfig_path)
        )
        try:
            text = listing.table(api_client, resource, None if all_namespaces else namespace)
        except ValueError as exc:
            raise _CliError(str(exc)) from None
    typer.echo(text)


@app.command("exec")
def exec_(
    pod: str = typer.Argument(..., help="Pod name."),
    command: list[str] = typer.Argument(..., help="Command and arguments (after --)."),  # noqa: B008
    name: str = typer.Option("kvpn", "--name", help="Sandbox name."),
    namespace: str = typer.Option("default", "--namespace", "-n", help="Namespace."),
) -> None:
    """Run a command in a pod through the API server (like kubectl exec), from the laptop."""
    from kubernetes import client
    from kubernetes import config as kube_config
    from kubernetes.client.exceptions import ApiException
    from kubernetes.stream import stream

    from sandbox.inside_netns import inside_netns

    config = _config(name)
    if not lifecycle.is_running(config):
        raise _CliError(f"sandbox {name!r} is not running")
    with inside_netns(config.laptop_netns):
        api_client = kube_config.new_client_from_config(  # type: ignore[no-untyped-call]
            str(config.kubeconfig_path)
        )
        try:
            resp = stream(
                client.CoreV1Api(api_client).connect_get_namespaced_pod_exec,
                pod,
                namespace,
                command=command,
                stdin=False,
                stdout=True,
                stderr=True,
                tty=False,
                _preload_content=False,
            )
        except ApiException as exc:
            raise _CliError(f"exec in {namespace}/{pod}: {exc.reason}") from None
        resp.run_forever(timeout=120)
    sys.stdout.write(resp.read_stdout() or "")
    sys.stderr.write(resp.read_stderr() or "")
    code = resp.returncode or 0
    resp.close()
    raise typer.Exit(code)


def main() -> None:
    try:
        app()
    except (_CliError, lifecycle.SandboxError) as exc:
        typer.echo(f"kvpn-sandbox: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
