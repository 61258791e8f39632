"""Cluster DNS through `kvpn connect` (issue 4), from the sandbox's laptop namespace.

Programs in the laptop resolve cluster names through the system resolver (getent, curl: glibc
reading the laptop's bind-mounted resolv.conf), external names keep going straight to the
laptop's own server 198.18.0.53 (proved with a packet capture in the laptop namespace), and
the laptop's resolv.conf comes back byte for byte after Ctrl-C and after ``kill -9``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import statistics
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dnslib import QTYPE, RCODE, DNSRecord
from kubernetes import client

from tests.sandbox import support
from tests.sandbox.support import Cluster

RESOLVER = "198.19.255.1"  # DataPlaneConfig.tun_address
OUTSIDE_DNS = "198.18.0.53"
OUTSIDE_WEB = "198.18.0.80"
TUN = "kvpn0"
# The laptop's resolv.conf during this module: a comment, an option, no final newline - so
# "byte for byte" means something.
ORIGINAL_RESOLV_CONF = (
    b"# the laptop's own resolver settings; kvpn must put these exact bytes back\n"
    b"nameserver 198.18.0.53\n"
    b"options edns0 timeout:2"
)
KVPN_MARKER = b"# kvpn: "
CONNECT_TIMEOUT = 90.0


# -- a kvpn connect process in the laptop namespace ------------------------------------------


class KvpnProcess(support.KvpnProcess):
    """``kvpn connect [args]`` in the laptop namespace."""

    def __init__(self, cluster: Cluster, *args: str) -> None:
        super().__init__(cluster, "connect", *args)

    def interrupt(self) -> int:
        """Ctrl-C, as a user would; the exit code."""
        return self.stop(signal.SIGINT)

    def kill_hard(self) -> None:
        self.stop(signal.SIGKILL)  # nothing is undone


@dataclass
class Connections:
    """The module's kvpn connect: started on first use, stopped by a test or at module end."""

    cluster: Cluster
    current: KvpnProcess | None = None

    def running(self) -> KvpnProcess:
        if self.current is None or self.current.proc.poll() is not None:
            self.current = KvpnProcess(self.cluster)
            self.current.wait_for("connected")
        return self.current

    def stop(self) -> KvpnProcess | None:
        process, self.current = self.current, None
        if process is not None:
            process.interrupt()
        return process


def dns_journal() -> Path:
    """kvpn's DNS journal folder for the laptop (one per network namespace)."""
    return Path("/run/kvpn/dns") / f"netns-{os.stat('/proc/thread-self/ns/net').st_ino}"


def _write_in_place(path: Path, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(data)


@pytest.fixture(scope="module")
def resolv_conf(cluster: Cluster) -> Iterator[Path]:
    """The laptop's resolv.conf (what ``ip netns exec`` bind-mounts), set to our original."""
    path = Path("/etc/netns") / cluster.config.laptop_netns / "resolv.conf"
    before = path.read_bytes()
    _write_in_place(path, ORIGINAL_RESOLV_CONF)
    try:
        yield path
    finally:
        _write_in_place(path, before)


@pytest.fixture(scope="module")
def connections(cluster: Cluster, resolv_conf: Path) -> Iterator[Connections]:
    manager = Connections(cluster)
    try:
        yield manager
    finally:
        manager.stop()


@pytest.fixture
def kvpn(connections: Connections) -> KvpnProcess:
    return connections.running()


# -- looking things up -------------------------------------------------------------------


def getent(cluster: Cluster, database: str, name: str) -> list[list[str]]:
    result = cluster.in_laptop(["getent", database, name])
    assert result.returncode == 0, f"getent {database} {name}: {result.returncode}"
    return [line.split() for line in result.stdout.splitlines()]


def ask(
    server: str, name: str, qtype: str = "A", *, timeout: float = 3.0, attempts: int = 1
) -> tuple[DNSRecord, float]:
    """A query over UDP from the laptop namespace (this thread's); the answer and seconds.

    *attempts* > 1 resends after each *timeout*, as a stub resolver does (UDP may drop).
    """
    query = DNSRecord.question(name, qtype)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    try:
        started = time.perf_counter()
        for attempt in range(attempts):
            sock.sendto(query.pack(), (server, 53))
            try:
                while True:
                    data = sock.recv(65535)
                    if data[:2] == query.pack()[:2]:
                        return DNSRecord.parse(data), time.perf_counter() - started
            except TimeoutError:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")
    finally:
        sock.close()


def outside_count(name: str) -> int:
    """How often the outside DNS has been asked *name* (its ``stats.example.test`` TXT)."""
    answer, _ = ask(OUTSIDE_DNS, "stats.example.test", "TXT")
    for rr in answer.rr:
        for part in rr.rdata.data:
            key, _, value = part.decode().partition("=")
            if key == name:
                return int(value)
    return 0


@dataclass(frozen=True)
class SeenDns:
    interface: str
    src: str
    dst: str
    name: str
    qtype: str
    response: bool
    answers: tuple[str, ...]


class DnsSniffer:
    """Every UDP DNS packet on every interface of this thread's namespace (AF_PACKET)."""

    LINK_HEADER = {1: 14, 772: 14, 65534: 0}  # ARPHRD_ETHER, ARPHRD_LOOPBACK, ARPHRD_NONE (TUN)

    def __init__(self) -> None:
        self.seen: list[SeenDns] = []
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DnsSniffer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _run(self) -> None:
        idle_since = time.monotonic()
        # After stop: read on until nothing arrived for 0.3 s, so no queued packet is missed.
        while not self._stop.is_set() or time.monotonic() - idle_since < 0.3:
            try:
                frame, address = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            idle_since = time.monotonic()
            seen = self._parse(frame, address)
            if seen is not None:
                self.seen.append(seen)

    def _parse(self, frame: bytes, address: tuple[object, ...]) -> SeenDns | None:
        offset = self.LINK_HEADER.get(int(str(address[3])))
        if offset is None or len(frame) < offset + 28:
            return None
        ip = frame[offset:]
        if ip[0] >> 4 != 4 or ip[9] != 17:
            return None
        ihl = (ip[0] & 0xF) * 4
        sport, dport = struct.unpack_from("!HH", ip, ihl)
        if 53 not in (sport, dport):
            return None
        try:
            message = DNSRecord.parse(ip[ihl + 8 :])
        except Exception:
            return None
        if not message.questions:
            return None
        return SeenDns(
            interface=str(address[0]),
            src=socket.inet_ntoa(ip[12:16]),
            dst=socket.inet_ntoa(ip[16:20]),
            name=str(message.q.qname).rstrip(".").lower(),
            qtype=QTYPE[message.q.qtype],
            response=bool(message.header.qr),
            answers=tuple(str(rr.rdata) for rr in message.rr),
        )

    def about(self, name: str) -> list[SeenDns]:
        return [s for s in self.seen if s.name == name]


# -- the tests ---------------------------------------------------------------------------


def _echo_ip(core: client.CoreV1Api) -> str:
    service: Any = core.read_namespaced_service("echo", "default")
    return str(service.spec.cluster_ip)


def test_connected_line_names_the_dns_mode(kvpn: KvpnProcess, resolv_conf: Path) -> None:
    line = kvpn.wait_for("connected")
    assert "DNS: resolv.conf, resolver 198.19.255.1:53" in line
    written = resolv_conf.read_bytes()
    assert written.startswith(KVPN_MARKER)
    assert b"nameserver 198.19.255.1\nnameserver 198.18.0.53\n" in written
    assert b"search default.svc.cluster.local svc.cluster.local cluster.local\n" in written
    owner = json.loads((dns_journal() / "owner.json").read_text())
    assert owner["pid"] == kvpn.proc.pid
    session = json.loads(Path(f"/run/kvpn/sessions/{owner['session']}.json").read_text())
    assert session["dns"]["mode"] == "resolv.conf"
    assert session["dns"]["resolver"] == f"{RESOLVER}:53"


def test_service_names_resolve_to_the_cluster_ip(
    cluster: Cluster, core: client.CoreV1Api, kvpn: KvpnProcess
) -> None:
    ip = _echo_ip(core)
    for name in ("echo", "echo.default", "echo.default.svc", "echo.default.svc.cluster.local"):
        rows = getent(cluster, "hosts", name)
        assert rows[0][0] == ip, (name, rows)
    # ...and back: PTR for the ClusterIP, through the reverse zone of the service CIDR.
    assert "echo.default.svc.cluster.local" in getent(cluster, "hosts", ip)[0]


def test_srv_records_including_the_short_form(kvpn: KvpnProcess) -> None:
    for name in ("_http._tcp.echo.default.svc.cluster.local", "_http._tcp.echo.default"):
        answer, _ = ask(RESOLVER, name, "SRV", timeout=2, attempts=2)
        assert answer.header.rcode == RCODE.NOERROR
        assert [str(rr.rname).rstrip(".") for rr in answer.rr] == [name]  # the name asked
        assert [(rr.rdata.port, str(rr.rdata.target)) for rr in answer.rr] == [
            (80, "echo.default.svc.cluster.local.")
        ]


def test_curl_echo_by_name(cluster: Cluster, kvpn: KvpnProcess) -> None:
    result = cluster.in_laptop(["curl", "-s", "-m", "10", "http://echo/"])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pod"].startswith("echo-")


def test_headless_service_gives_the_pod_ips(
    cluster: Cluster, core: client.CoreV1Api, kvpn: KvpnProcess
) -> None:
    name = "echo-headless-" + os.urandom(2).hex()
    core.create_namespaced_service(
        "default",
        {  # type: ignore[arg-type]
            "metadata": {"name": name},
            "spec": {
                "clusterIP": "None",
                "selector": {"app": "echo"},
                "ports": [{"port": 80, "targetPort": 8080}],
            },
        },
    )
    try:
        pods: list[Any] = core.list_namespaced_pod("default", label_selector="app=echo").items
        want = {p.status.pod_ip for p in pods if p.status.pod_ip}
        assert len(want) >= 2
        deadline = time.monotonic() + 30
        got: set[str] = set()
        while got != want and time.monotonic() < deadline:
            result = cluster.in_laptop(["getent", "ahostsv4", name])
            got = {line.split()[0] for line in result.stdout.splitlines()}
            if got != want:
                time.sleep(1)  # the cluster DNS follows the Endpoints (answers have TTL 5)
        assert got == want
    finally:
        core.delete_namespaced_service(name, "default")


def test_external_names_go_straight_to_the_laptops_server(
    cluster: Cluster, kvpn: KvpnProcess
) -> None:
    before = outside_count("example.test")
    with DnsSniffer() as sniffer:
        rows = getent(cluster, "ahostsv4", "example.test")
        # A cluster name in the same capture shows what a trip through the tunnel looks like.
        getent(cluster, "ahostsv4", "kubernetes.default.svc.cluster.local")
    assert {row[0] for row in rows} == {OUTSIDE_WEB}
    assert outside_count("example.test") == before + 1

    external = sniffer.about("example.test")
    # glibc asked kvpn's resolver (on the TUN address, delivered over lo), and kvpn answered.
    assert any(s.dst == RESOLVER and not s.response for s in external), external
    assert any(s.src == RESOLVER and s.response and OUTSIDE_WEB in s.answers for s in external)
    # kvpn asked 198.18.0.53 itself, over the laptop's own link...
    upstream = [s for s in external if s.dst == OUTSIDE_DNS and not s.response]
    assert upstream and all(s.interface not in (TUN, "lo") for s in upstream), external
    # ...and nothing about example.test entered the tunnel,
    assert [s for s in external if s.interface == TUN] == []
    # while the cluster name did, to the cluster's DNS.
    cluster_name = sniffer.about("kubernetes.default.svc.cluster.local")
    assert any(s.interface == TUN and not s.response for s in cluster_name), sniffer.seen


def test_aaaa_for_a_cluster_name_is_answered_at_once_and_empty(kvpn: KvpnProcess) -> None:
    with DnsSniffer() as sniffer:
        answer, _ = ask(RESOLVER, "echo.default.svc.cluster.local", "AAAA")
    assert answer.header.rcode == RCODE.NOERROR
    assert answer.rr == []
    assert [QTYPE[rr.rtype] for rr in answer.auth] == ["SOA"]  # cacheable NODATA
    # Answered by kvpn itself: no AAAA query went to the cluster.
    assert [s for s in sniffer.seen if s.interface == TUN and s.qtype == "AAAA"] == []


def test_malformed_queries_get_formerr_and_the_resolver_keeps_answering(
    core: client.CoreV1Api, kvpn: KvpnProcess
) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(3)
    sock.connect((RESOLVER, 53))
    try:
        # A header promising one question, then half a name.
        sock.send(struct.pack("!6H", 0xBEEF, 0x0100, 1, 0, 0, 0) + b"\x07exam")
        reply = sock.recv(512)
        ident, flags = struct.unpack_from("!HH", reply)
        assert ident == 0xBEEF and flags & 0x8000 and flags & 0xF == RCODE.FORMERR
        # A stream of garbage: random bytes, and valid queries with bytes flipped or cut.
        rng = random.Random(4)
        valid = DNSRecord.question("echo.default.svc.cluster.local").pack()
        for i in range(300):
            if i % 3 == 0:
                junk = rng.randbytes(rng.randrange(0, 600))
            else:
                cut = bytearray(valid[: rng.randrange(0, len(valid) + 1)])
                for _ in range(rng.randrange(1, 4)):
                    if cut:
                        cut[rng.randrange(len(cut))] = rng.randrange(256)
                junk = bytes(cut)
            sock.send(junk)
        # Whatever was answered is an error reply (a flood this fast also overflows the
        # listener's socket buffer: the kernel drops some, as it may drop any datagram).
        sock.settimeout(0.5)
        with contextlib.suppress(TimeoutError):
            while reply := sock.recv(65535):
                assert reply[2] & 0x80  # a response
    finally:
        sock.close()
    # Still answering, both ways (with a stub resolver's retry, as UDP may drop).
    answer, _ = ask(RESOLVER, "echo.default.svc.cluster.local", timeout=1, attempts=3)
    assert [str(rr.rdata) for rr in answer.rr] == [_echo_ip(core)]
    answer, _ = ask(RESOLVER, "example.test", timeout=1, attempts=3)
    assert [str(rr.rdata) for rr in answer.rr] == [OUTSIDE_WEB]


def test_lookup_times(kvpn: KvpnProcess) -> None:
    """Measured, not asserted: uncached cluster names vs external names (medians)."""
    rounds = 15
    tag = os.urandom(2).hex()
    timings: dict[str, list[float]] = {"cluster": [], "external": [], "external direct": []}
    for i in range(rounds):
        answer, seconds = ask(RESOLVER, f"nx{tag}{i}.default.svc.cluster.local")
        assert answer.header.rcode == RCODE.NXDOMAIN
        timings["cluster"].append(seconds)
        answer, seconds = ask(RESOLVER, f"nx{tag}{i}.example.test")
        assert answer.header.rcode == RCODE.NXDOMAIN
        timings["external"].append(seconds)
        answer, seconds = ask(OUTSIDE_DNS, f"nx{tag}{i}b.example.test")
        timings["external direct"].append(seconds)
    summary = ", ".join(
        f"{what} {statistics.median(values) * 1000:.2f} ms" for what, values in timings.items()
    )
    print(f"\nmedian uncached lookup through kvpn's resolver: {summary}")


def test_ctrl_c_puts_resolv_conf_back_byte_for_byte(
    cluster: Cluster, connections: Connections, resolv_conf: Path
) -> None:
    connections.running()
    assert resolv_conf.read_bytes() != ORIGINAL_RESOLV_CONF
    process = connections.stop()
    assert process is not None
    assert process.proc.returncode == 0, process.output
    assert resolv_conf.read_bytes() == ORIGINAL_RESOLV_CONF
    assert not dns_journal().exists()
    assert cluster.in_laptop(["ip", "-o", "link", "show", "type", "tun"]).stdout == ""
    # Nothing listens on the resolver address any more; names resolve as before kvpn.
    assert getent(cluster, "ahostsv4", "example.test")[0][0] == OUTSIDE_WEB
    assert cluster.in_laptop(["getent", "hosts", "echo"]).returncode != 0


def test_after_kill_9_the_next_connect_restores_resolv_conf(
    cluster: Cluster, core: client.CoreV1Api, connections: Connections, resolv_conf: Path
) -> None:
    connections.stop()
    crashed = KvpnProcess(cluster)
    try:
        crashed.wait_for("connected")
        crashed_pod = crashed.shadow_pod()
    finally:
        crashed.kill_hard()
    session = crashed_pod.removeprefix("kvpn-shadow-")
    try:
        # The crash left kvpn's resolv.conf (its fallback line still names the laptop's server)
        # and the journal naming the dead owner.
        assert resolv_conf.read_bytes().startswith(KVPN_MARKER)
        owner = json.loads((dns_journal() / "owner.json").read_text())
        assert owner["pid"] == crashed.proc.pid
        assert (dns_journal() / "dns-os-state.json").exists()
        assert getent(cluster, "ahostsv4", "example.test")[0][0] == OUTSIDE_WEB

        # The next connect finds the crashed session's DNS journal and restores it first;
        # with --dns-mode off it leaves DNS alone afterwards, so the restore itself shows.
        nxt = KvpnProcess(cluster, "--dns-mode", "off")
        try:
            line = nxt.wait_for("connected")
            assert "DNS: off" in line
            restored = nxt.wait_for("kvpn: restored the DNS settings", 1)
            assert f"kvpn session {session} " in restored
            assert resolv_conf.read_bytes() == ORIGINAL_RESOLV_CONF
            assert not dns_journal().exists()
        finally:
            assert nxt.interrupt() == 0, nxt.output
        assert resolv_conf.read_bytes() == ORIGINAL_RESOLV_CONF

        # And a normal session afterwards starts from a clean slate and cleans up after itself.
        again = KvpnProcess(cluster)
        try:
            assert "DNS: resolv.conf" in again.wait_for("connected")
            assert "restored the DNS settings" not in again.output
        finally:
            assert again.interrupt() == 0, again.output
        assert resolv_conf.read_bytes() == ORIGINAL_RESOLV_CONF
    finally:
        # What only `kvpn clean` (issue 9) will undo: the crashed session's pod and file.
        core.delete_namespaced_pod(crashed_pod, "default", grace_period_seconds=0)
        Path(f"/run/kvpn/sessions/{session}.json").unlink(missing_ok=True)


def test_hosts_mode_lists_services_and_keeps_them_current(
    cluster: Cluster, core: client.CoreV1Api, connections: Connections, resolv_conf: Path
) -> None:
    connections.stop()
    # ``ip netns exec`` bind-mounts every file of /etc/netns/<ns>/ over /etc: give the laptop
    # its own hosts file, and check that it is the one the laptop sees before kvpn edits it.
    hosts = resolv_conf.parent / "hosts"
    original = b"127.0.0.1\tlocalhost\n# the laptop's own hosts file\n198.18.0.80\tweb.laptop"
    hosts.write_bytes(original)
    name = "late-" + os.urandom(2).hex()
    try:
        assert cluster.in_laptop(["cat", "/etc/hosts"]).stdout.encode() == original
        process = KvpnProcess(cluster, "--dns-mode", "hosts")
        try:
            assert "DNS: hosts, resolver 198.19.255.1:53" in process.wait_for("connected")
            assert resolv_conf.read_bytes() == ORIGINAL_RESOLV_CONF  # not touched in hosts mode
            assert hosts.read_bytes().startswith(original + b"\n# BEGIN kvpn")
            ip = _echo_ip(core)
            for short in ("echo", "echo.default", "echo.default.svc.cluster.local"):
                assert getent(cluster, "hosts", short)[0][0] == ip
            # A service made while connected appears at the next refresh (every 15 s).
            core.create_namespaced_service(
                "default",
                {  # type: ignore[arg-type]
                    "metadata": {"name": name},
                    "spec": {"selector": {"app": "echo"}, "ports": [{"port": 81}]},
                },
            )
            late: Any = core.read_namespaced_service(name, "default")
            deadline = time.monotonic() + 40
            while name.encode() not in hosts.read_bytes() and time.monotonic() < deadline:
                time.sleep(0.5)
            assert getent(cluster, "hosts", name)[0][0] == late.spec.cluster_ip
        finally:
            assert process.interrupt() == 0, process.output
        assert hosts.read_bytes() == original
        assert not dns_journal().exists()
    finally:
        with contextlib.suppress(client.ApiException):
            core.delete_namespaced_service(name, "default")
        hosts.unlink()
