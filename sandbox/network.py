"""The sandbox's network namespaces: node, laptop and pods, built with ``ip`` and ``sysctl``.

Theory of operation
-------------------
One sandbox is a handful of named network namespaces (``/run/netns/<name>``), all starting with
``config.netns_prefix``:

* ``<prefix>node``: the node. It routes between pods (routed /32 veths, Calico-style, so every
  packet crosses its L3 stack and conntrack), holds the pod gateway, the API server address and
  the two "outside world" addresses on ``lo``, and runs the control plane process.
* ``<prefix>laptop``: the developer's machine, joined to the node by the veth pair ``eth0`` /
  ``laptop0`` on 172.31.255.0/30. It has routes only to the API server and to the outside
  addresses, never to pods or services: reaching those is kvpn's job. (Unless
  ``config.laptop_routes_pods``: then the pod CIDR is routed via the node too, as the
  benchmark's no-tunnel baseline needs; services still are not.)
* ``<prefix>pod-<hex>``: one per pod, with ``eth0`` = ``<ip>/32`` and a default route via the
  pod gateway; the node side of the veth is ``v<10 hex>`` and carries the route ``<ip>/32``.

The node also has a dummy (or ifb) link ``kvpn-svc`` with a route to the service CIDR, so that processes
running in the node (hostNetwork pods, the control plane) have a route to ClusterIPs that
kube-proxy's nftables output hook can then DNAT, just like a real node's default route.

Every link is created directly inside its namespace (``ip link add ... netns A type veth peer
name X netns B``), so nothing ever appears in the namespace of the caller; this module never
changes the host's own routes, links, sysctls or firewall.

Tear-down is by name: ``destroy_topology`` kills every process left in the sandbox's namespaces,
deletes them (the veths die with them) and removes the ``/etc/netns/<name>`` folders that
``ip netns exec`` bind-mounts ``resolv.conf`` from.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.config import (
    LAPTOP_LINK_ADDRESS,
    LINK_NETWORK,
    NODE_LINK_ADDRESS,
    OUTSIDE_DNS_ADDRESS,
    OUTSIDE_WEB_ADDRESS,
    SandboxConfig,
)

NETNS_RUN_DIR = Path("/run/netns")
NETNS_ETC_DIR = Path("/etc/netns")

LAPTOP_LINK_NODE_SIDE = "laptop0"
LAPTOP_LINK_LAPTOP_SIDE = "eth0"
POD_INTERFACE = "eth0"
SERVICE_SINK_LINK = "kvpn-svc"
SERVICE_SINK_KINDS = ("dummy", "ifb")
# The "outside world" the laptop can reach: the outside DNS and web servers live in here.
OUTSIDE_NETWORK = ipaddress.IPv4Network("198.18.0.0/24")
# Unprivileged ICMP echo sockets for every group (pods run as root anyway; ping -c works).
PING_GROUP_RANGE = "0 2147483647"
# The node and the pods send every ICMP error (net.ipv4.icmp_ratelimit=0): with the default
# of one per second per peer, "port unreachable" for a UDP service without endpoints would
# come or not depending on what happened in the last second, and tests could not rely on it.
ICMP_RATELIMIT_MS = "0"
KILL_WAIT_S = 5.0

IPAddressLike = ipaddress.IPv4Address | str


class NetworkError(Exception):
    """A command that sets up or tears down the sandbox network failed."""

    def __init__(self, message: str, *, argv: Sequence[str] = (), stderr: str = "") -> None:
        detail = f": {stderr.strip()}" if stderr.strip() else ""
        command = f" (command: {' '.join(argv)})" if argv else ""
        super().__init__(f"{message}{detail}{command}")
        self.argv = tuple(argv)
        self.stderr = stderr


@dataclass(frozen=True, slots=True)
class PodNetwork:
    """What ``setup_pod_network`` made: the pod's netns, its IP and the node-side veth."""

    netns: str
    ip: ipaddress.IPv4Address
    host_veth: str


# -- running commands ----------------------------------------------------------------------


def run(argv: Sequence[str], *, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output as text; a failure raises ``NetworkError``."""
    if "input" not in kw:
        kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("capture_output", True)
    kw.setdefault("timeout", 30)
    argv = list(argv)
    try:
        proc: subprocess.CompletedProcess[str] = subprocess.run(argv, text=True, **kw)
    except FileNotFoundError as e:
        raise NetworkError(f"{argv[0]} is not installed", argv=argv) from e
    except subprocess.TimeoutExpired as e:
        raise NetworkError("command timed out", argv=argv) from e
    if check and proc.returncode != 0:
        raise NetworkError(
            f"command failed with exit status {proc.returncode}",
            argv=argv,
            stderr=proc.stderr or "",
        )
    return proc


def run_in_netns(
    netns: str, argv: Sequence[str], *, check: bool = True, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run a command inside a named netns (``ip netns exec``, so /etc/netns files apply)."""
    return run(["ip", "netns", "exec", netns, *argv], check=check, **kw)


def _ip(netns: str, *args: str) -> None:
    run(["ip", "-n", netns, *args])


def _sysctl(netns: str, settings: dict[str, str]) -> None:
    run_in_netns(netns, ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())])


# -- namespaces ----------------------------------------------------------------------------


def list_netns(prefix: str) -> list[str]:
    """Names of the named network namespaces that start with ``prefix``, sorted."""
    try:
        names = os.listdir(NETNS_RUN_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def _owned_suffix_re(config: SandboxConfig) -> re.Pattern[str]:
    # Exactly the names config hands out, so sandbox "a" never claims sandbox "a-b"'s netns.
    return re.compile(re.escape(config.netns_prefix) + r"(node|laptop|pod-[0-9a-f]+)")


def sandbox_netns(config: SandboxConfig) -> list[str]:
    """The namespaces that belong to this sandbox (node, laptop, pods), sorted."""
    owned = _owned_suffix_re(config)
    return [n for n in list_netns(config.netns_prefix) if owned.fullmatch(n)]


def netns_exists(netns: str) -> bool:
    return (NETNS_RUN_DIR / netns).exists()


def netns_pids(netns: str) -> list[int]:
    """Processes whose network namespace is ``netns`` (``ip netns pids``)."""
    proc = run(["ip", "netns", "pids", netns], check=False)
    return sorted({int(tok) for tok in proc.stdout.split() if tok.isdigit()})


def kill_netns_processes(netns: str, *, wait_s: float = KILL_WAIT_S) -> list[int]:
    """SIGKILL every process in ``netns`` (but never this one) and wait for them to go."""
    own = os.getpid()
    pids = [p for p in netns_pids(netns) if p != own]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    for pid in pids:
        while _pid_alive(pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.01)
    return pids


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # A zombie has released its namespaces already.
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def delete_netns(netns: str) -> None:
    """Delete a named netns if it exists, and its /etc/netns folder."""
    if netns_exists(netns):
        proc = run(["ip", "netns", "delete", netns], check=False)
        if proc.returncode != 0 and netns_exists(netns):
            raise NetworkError(f"cannot delete netns {netns}", argv=proc.args, stderr=proc.stderr)
    shutil.rmtree(NETNS_ETC_DIR / netns, ignore_errors=True)


def _write_etc_file(netns: str, filename: str, text: str) -> None:
    folder = NETNS_ETC_DIR / netns
    folder.mkdir(parents=True, exist_ok=True)
    (folder / filename).write_text(text)


# -- node and laptop -----------------------------------------------------------------------


def node_lo_addresses(config: SandboxConfig) -> list[ipaddress.IPv4Address]:
    """Addresses the node holds on ``lo``: the pod gateway first (masquerade picks it)."""
    addresses = [config.pod_gateway]
    if config.apiserver_address != NODE_LINK_ADDRESS:
        addresses.append(config.apiserver_address)
    addresses += [OUTSIDE_DNS_ADDRESS, OUTSIDE_WEB_ADDRESS]
    unique: list[ipaddress.IPv4Address] = []
    for a in addresses:
        if a not in unique:
            unique.append(a)
    return unique


def laptop_routes(config: SandboxConfig) -> list[str]:
    """The laptop's routes besides its link network, as ``ip route`` destinations.

    With ``config.laptop_routes_pods`` the pod CIDR is routed via the node too (pods see the
    laptop's own address, no NAT); the service CIDR never is.
    """
    routes = []
    api = config.apiserver_address
    if api not in LINK_NETWORK and api not in OUTSIDE_NETWORK:
        routes.append(f"{api}/32")
    routes.append(str(OUTSIDE_NETWORK))
    if config.laptop_routes_pods:
        routes.append(str(config.pod_cidr))
    return routes


def create_topology(config: SandboxConfig) -> None:
    """Create the node and laptop namespaces, their link and the laptop's resolv.conf.

    Raises ``NetworkError`` if any of the sandbox's namespaces already exists (run
    ``destroy_topology`` first); on any failure, what was made is removed again.
    """
    existing = sandbox_netns(config)
    if existing:
        raise NetworkError(
            f"sandbox {config.name!r} network already exists ({', '.join(existing)}); "
            "destroy it first"
        )
    try:
        _create_node(config)
        _create_laptop(config)
        _add_service_route(config)  # its source address is the node's link address
    except BaseException:
        destroy_topology(config)
        raise


def _create_node(config: SandboxConfig) -> None:
    node = config.node_netns
    run(["ip", "netns", "add", node])
    _ip(node, "link", "set", "lo", "up")
    _sysctl(
        node,
        {
            "net.ipv4.ip_forward": "1",
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.default.rp_filter": "0",
            "net.ipv4.conf.lo.rp_filter": "0",
            "net.ipv4.ping_group_range": PING_GROUP_RANGE,
            "net.ipv4.icmp_ratelimit": ICMP_RATELIMIT_MS,
        },
    )
    for address in node_lo_addresses(config):
        _ip(node, "addr", "add", f"{address}/32", "dev", "lo")


def _add_service_route(config: SandboxConfig) -> None:
    """Route the service CIDR into a link that drops everything (see the module docstring).

    ``dummy`` is the natural choice; some kernels lack it but have ``ifb``, which also drops
    what is sent to it and needs no ARP. With neither, node processes just get "network
    unreachable" for ClusterIPs (pods are not affected).
    """
    node = config.node_netns
    for kind in SERVICE_SINK_KINDS:
        proc = run(["ip", "-n", node, "link", "add", SERVICE_SINK_LINK, "type", kind], check=False)
        if proc.returncode == 0:
            break
    else:
        return
    _ip(node, "link", "set", SERVICE_SINK_LINK, "up")
    _ip(
        node,
        "route", "add", str(config.service_cidr), "dev", SERVICE_SINK_LINK,
        "src", str(config.node_address),
    )  # fmt: skip


def _create_laptop(config: SandboxConfig) -> None:
    node, laptop = config.node_netns, config.laptop_netns
    run(["ip", "netns", "add", laptop])
    _ip(laptop, "link", "set", "lo", "up")
    # Like systemd's default on a real laptop: ICMP echo sockets for everyone.
    _sysctl(laptop, {"net.ipv4.ping_group_range": PING_GROUP_RANGE})
    run(
        [
            "ip", "link", "add", LAPTOP_LINK_NODE_SIDE, "netns", node,
            "type", "veth", "peer", "name", LAPTOP_LINK_LAPTOP_SIDE, "netns", laptop,
        ]
    )  # fmt: skip
    prefix = LINK_NETWORK.prefixlen
    _ip(node, "addr", "add", f"{NODE_LINK_ADDRESS}/{prefix}", "dev", LAPTOP_LINK_NODE_SIDE)
    _ip(node, "link", "set", LAPTOP_LINK_NODE_SIDE, "up")
    _ip(laptop, "addr", "add", f"{LAPTOP_LINK_ADDRESS}/{prefix}", "dev", LAPTOP_LINK_LAPTOP_SIDE)
    _ip(laptop, "link", "set", LAPTOP_LINK_LAPTOP_SIDE, "up")
    for destination in laptop_routes(config):
        _ip(laptop, "route", "add", destination, "via", str(NODE_LINK_ADDRESS))
    _write_etc_file(laptop, "resolv.conf", f"nameserver {OUTSIDE_DNS_ADDRESS}\n")


def destroy_topology(config: SandboxConfig) -> list[str]:
    """Kill every process in the sandbox's namespaces, delete them and their /etc/netns folders.

    Works whatever state things are in (crashed control plane, half-made topology); touches
    nothing but this sandbox's namespaces and folders. Returns the namespaces deleted.
    """
    names = sandbox_netns(config)
    # Pods first, node last: pod processes die before the control plane that watches them.
    names.sort(key=lambda n: (n == config.node_netns, n == config.laptop_netns, n))
    for netns in names:
        kill_netns_processes(netns)
    for netns in names:
        delete_netns(netns)
    owned = _owned_suffix_re(config)
    with contextlib.suppress(FileNotFoundError):
        for entry in NETNS_ETC_DIR.iterdir():
            if owned.fullmatch(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
    leftover = sandbox_netns(config)
    if leftover:
        raise NetworkError(f"could not delete netns {', '.join(leftover)}")
    return names


# -- pods ----------------------------------------------------------------------------------


def host_veth_name(netns: str) -> str:
    """The node-side veth of a pod: ``v`` + 10 hex chars of the netns name's SHA-1."""
    return "v" + hashlib.sha1(netns.encode()).hexdigest()[:10]


def resolv_conf(config: SandboxConfig, namespace: str) -> str:
    domain = config.cluster_domain
    return (
        f"search {namespace}.svc.{domain} svc.{domain} {domain}\n"
        f"nameserver {config.dns_service_ip}\n"
        "options ndots:5\n"
    )


def setup_pod_network(
    config: SandboxConfig, netns: str, ip: IPAddressLike, namespace: str
) -> PodNetwork:
    """Create a pod's netns with a routed /32 veth to the node and its resolv.conf.

    Raises ``NetworkError`` if ``netns`` exists already or ``ip`` is outside the node's pod
    CIDR; on a failure halfway, what was made is removed again.
    """
    address = ipaddress.IPv4Address(ip)
    if address not in config.node_pod_cidr or address == config.pod_gateway:
        raise NetworkError(f"pod IP {address} is not a pod address of {config.node_pod_cidr}")
    if not netns.startswith(config.netns_prefix):
        raise NetworkError(f"pod netns {netns!r} does not start with {config.netns_prefix!r}")
    if netns_exists(netns):
        raise NetworkError(f"netns {netns} already exists")
    node, veth, gateway = config.node_netns, host_veth_name(netns), str(config.pod_gateway)
    run(["ip", "netns", "add", netns])
    try:
        _ip(netns, "link", "set", "lo", "up")
        run(
            [
                "ip", "link", "add", veth, "netns", node,
                "type", "veth", "peer", "name", POD_INTERFACE, "netns", netns,
            ]
        )  # fmt: skip
        _ip(netns, "addr", "add", f"{address}/32", "dev", POD_INTERFACE)
        _ip(netns, "link", "set", POD_INTERFACE, "up")
        _ip(netns, "route", "add", gateway, "dev", POD_INTERFACE, "scope", "link")
        _ip(netns, "route", "add", "default", "via", gateway, "dev", POD_INTERFACE)
        _sysctl(
            netns,
            {
                "net.ipv4.ping_group_range": PING_GROUP_RANGE,
                "net.ipv4.icmp_ratelimit": ICMP_RATELIMIT_MS,
            },
        )
        _ip(node, "link", "set", veth, "up")
        _ip(node, "route", "replace", f"{address}/32", "dev", veth)
        _write_etc_file(netns, "resolv.conf", resolv_conf(config, namespace))
    except BaseException:
        teardown_pod_network(config, netns)
        raise
    return PodNetwork(netns, address, veth)


def teardown_pod_network(config: SandboxConfig, netns: str) -> None:
    """Remove a pod's veth (and so its node route), netns and /etc/netns folder.

    Safe to call for a pod that was half set up or is already gone. Processes still in the
    netns are not killed (the kubelet stops them; ``kill_netns_processes`` if it must).
    """
    veth = host_veth_name(netns)
    if netns_exists(config.node_netns):
        # Deleting the node end removes the pod end and the node's route to the pod, even if
        # a process still holds the pod's netns open.
        proc = run(["ip", "-n", config.node_netns, "link", "del", veth], check=False)
        if proc.returncode != 0 and "Cannot find device" not in proc.stderr:
            raise NetworkError(f"cannot delete veth {veth}", argv=proc.args, stderr=proc.stderr)
    delete_netns(netns)
