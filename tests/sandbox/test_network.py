"""The sandbox network in real namespaces: topology, pod veths, kube-proxy rules, outside world.

Needs root. Every namespace is ``kvpnt-<name>-...`` and is removed at the end, even on failure.
Servers run as processes inside the namespaces (so tear-down has something to kill); clients
are sockets made in-process inside a namespace (``inside_netns``), which is fast.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dnslib import DNSRecord

from sandbox import network
from sandbox.apiserver.resources import ENDPOINTS, SERVICES, ResourceType
from sandbox.apiserver.store import Store
from sandbox.config import SandboxConfig
from sandbox.inside_netns import inside_netns
from sandbox.kube_proxy import KubeProxy, render_ruleset

pytestmark = pytest.mark.sandbox

REPO = Path(__file__).resolve().parents[2]
API_ADDRESS = "10.96.100.100"  # not the link address: the laptop needs a /32 route to it
POD_A, POD_B = "10.244.0.5", "10.244.0.6"

# Runs inside a namespace: "serve PORT NAME" answers every TCP connection and UDP datagram
# with "NAME <peer ip>"; prints "ready" once listening.
SERVER = """
import socket, sys, threading
port, name = int(sys.argv[1]), sys.argv[2]
tcp = socket.socket()
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", port))
tcp.listen(64)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", port))
def serve_udp():
    while True:
        data, peer = udp.recvfrom(100)
        udp.sendto(f"{name} {peer[0]}".encode(), peer)
threading.Thread(target=serve_udp, daemon=True).start()
print("ready", flush=True)
while True:
    conn, peer = tcp.accept()
    conn.sendall(f"{name} {peer[0]}".encode())
    conn.close()
"""


def unique_name() -> str:
    return "t" + uuid.uuid4().hex[:8]


def make_config(name: str, **kw: Any) -> SandboxConfig:
    return SandboxConfig(name=name, netns_prefix_base="kvpnt-", **kw)


@dataclass
class Topology:
    config: SandboxConfig
    pod_a: str
    pod_b: str
    servers: list[subprocess.Popen[str]]

    def serve(self, netns: str, port: int, name: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-c", SERVER, str(port), name],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self.servers.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return proc


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    config = make_config(unique_name(), apiserver_address=ipaddress.IPv4Address(API_ADDRESS))
    servers: list[subprocess.Popen[str]] = []
    try:
        network.create_topology(config)
        pod_a, pod_b = config.pod_netns("uid-a"), config.pod_netns("uid-b")
        network.setup_pod_network(config, pod_a, POD_A, "default")
        network.setup_pod_network(config, pod_b, ipaddress.IPv4Address(POD_B), "team")
        topo = Topology(config, pod_a, pod_b, servers)
        topo.serve(pod_a, 8080, "A")
        topo.serve(pod_b, 8080, "B")
        topo.serve(config.node_netns, 6443, "api")
        yield topo
    finally:
        network.destroy_topology(config)
        for proc in servers:
            proc.wait(timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()
    assert network.list_netns(config.netns_prefix) == []
    assert not list(Path("/etc/netns").glob(f"{config.netns_prefix}*"))


def ip_json(netns: str, *args: str) -> Any:
    import json

    return json.loads(network.run(["ip", "-j", "-n", netns, *args]).stdout)


def ping(netns: str, address: str) -> bool:
    """One ICMP echo over an unprivileged ICMP socket (needs ping_group_range) from ``netns``."""
    with inside_netns(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
    with sock:
        sock.settimeout(2)
        try:
            sock.sendto(struct.pack("!BBHHH", 8, 0, 0, 0, 1) + b"kvpn", (address, 0))
            data, peer = sock.recvfrom(100)
        except OSError:
            return False
        return peer[0] == address and data[0] == 0  # echo reply


def tcp_ask(netns: str, address: str, port: int) -> str:
    """What a TCP server says on connect, or ``error <errno name>``."""
    with inside_netns(netns):
        sock = socket.socket()
    with sock:
        sock.settimeout(3)
        try:
            sock.connect((address, port))
            return sock.recv(100).decode()
        except OSError as e:
            return f"error {type(e).__name__}"


def udp_ask(netns: str, address: str, port: int) -> str:
    with inside_netns(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(3)
        try:
            sock.connect((address, port))
            sock.send(b"?")
            return sock.recv(100).decode()
        except OSError as e:
            return f"error {type(e).__name__}"


# -- topology ------------------------------------------------------------------------------


def test_node_and_laptop_layout(topo: Topology) -> None:
    c = topo.config
    node_lo = ip_json(c.node_netns, "-4", "addr", "show", "dev", "lo")[0]["addr_info"]
    assert [(a["local"], a["prefixlen"]) for a in node_lo] == [
        ("127.0.0.1", 8),
        ("10.244.0.1", 32),
        (API_ADDRESS, 32),
        ("198.18.0.53", 32),
        ("198.18.0.80", 32),
    ]
    laptop_routes = {r["dst"]: r.get("gateway") for r in ip_json(c.laptop_netns, "route")}
    assert laptop_routes == {
        f"{API_ADDRESS}": "172.31.255.1",
        "172.31.255.0/30": None,
        "198.18.0.0/24": "172.31.255.1",
    }
    links = {link["ifname"] for link in ip_json(c.laptop_netns, "link")}
    assert links == {"lo", "eth0"}
    assert (
        Path(f"/etc/netns/{c.laptop_netns}/resolv.conf").read_text() == "nameserver 198.18.0.53\n"
    )
    sysctl = network.run_in_netns(
        c.node_netns, ["sysctl", "-n", "net.ipv4.ip_forward", "net.ipv4.conf.all.rp_filter"]
    ).stdout.split()
    assert sysctl == ["1", "0"]


def test_pod_layout(topo: Topology) -> None:
    c = topo.config
    pod = ip_json(topo.pod_b, "-4", "addr", "show", "dev", "eth0")[0]["addr_info"]
    assert [(a["local"], a["prefixlen"]) for a in pod] == [(POD_B, 32)]
    routes = sorted((r["dst"], r.get("gateway", "")) for r in ip_json(topo.pod_b, "route"))
    assert routes == [("10.244.0.1", ""), ("default", "10.244.0.1")]
    veth = network.host_veth_name(topo.pod_b)
    assert veth.startswith("v") and len(veth) == 11
    node_route = ip_json(c.node_netns, "route", "show", f"{POD_B}/32")
    assert [(r["dst"], r["dev"]) for r in node_route] == [(POD_B, veth)]
    assert Path(f"/etc/netns/{topo.pod_b}/resolv.conf").read_text() == (
        "search team.svc.cluster.local svc.cluster.local cluster.local\n"
        "nameserver 10.96.0.10\n"
        "options ndots:5\n"
    )


def test_pods_reach_each_other_the_gateway_and_the_outside(topo: Topology) -> None:
    assert ping(topo.pod_a, POD_B)
    assert ping(topo.pod_b, POD_A)
    assert ping(topo.pod_a, "10.244.0.1")
    assert ping(topo.pod_a, "198.18.0.80")
    assert tcp_ask(topo.pod_a, POD_B, 8080) == f"B {POD_A}"  # no NAT between pods


def test_laptop_reaches_api_server_but_not_pods(topo: Topology) -> None:
    laptop = topo.config.laptop_netns
    assert tcp_ask(laptop, API_ADDRESS, 6443) == "api 172.31.255.2"
    assert ping(laptop, API_ADDRESS)
    assert ping(laptop, "198.18.0.53")
    assert tcp_ask(laptop, POD_A, 8080) == "error OSError"  # ENETUNREACH
    assert tcp_ask(laptop, "10.96.0.1", 443) == "error OSError"


def test_create_twice_and_pod_twice_are_clear_errors(topo: Topology) -> None:
    with pytest.raises(network.NetworkError, match="already exists"):
        network.create_topology(topo.config)
    with pytest.raises(network.NetworkError, match="already exists"):
        network.setup_pod_network(topo.config, topo.pod_a, "10.244.0.50", "default")
    with pytest.raises(network.NetworkError, match="not a pod address"):
        network.setup_pod_network(topo.config, topo.config.pod_netns("x"), "10.1.0.1", "default")


def test_pod_teardown_removes_netns_veth_and_route(topo: Topology) -> None:
    c = topo.config
    netns = c.pod_netns("short-lived")
    network.setup_pod_network(c, netns, "10.244.0.77", "default")
    assert ping(topo.pod_a, "10.244.0.77")
    network.teardown_pod_network(c, netns)
    network.teardown_pod_network(c, netns)  # twice is fine
    assert not network.netns_exists(netns)
    assert not Path(f"/etc/netns/{netns}").exists()
    assert ip_json(c.node_netns, "route", "show", "10.244.0.77/32") == []
    names = {link["ifname"] for link in ip_json(c.node_netns, "link")}
    assert network.host_veth_name(netns) not in names
    network.setup_pod_network(c, netns, "10.244.0.77", "default")  # the IP can be reused
    network.teardown_pod_network(c, netns)


# -- kube-proxy ------------------------------------------------------------------------------


def svc(
    name: str, ip: str, ports: list[dict[str, Any]], type_: str = "ClusterIP"
) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "default", "name": name},
        "spec": {"type": type_, "clusterIP": ip, "ports": ports},
    }


def eps(name: str, ips: list[str], ports: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "default", "name": name},
        "subsets": [{"addresses": [{"ip": ip} for ip in ips], "ports": ports}] if ips else [],
    }


def nft(netns: str, script: str) -> None:
    network.run_in_netns(netns, ["nft", "-f", "-"], input=script)


def test_kube_proxy_ruleset_in_the_node(topo: Topology) -> None:
    c = topo.config
    http = [{"name": "http", "port": 80, "protocol": "TCP"}]
    target = [{"name": "http", "port": 8080, "protocol": "TCP"}]
    services = [
        svc("to-b", "10.96.0.20", http, "NodePort"),
        svc("to-a", "10.96.0.21", http),
        svc("empty", "10.96.0.22", http),
        svc("udp", "10.96.0.23", [{"port": 53, "protocol": "UDP"}]),
    ]
    services[0]["spec"]["ports"][0]["nodePort"] = 30080
    endpoints = [
        eps("to-b", [POD_B], target),
        eps("to-a", [POD_A], target),
        eps("empty", [], target),
        eps("udp", [POD_B], [{"port": 8080, "protocol": "UDP"}]),
    ]
    nft(c.node_netns, render_ruleset(c, services, endpoints))
    try:
        # DNAT, with the client's own address kept.
        assert tcp_ask(topo.pod_a, "10.96.0.20", 80) == f"B {POD_A}"
        assert udp_ask(topo.pod_a, "10.96.0.23", 53) == f"B {POD_A}"
        # Hairpin: pod A reaches itself through its service; it sees the node as the peer.
        assert tcp_ask(topo.pod_a, "10.96.0.21", 80) == "A 10.244.0.1"
        # No endpoints, or a port the service lacks: refused at once, like kube-proxy.
        assert tcp_ask(topo.pod_a, "10.96.0.22", 80) == "error ConnectionRefusedError"
        assert tcp_ask(topo.pod_a, "10.96.0.20", 81) == "error ConnectionRefusedError"
        assert udp_ask(topo.pod_a, "10.96.0.22", 80) == "error ConnectionRefusedError"
        # The node's own processes use ClusterIPs too (output hook).
        assert tcp_ask(c.node_netns, "10.96.0.21", 80) == "A 172.31.255.1"
        assert tcp_ask(c.node_netns, "10.96.0.22", 80) == "error ConnectionRefusedError"
        # NodePort, from the laptop and (hairpin) from the backend pod itself.
        assert tcp_ask(c.laptop_netns, "172.31.255.1", 30080) == "B 172.31.255.2"
        assert tcp_ask(topo.pod_b, "172.31.255.1", 30080) == "B 10.244.0.1"
    finally:
        nft(c.node_netns, "table ip kvpn_proxy\ndelete table ip kvpn_proxy\n")


class FakeApi:
    def __init__(self) -> None:
        self.store = Store()

    def list(self, rt: ResourceType, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.store.list(rt, namespace)[0]


async def test_kube_proxy_follows_endpoint_changes(topo: Topology) -> None:
    c = topo.config
    api = FakeApi()
    api.store.create(SERVICES, svc("web", "10.96.0.30", [{"port": 80}]))
    api.store.create(ENDPOINTS, eps("web", [POD_B], [{"port": 8080}]))
    proxy = KubeProxy(api, c, netns=c.node_netns)
    task = asyncio.create_task(proxy.run())
    loop = asyncio.get_running_loop()

    async def ask_until(expected: str) -> None:
        async with asyncio.timeout(5):
            while await loop.run_in_executor(None, tcp_ask, topo.pod_a, "10.96.0.30", 80) != (
                expected
            ):
                await asyncio.sleep(0.02)

    try:
        async with asyncio.timeout(5):
            while proxy.applies < 1:  # else the first SYN is lost and retried after 1 s
                await asyncio.sleep(0.01)
        await ask_until(f"B {POD_A}")
        stored = api.store.get(ENDPOINTS, "default", "web")
        stored["subsets"][0]["addresses"] = [{"ip": POD_A}]
        api.store.update(ENDPOINTS, stored)
        await ask_until("A 10.244.0.1")  # re-pointed (and now a hairpin); measured ~70 ms
        api.store.delete(ENDPOINTS, "default", "web")
        await ask_until("error ConnectionRefusedError")
    finally:
        await proxy.stop()
        task.cancel()
    tables = network.run_in_netns(c.node_netns, ["nft", "list", "tables"]).stdout
    assert "kvpn_proxy" not in tables


# -- the outside world ---------------------------------------------------------------------


def test_outside_dns_and_web_from_the_laptop(topo: Topology) -> None:
    c = topo.config
    server = subprocess.Popen(
        ["ip", "netns", "exec", c.node_netns, sys.executable, "-m", "sandbox.outside_dns"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    topo.servers.append(server)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    # Through the laptop's resolv.conf, as any program there would.
    lookup = (
        "import socket, urllib.request;"
        "print(socket.gethostbyname('www.example.test'));"
        "print(urllib.request.urlopen('http://outside.test/', timeout=5).read().decode())"
    )
    out = network.run_in_netns(c.laptop_netns, [sys.executable, "-c", lookup]).stdout
    assert out.split() == ["198.18.0.80", "outside"]
    # dnslib client, UDP and TCP, straight from the laptop namespace.
    with inside_netns(c.laptop_netns):
        udp = DNSRecord.parse(DNSRecord.question("example.test").send("198.18.0.53", timeout=3))
        tcp = DNSRecord.parse(
            DNSRecord.question("nothing.test").send("198.18.0.53", tcp=True, timeout=3)
        )
        stats = DNSRecord.parse(
            DNSRecord.question("stats.example.test", "TXT").send("198.18.0.53", tcp=True, timeout=3)
        )
    assert [str(rr.rdata) for rr in udp.rr] == ["198.18.0.80"]
    assert tcp.header.rcode == 3  # NXDOMAIN
    counts = dict(str(rr.rdata).strip('"').split("=") for rr in stats.rr)
    assert counts["example.test"] == "1"
    assert counts["nothing.test"] == "1"
    assert int(counts["www.example.test"]) >= 1
    assert "echo.default.svc.cluster.local" not in counts


# -- tear-down -----------------------------------------------------------------------------


def test_destroy_kills_everything_and_spares_other_sandboxes() -> None:
    name = unique_name()
    config, neighbour = make_config(name), make_config(f"{name}-b")
    sleepers: list[subprocess.Popen[bytes]] = []
    try:
        network.create_topology(config)
        network.create_topology(neighbour)
        pod = config.pod_netns("uid")
        network.setup_pod_network(config, pod, POD_A, "default")
        for netns in (pod, config.node_netns, config.laptop_netns):
            sleepers.append(subprocess.Popen(["ip", "netns", "exec", netns, "sleep", "600"]))
        deadline = time.monotonic() + 5
        for netns, proc in zip(
            (pod, config.node_netns, config.laptop_netns), sleepers, strict=True
        ):
            while proc.pid not in network.netns_pids(netns) and time.monotonic() < deadline:
                time.sleep(0.01)
        deleted = network.destroy_topology(config)
        assert sorted(deleted) == sorted([pod, config.node_netns, config.laptop_netns])
        assert network.list_netns(config.netns_prefix) == [
            neighbour.laptop_netns,
            neighbour.node_netns,
        ]
        assert not list(Path("/etc/netns").glob(f"{config.netns_prefix}[lnp]*"))
        assert Path(f"/etc/netns/{neighbour.laptop_netns}/resolv.conf").exists()
        for proc in sleepers:
            assert proc.wait(timeout=5) == -9
        network.destroy_topology(config)  # again: nothing to do, no error
    finally:
        for proc in sleepers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        network.destroy_topology(config)
        network.destroy_topology(neighbour)
    assert network.list_netns(config.netns_prefix) == []


# -- --laptop-routes-pods (the benchmark's no-tunnel baseline) ---------------------------------


def test_laptop_routes_pods_reaches_pods_but_not_services() -> None:
    config = make_config(unique_name(), laptop_routes_pods=True)
    assert network.laptop_routes(config) == ["198.18.0.0/24", "10.244.0.0/16"]
    assert network.laptop_routes(make_config("x")) == ["198.18.0.0/24"]  # the default
    server: subprocess.Popen[str] | None = None
    try:
        network.create_topology(config)
        pod = config.pod_netns("uid-a")
        network.setup_pod_network(config, pod, POD_A, "default")
        server = Topology(config, pod, pod, []).serve(pod, 8080, "A")
        routes = {r["dst"]: r.get("gateway") for r in ip_json(config.laptop_netns, "route")}
        assert routes == {
            "10.244.0.0/16": "172.31.255.1",
            "172.31.255.0/30": None,
            "198.18.0.0/24": "172.31.255.1",
        }
        # Routed, not NATed: the pod sees the laptop's own address.
        assert tcp_ask(config.laptop_netns, POD_A, 8080) == "A 172.31.255.2"
        assert ping(config.laptop_netns, POD_A)
        assert tcp_ask(config.laptop_netns, "10.96.0.1", 443) == "error OSError"
    finally:
        network.destroy_topology(config)
        if server is not None:
            server.wait(timeout=5)
            if server.stdout is not None:
                server.stdout.close()
    assert network.list_netns(config.netns_prefix) == []
