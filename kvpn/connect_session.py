"""One ``kvpn connect`` session: shadow pod, SSH tunnel, data plane, DNS, and their undo.

The steps run in order and each one that changes something registers its undo first, so a
failure at any step, Ctrl-C or SIGTERM removes exactly what was made, newest first: the
system's DNS configuration, the resolver, the TUN device and its routes, the tunnel, the
shadow pod, the session file.

DNS (issue 4, :mod:`kvpn.dns`): a DNS change left by a crashed session is undone before
anything else (:func:`kvpn.dns.session.recover_leftover_dns`). Once the data plane is up, the
resolver listens on the TUN address, port 53. Its cluster queries are plain sockets to the
kube-dns ClusterIP: that address is in the service CIDR, already routed into the TUN, so they
take the same path as any program's (the data plane's UDP flows and its TCP NAT), with no
second relay to keep in step. Names that are not the cluster's go straight to the laptop's
original name servers. The OS is then pointed at the resolver (``--dns-mode``).

Reconnect and status (issue 9): once connected, :class:`kvpn.link_supervisor.LinkSupervisor`
watches the tunnel (SSH keepalives every 2 s, 3 unanswered -> dead) and reconnects with
capped exponential backoff through :class:`kvpn.shadow_link.ShadowLink`, which recreates the
shadow pod from the same plan and key when it is gone. The TUN, routes and DNS stay in place
meanwhile (:meth:`kvpn.dataplane.DataPlane.tunnel_lost` / ``replace_tunnel``). The session
rewrites its status file ``<state>/sessions/<id>.status.json`` every 2 s and on each state
change (:mod:`kvpn.session_status`, read by ``kvpn status``). The state directory is 0700 and
every file in it 0600; the session's private key exists only in this process's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import ipaddress
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kvpn.cli.errors import UserError
from kvpn.cluster.permissions import connect_permissions, require_permissions
from kvpn.cluster.pod_heartbeat import PodHeartbeat
from kvpn.cluster.shadow_pod import (
    DEFAULT_SHADOW_IMAGE,
    ShadowPodError,
    ShadowPodPlan,
    ShadowPodProgress,
    create_shadow_pod,
    delete_shadow_pod,
    wait_shadow_ready,
)
from kvpn.dataplane import DataPlane, DataPlaneConfig
from kvpn.dns.actions import UpstreamServer
from kvpn.dns.exchange import tcp_exchange, udp_exchange
from kvpn.dns.os_config import (
    DNS_MODE_CHOICES,
    DnsConfigError,
    DnsMode,
    apply_dns_plan,
    choose_dns_mode,
    plan_dns,
    read_original_resolv_conf,
)
from kvpn.dns.server import DnsServer, start_dns_server
from kvpn.dns.session import (
    ClusterNamesRefresh,
    DnsOwner,
    DnsSetupError,
    DnsStatus,
    LeftoverKind,
    claim_dns,
    find_cluster_dns,
    list_namespaces,
    list_service_entries,
    machine_dns_dir,
    recover_leftover_dns,
    restore_machine_dns,
)
from kvpn.journal_replay import (
    cluster_ref,
    offer_leftover_cleanup,
    open_session_journal,
    undo_delete_pod,
    undo_delete_tun,
    undo_remove_file,
    undo_restore_dns,
)
from kvpn.link_supervisor import LinkConfig, LinkSupervisor
from kvpn.routes.discovery import ClusterCidrs, discover
from kvpn.routes.local_routes import read_local_routes_async
from kvpn.routes.plan import ConflictPolicy, RoutePlan, plan_routes
from kvpn.routes.prefixes import parse_ipv4_cidr
from kvpn.routes.session_file import write_session
from kvpn.session_status import (
    ensure_private_dir,
    live_status,
    status_path,
    summarize_counters,
    write_status,
)
from kvpn.shadow_link import ShadowLink
from kvpn.tunnel.client import ShadowTunnel
from kvpn.tunnel.errors import TunnelError
from kvpn.tunnel.keys import new_session_key, public_key_text
from kvpn.tunnel.transport import DirectTransport, PortForwardTransport, Transport
from kvpn.undo_stack import UndoStack

log = logging.getLogger("kvpn.connect")

STATE_DIR = Path("/run/kvpn")
TRANSPORTS = ("portforward", "direct")
CAP_NET_ADMIN = 12
DNS_OFF = "off"
CONNECT_DNS_MODES = (*DNS_MODE_CHOICES, DNS_OFF)
DNS_PORT = 53
CLUSTER_QUERY_TIMEOUT = 2.0


@dataclass(frozen=True)
class ConnectOptions:
    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None
    image: str | None = None
    transport: str = "portforward"
    offload: bool = True
    tun_name: str = "kvpn0"
    state_dir: Path = STATE_DIR
    dns_mode: str = "auto"  # one of CONNECT_DNS_MODES
    cluster_domain: str = "cluster.local"
    include_cidrs: tuple[str, ...] = ()
    exclude_cidrs: tuple[str, ...] = ()
    on_conflict: str = "keep"
    journal_dir: Path | None = None  # None: kvpn.change_journal.default_journal_dir()
    clean_leftovers: bool | None = None  # None: ask when stdin is a terminal, else tell


def has_net_admin() -> bool:
    """True when this process may create TUN devices and change routes."""
    if os.geteuid() == 0:
        return True
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return False


def load_cluster(options: ConnectOptions) -> tuple[Any, str, str]:
    """The client configuration, the namespace and the context name from the kubeconfig.

    The namespace defaults to the context's own namespace, then ``default``.
    """
    import yaml
    from kubernetes import client
    from kubernetes import config as kube_config
    from kubernetes.config.config_exception import ConfigException

    path = options.kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    path = os.path.expanduser(path.split(os.pathsep)[0])
    if not os.path.exists(path):
        raise UserError(f"kubeconfig {path} not found (use --kubeconfig or KUBECONFIG)")
    try:
        contexts, active = kube_config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
            config_file=path
        )
        chosen = active
        if options.context is not None:
            chosen = next((c for c in contexts if c["name"] == options.context), None)
            if chosen is None:
                names = ", ".join(c["name"] for c in contexts) or "none"
                raise UserError(f"context {options.context!r} not in {path} (have: {names})")
        configuration = client.Configuration()
        kube_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=path, context=chosen["name"], client_configuration=configuration
        )
        namespace = options.namespace or chosen["context"].get("namespace") or "default"
    except (ConfigException, yaml.YAMLError, OSError, ValueError, TypeError, KeyError,
            AttributeError) as exc:  # fmt: skip
        # not YAML, not a kubeconfig's shape, unreadable: one line, never a traceback
        detail = " ".join(str(exc).split())
        detail = detail if len(detail) <= 200 else detail[:197] + "..."
        raise UserError(f"cannot use kubeconfig {path}: {detail or type(exc).__name__}") from None
    return configuration, namespace, chosen["name"]


def apiserver_addresses(configuration: Any) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses of the API server, which must never be routed into the TUN."""
    host = urlsplit(str(configuration.host)).hostname or ""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UserError(f"cannot resolve the API server {host!r}: {exc.strerror}") from None
    return sorted({ipaddress.IPv4Address(info[4][0]) for info in infos})


async def plan_session_routes(
    options: ConnectOptions,
    cidrs: ClusterCidrs,
    apiserver: list[ipaddress.IPv4Address],
    apiserver_name: str,
    tunnel_peer: ipaddress.IPv4Address | None,
) -> RoutePlan:
    """The routes to install, from the cluster's CIDRs, the user's options and local routes."""
    plan = plan_routes(
        cidrs,
        include_cidrs=[_cidr(c, "--include-cidr") for c in options.include_cidrs],
        exclude_cidrs=[_cidr(c, "--exclude-cidr") for c in options.exclude_cidrs],
        apiserver_addresses=apiserver,
        tunnel_peer=tunnel_peer,
        local_routes=await read_local_routes_async(skip_dev=options.tun_name),
        on_conflict=options.on_conflict,
        apiserver_name=apiserver_name,
        tun=options.tun_name,
        notes=cidrs.notes,
    )
    if plan.refused:
        conflicts = "; ".join(c.describe() for c in plan.conflicts)
        raise UserError(f"route conflicts and --on-conflict=fail: {conflicts}")
    if not plan.installed:
        raise UserError("nothing to route: every cluster CIDR is excluded (see kvpn routes)")
    return plan


def check_route_options(options: ConnectOptions) -> None:
    """Refuse a bad --on-conflict, --include-cidr or --exclude-cidr in one line."""
    try:
        ConflictPolicy(options.on_conflict)
    except ValueError:
        choices = ", ".join(p.value for p in ConflictPolicy)
        raise UserError(
            f"--on-conflict must be one of {choices} (got {options.on_conflict!r})"
        ) from None
    for text in options.include_cidrs:
        _cidr(text, "--include-cidr")
    for text in options.exclude_cidrs:
        _cidr(text, "--exclude-cidr")


def _cidr(text: str, option: str) -> ipaddress.IPv4Network:
    try:
        return parse_ipv4_cidr(text)
    except ValueError as exc:
        raise UserError(f"{option}: {exc}") from None


def _describe_progress(progress: ShadowPodProgress) -> str:
    return f"shadow pod: {progress.describe()}"


async def run_session(
    options: ConnectOptions, out: Callable[[str], None], stop: asyncio.Event
) -> int:
    """Connect, print one line saying what is reachable, wait for ``stop``, undo everything."""
    if options.transport not in TRANSPORTS:
        raise UserError(f"--transport must be one of {', '.join(TRANSPORTS)}")
    if not has_net_admin():
        raise UserError("kvpn connect needs root or CAP_NET_ADMIN for its TUN device (try sudo)")
    if not os.path.exists("/dev/net/tun"):
        raise UserError("/dev/net/tun is missing: this kernel or container has no TUN support")
    if options.dns_mode not in CONNECT_DNS_MODES:
        raise UserError(f"--dns-mode must be one of {', '.join(CONNECT_DNS_MODES)}")
    check_route_options(options)  # before anything is changed (leftovers, DNS, cluster)
    try:
        ensure_private_dir(options.state_dir / "sessions")
        ensure_private_dir(options.state_dir)
    except OSError as exc:
        raise UserError(f"cannot use the state directory {options.state_dir}: {exc}") from None
    await offer_leftover_cleanup(options.journal_dir, out, clean=options.clean_leftovers)
    recover_dns(options, out)
    dns_mode = choose_connect_dns_mode(options)

    from kubernetes import client

    configuration, namespace, context = load_cluster(options)
    api = client.ApiClient(configuration)
    core = client.CoreV1Api(api)
    out(f"connecting to {configuration.host} (context {context}, namespace {namespace})")
    await require_permissions(
        api, connect_permissions(namespace, options.transport), namespace=namespace
    )
    protected = apiserver_addresses(configuration)
    try:
        cidrs = await asyncio.to_thread(discover, core, namespace)
    except Exception as exc:
        raise UserError(f"cannot reach the API server at {configuration.host}: {exc}") from None
    if not cidrs.all:
        raise UserError("could not find any pod or service CIDR in this cluster")
    apiserver_name = urlsplit(str(configuration.host)).hostname or ""
    # Planned once before anything is created, so bad options or a refused conflict change
    # nothing; planned again once the direct transport's peer is known.
    route_plan = await plan_session_routes(options, cidrs, protected, apiserver_name, None)

    undo = UndoStack()
    exit_code = 0
    link_config = LinkConfig()
    supervisors: list[LinkSupervisor] = []
    try:
        key = new_session_key()
        plan = ShadowPodPlan.new(
            namespace,
            public_key_text(key),
            user=getpass.getuser(),
            image=options.image or DEFAULT_SHADOW_IMAGE,
        )
        undo.journal = open_session_journal(options.journal_dir, plan.session_id, "connect")
        cluster = cluster_ref(options.kubeconfig, context)
        undo.push(
            f"delete shadow pod {plan.name}",
            lambda: delete_shadow_pod(core, plan),
            undo_delete_pod(cluster, namespace, plan.name, plan.session_id),
        )
        await create_shadow_pod(core, plan)
        out(f"shadow pod {namespace}/{plan.name} created")
        heartbeat = PodHeartbeat(core, namespace, plan.name)
        undo.push("stop the shadow pod's heartbeat", heartbeat.stop)
        await heartbeat.start()
        ready = await wait_shadow_ready(core, plan, lambda p: out(_describe_progress(p)))

        transport: Transport
        if options.transport == "direct":
            peer = ipaddress.IPv4Address(ready.pod_ip)
            route_plan = await plan_session_routes(options, cidrs, protected, apiserver_name, peer)
            protected.append(peer)
            transport = DirectTransport(ready.pod_ip, plan.port)
        else:
            transport = PortForwardTransport(configuration, namespace, plan.name, plan.port)
        tunnel = await ShadowTunnel.connect(
            transport,
            client_key=key,
            host_key=ready.host_key,
            keepalive_interval=link_config.keepalive_interval,
            keepalive_count_max=link_config.keepalive_count_max,
        )
        undo.push("close the SSH tunnel", lambda: _close_tunnel(tunnel, supervisors))

        dataplane_config = DataPlaneConfig(
            routes=route_plan.installed,
            tun_name=options.tun_name,
            offload=options.offload,
            protected_addresses=tuple(protected),
        )
        dataplane = DataPlane(tunnel, dataplane_config)
        undo.push(
            f"remove TUN {options.tun_name} and its routes",
            dataplane.stop,
            undo_delete_tun(options.tun_name, route_plan.installed),
        )
        await dataplane.start()

        dns = DnsStatus(DNS_OFF, reason="--dns-mode off")
        dns_servers: list[DnsServer] = []
        if dns_mode is not None:
            dns = await connect_dns(
                undo,
                out,
                core,
                options,
                dns_mode,
                namespace=namespace,
                session=plan.session_id,
                cidrs=cidrs,
                listen=dataplane_config.tun_address,
                servers=dns_servers,
            )

        session_file = options.state_dir / "sessions" / f"{plan.session_id}.json"
        undo.push(
            "remove the session file", lambda: _remove(session_file), undo_remove_file(session_file)
        )
        write_session(
            plan.session_id,
            pid=os.getpid(),
            tun=options.tun_name,
            namespace=namespace,
            context=context,
            routes=route_plan,
            directory=session_file.parent,
            extra={
                "session": plan.session_id,
                "shadow_pod": plan.name,
                "transport": options.transport,
                "dns": dns.to_json(),
            },
        )
        for note in route_plan.notes:
            out(f"note: {note}")
        for conflict in route_plan.conflicts:
            out(f"note: {conflict.describe()}")
        out(
            "connected: pods "
            + (", ".join(map(str, cidrs.pod_cidrs)) or "none")
            + " and services "
            + (", ".join(map(str, cidrs.service_cidrs)) or "none")
            + f" are reachable through {options.tun_name} (shadow {namespace}/{plan.name}, "
            f"{options.transport}); "
            + _exclusions_summary(route_plan)
            + f"DNS: {dns.summary()}; Ctrl-C disconnects"
        )
        link = ShadowLink(
            core,
            configuration,
            plan,
            client_key=key,
            host_key=ready.host_key,
            transport=options.transport,
            direct_peer=ready.pod_ip if options.transport == "direct" else None,
            out=out,
            keepalive_interval=link_config.keepalive_interval,
            keepalive_count_max=link_config.keepalive_count_max,
        )
        status_file = status_path(session_file.parent, plan.session_id)
        supervisor = LinkSupervisor(
            dataplane,
            tunnel,
            link.connect,
            out=out,
            publish=lambda: _publish_status(
                status_file,
                supervisors[0],
                link,
                dataplane,
                dns_servers,
                plan=plan,
                tun=options.tun_name,
                routes=route_plan,
                dns_mode=dns.mode,
            ),
            config=link_config,
        )
        supervisors.append(supervisor)
        undo.push(
            "remove the status file", lambda: _remove(status_file), undo_remove_file(status_file)
        )
        await supervisor.run(stop)
    except (ShadowPodError, TunnelError) as exc:
        out(f"kvpn: {exc}")
        exit_code = 1
    finally:
        out("disconnecting")
        problems = await undo.run()
        for problem in problems:
            out(f"kvpn: could not undo: {problem}")
        if problems:
            exit_code = 1
        api.close()  # type: ignore[no-untyped-call]
    return exit_code


def choose_connect_dns_mode(options: ConnectOptions) -> DnsMode | None:
    """The OS integration to use (None: ``--dns-mode off``); refuses what cannot work here."""
    if options.dns_mode == DNS_OFF:
        return None
    try:
        mode = choose_dns_mode(options.dns_mode)
    except DnsConfigError as exc:
        raise UserError(str(exc)) from None
    if mode == DnsMode.MACOS and sys.platform != "darwin":
        raise UserError("--dns-mode macos works on macOS only")
    if mode == DnsMode.RESOLVED and shutil.which("resolvectl") is None:
        raise UserError("--dns-mode resolved needs systemd-resolved's resolvectl, not found")
    return mode


def recover_dns(options: ConnectOptions, out: Callable[[str], None]) -> None:
    """Undo the DNS change of a crashed session; refuse to share DNS with a live one."""
    leftover = recover_leftover_dns(machine_dns_dir(options.state_dir))
    lines = leftover.describe()
    if options.dns_mode != DNS_OFF:
        if leftover.kind == LeftoverKind.LIVE_OWNER:
            raise UserError(f"{lines[0]}; disconnect it first, or connect with --dns-mode off")
        if leftover.kind == LeftoverKind.RESTORE_FAILED:
            raise UserError("; ".join(lines))
    for line in lines:
        out(line if line.startswith("note: ") else f"kvpn: {line}")


async def connect_dns(
    undo: UndoStack,
    out: Callable[[str], None],
    core: Any,
    options: ConnectOptions,
    mode: DnsMode,
    *,
    namespace: str,
    session: str,
    cidrs: ClusterCidrs,
    listen: ipaddress.IPv4Address,
    servers: list[DnsServer] | None = None,
) -> DnsStatus:
    """Resolver on *listen*:53, cluster names kept current, the OS pointed at the resolver.

    Each step registers its undo first. DNS problems do not end the session: the IPs stay
    reachable, and the returned status says why DNS is off.
    """
    domain = options.cluster_domain.strip(".")
    try:
        cluster_dns = await find_cluster_dns(core, cidrs.service_cidrs, domain=domain)
    except DnsSetupError as exc:
        out(f"kvpn: {exc}; cluster names will not resolve")
        return DnsStatus(DNS_OFF, reason="cluster DNS not found")
    if cluster_dns.note:
        out(f"note: {cluster_dns.note}")
    try:
        listing = await asyncio.to_thread(list_namespaces, core, namespace)
    except Exception as exc:
        out(f"kvpn: cannot list namespaces ({exc}); cluster names will not resolve")
        return DnsStatus(DNS_OFF, reason="namespaces not readable")
    if not listing.complete:
        out(
            f"note: cannot list namespaces ({listing.reason}): the short form `service.NS` is "
            f"recognised for {', '.join(listing.names)} only; full names "
            f"(service.NS.svc.{domain}) work for every namespace"
        )
    reverse_networks = (*cidrs.service_cidrs, *cidrs.pod_cidrs)
    kube_dns = UpstreamServer(str(cluster_dns.address))
    if servers is None:
        servers = []
    undo.push("stop the DNS resolver", lambda: _close_servers(servers))
    try:
        servers.append(
            await start_dns_server(
                listen_host=str(listen),
                listen_port=DNS_PORT,
                cluster_query=partial(udp_exchange, kube_dns, timeout=CLUSTER_QUERY_TIMEOUT),
                cluster_query_tcp=partial(tcp_exchange, kube_dns, timeout=CLUSTER_QUERY_TIMEOUT),
                upstreams=read_original_resolv_conf(mode).upstreams(),
                namespace=namespace,
                cluster_domain=domain,
                namespaces=listing.names,
                reverse_networks=reverse_networks,
            )
        )
    except OSError as exc:
        out(f"kvpn: cannot listen for DNS on {listen}:{DNS_PORT} ({exc}); DNS is off")
        return DnsStatus(DNS_OFF, reason=f"port {DNS_PORT} unavailable")
    journal = machine_dns_dir(options.state_dir)
    refresh = ClusterNamesRefresh(
        core,
        servers[0].resolver,
        namespace=namespace,
        domain=domain,
        reverse_networks=reverse_networks,
        hosts_state_dir=journal if mode == DnsMode.HOSTS else None,
    )
    if mode == DnsMode.HOSTS:
        refresh.hosts_entries = await asyncio.to_thread(
            list_service_entries, core, namespace, domain
        )
    tasks: list[asyncio.Task[None]] = []
    undo.push("stop refreshing cluster names", lambda: _cancel_tasks(tasks))
    tasks.append(asyncio.ensure_future(refresh.run()))

    dns_plan = plan_dns(
        mode,
        nameserver=str(listen),
        port=DNS_PORT,
        namespace=namespace,
        cluster_domain=domain,
        link=options.tun_name,
        route_namespaces=[namespace],
        reverse_networks=reverse_networks,
        hosts_entries=refresh.hosts_entries,
        session=session,
    )
    undo.push(
        "restore the DNS configuration",
        lambda: _restore_dns(journal, out),
        undo_restore_dns(journal),
    )
    try:
        claim_dns(journal, DnsOwner.this_process(session))
        await asyncio.to_thread(apply_dns_plan, dns_plan, state_dir=journal)
        undo.record(
            "restore the DNS configuration (a copy that survives a reboot)",
            undo_restore_dns(journal, keep_state=True),
        )
    except (DnsConfigError, OSError) as exc:
        out(f"kvpn: DNS not configured: {exc}")
        return DnsStatus(DNS_OFF, reason="the system's DNS could not be changed")
    return DnsStatus(
        mode.value,
        resolver=f"{listen}:{DNS_PORT}",
        cluster_dns=str(cluster_dns.address),
        journal_dir=str(journal),
    )


async def _close_tunnel(first: ShadowTunnel, supervisors: list[LinkSupervisor]) -> None:
    """Close the tunnel in use: the first one, or the supervisor's latest."""
    if supervisors:
        await supervisors[0].close_tunnel()
    else:
        await first.close()


def _publish_status(
    path: Path,
    supervisor: LinkSupervisor,
    link: ShadowLink,
    dataplane: DataPlane,
    dns_servers: list[DnsServer],
    *,
    plan: ShadowPodPlan,
    tun: str,
    routes: RoutePlan,
    dns_mode: str,
) -> None:
    """Rewrite the status file from the live state (the supervisor calls this)."""
    snapshot = supervisor.snapshot()
    mono = asyncio.get_running_loop().time()
    wall = time.time()
    dns_counters = dns_servers[0].resolver.counters.as_dict() if dns_servers else None
    status = live_status(
        plan.session_id,
        snapshot,
        pid_start=DnsOwner.this_process(plan.session_id).started,
        mono=mono,
        wall=wall,
        shadow_pod=f"{plan.namespace}/{plan.name}",
        pods_recreated=link.pods_recreated,
        transport=link.transport_name,
        tun=tun,
        routes=tuple(str(network) for network in routes.installed),
        dns_mode=dns_mode,
        counters=summarize_counters(dataplane.counters, dns_counters),
    )
    try:
        write_status(path, status)
    except OSError as exc:
        log.warning("cannot write the status file %s: %s", path, exc)


async def _close_servers(servers: list[DnsServer]) -> None:
    for server in servers:
        await server.close()


async def _cancel_tasks(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class DnsRestoreError(Exception):
    pass


async def _restore_dns(journal: Path, out: Callable[[str], None]) -> None:
    report = await asyncio.to_thread(restore_machine_dns, journal)
    if not report.ok:
        raise DnsRestoreError(
            "; ".join(report.notes) + f" (the originals are recorded in {journal})"
        )
    if report.mode is not None:
        for note in report.notes:
            out(f"note: {note}")


def _exclusions_summary(plan: RoutePlan) -> str:
    if not plan.exclusions and not plan.conflicts:
        return ""
    return (
        f"{len(plan.exclusions)} exclusion(s), {len(plan.conflicts)} conflict(s): "
        "see `kvpn routes`; "
    )


async def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def run_connect_blocking(options: ConnectOptions) -> int:
    """Run a session until Ctrl-C or SIGTERM; the CLI's entry point."""
    import signal

    def out(line: str) -> None:
        print(line, flush=True)

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await run_session(options, out, stop)

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="kvpn: %(message)s")
    from kvpn.event_loop import run as run_event_loop  # uvloop when installed

    return run_event_loop(main())
