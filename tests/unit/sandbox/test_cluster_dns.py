"""Cluster DNS: answers from a table of cases, then the UDP/TCP server on loopback."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import pytest
from dnslib import EDNS0, QTYPE, RCODE, RR, A, DNSRecord

from sandbox.cluster_dns import ClusterDnsServer, DnsSettings, Drop, Forward, Reply, plan_reply
from sandbox.cluster_dns_zone import Snapshot, answer, build_snapshot

Obj = dict[str, Any]


def svc(name: str, ns: str, cluster_ip: str, ports: list[Obj], **spec: Any) -> Obj:
    return {
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": cluster_ip, "ports": ports, **spec},
    }


def port(name: str, number: int, protocol: str = "TCP") -> Obj:
    return {"name": name, "port": number, "protocol": protocol}


SERVICES = [
    svc("kubernetes", "default", "10.96.0.1", [port("https", 443)]),
    svc("kube-dns", "kube-system", "10.96.0.10", [port("dns", 53, "UDP"), port("dns-tcp", 53)]),
    svc("echo", "default", "10.96.0.20", [port("http", 80), port("udp-echo", 8080, "UDP")]),
    svc("db", "data", "None", [port("pg", 5432)]),
    svc("empty", "data", "None", [port("pg", 5432)]),
    svc("bare", "data", "None", []),
    svc("ext", "default", "", [], type="ExternalName", externalName="example.com"),
]
ENDPOINTS = [
    {
        "metadata": {"name": "db", "namespace": "data"},
        "subsets": [
            {
                "addresses": [{"ip": "10.244.0.7", "hostname": "db-0"}, {"ip": "10.244.0.8"}],
                "notReadyAddresses": [{"ip": "10.244.0.9"}],
                "ports": [port("pg", 5432)],
            }
        ],
    },
    {
        "metadata": {"name": "empty", "namespace": "data"},
        "subsets": [{"notReadyAddresses": [{"ip": "10.244.0.10"}], "ports": [port("pg", 5432)]}],
    },
    {
        "metadata": {"name": "bare", "namespace": "data"},
        "subsets": [{"addresses": [{"ip": "10.244.0.11"}]}],
    },
    {
        "metadata": {"name": "echo", "namespace": "default"},
        "subsets": [{"addresses": [{"ip": "10.244.0.3"}], "ports": [port("http", 8080)]}],
    },
]
PODS: list[Obj] = [
    {
        "metadata": {"name": "lonely", "namespace": "apps"},
        "spec": {},
        "status": {"podIP": "10.244.0.20"},
    },
    {
        "metadata": {"name": "host", "namespace": "kube-system"},
        "spec": {"hostNetwork": True},
        "status": {"podIP": "172.31.255.1"},
    },
    {"metadata": {"name": "junk"}},  # malformed: skipped
]
SNAP = build_snapshot("cluster.local", SERVICES, ENDPOINTS, PODS)
D = "cluster.local"


def rdata(reply: DNSRecord, section: str = "rr") -> list[str]:
    return sorted(str(rr.rdata) for rr in getattr(reply, section))


# name, type, rcode, answer rdata, additional rdata
CASES: list[tuple[str, str, int, list[str], list[str]]] = [
    (f"echo.default.svc.{D}", "A", RCODE.NOERROR, ["10.96.0.20"], []),
    (f"ECHO.Default.svc.{D}.", "A", RCODE.NOERROR, ["10.96.0.20"], []),  # case-insensitive
    (f"kubernetes.default.svc.{D}", "A", RCODE.NOERROR, ["10.96.0.1"], []),
    (f"db.data.svc.{D}", "A", RCODE.NOERROR, ["10.244.0.7", "10.244.0.8"], []),  # headless
    (f"empty.data.svc.{D}", "A", RCODE.NXDOMAIN, [], []),  # headless, nothing ready
    (f"bare.data.svc.{D}", "A", RCODE.NOERROR, ["10.244.0.11"], []),  # headless, no ports
    (f"db-0.db.data.svc.{D}", "A", RCODE.NOERROR, ["10.244.0.7"], []),
    (f"10-244-0-8.db.data.svc.{D}", "A", RCODE.NOERROR, ["10.244.0.8"], []),
    (f"10-244-0-9.db.data.svc.{D}", "A", RCODE.NXDOMAIN, [], []),  # not ready
    (f"10-244-0-3.echo.default.svc.{D}", "A", RCODE.NOERROR, ["10.244.0.3"], []),
    (
        f"_http._tcp.echo.default.svc.{D}",
        "SRV",
        RCODE.NOERROR,
        [f"0 100 80 echo.default.svc.{D}."],
        ["10.96.0.20"],
    ),
    (
        f"_udp-echo._udp.echo.default.svc.{D}",
        "SRV",
        RCODE.NOERROR,
        [f"0 100 8080 echo.default.svc.{D}."],
        ["10.96.0.20"],
    ),
    (f"_http._udp.echo.default.svc.{D}", "SRV", RCODE.NXDOMAIN, [], []),
    (f"_nope._tcp.echo.default.svc.{D}", "SRV", RCODE.NXDOMAIN, [], []),
    (
        f"echo.default.svc.{D}",
        "SRV",
        RCODE.NOERROR,
        [f"0 50 80 echo.default.svc.{D}.", f"0 50 8080 echo.default.svc.{D}."],
        ["10.96.0.20"],
    ),
    (
        f"_pg._tcp.db.data.svc.{D}",
        "SRV",
        RCODE.NOERROR,
        [f"0 50 5432 10-244-0-8.db.data.svc.{D}.", f"0 50 5432 db-0.db.data.svc.{D}."],
        ["10.244.0.7", "10.244.0.8"],
    ),
    (f"_http._tcp.echo.default.svc.{D}", "A", RCODE.NOERROR, ["10.96.0.20"], []),
    (f"10-1-2-3.apps.pod.{D}", "A", RCODE.NOERROR, ["10.1.2.3"], []),
    (f"10-1-2.apps.pod.{D}", "A", RCODE.NXDOMAIN, [], []),
    (f"10-1-2-300.apps.pod.{D}", "A", RCODE.NXDOMAIN, [], []),
    (f"ext.default.svc.{D}", "A", RCODE.NOERROR, ["example.com."], []),
    ("20.0.96.10.in-addr.arpa", "PTR", RCODE.NOERROR, [f"echo.default.svc.{D}."], []),
    ("7.0.244.10.in-addr.arpa", "PTR", RCODE.NOERROR, [f"db-0.db.data.svc.{D}."], []),
    ("8.0.244.10.in-addr.arpa", "PTR", RCODE.NOERROR, [f"10-244-0-8.db.data.svc.{D}."], []),
    ("20.0.244.10.in-addr.arpa", "PTR", RCODE.NOERROR, [f"10-244-0-20.apps.pod.{D}."], []),
    # IPv4-only: existing names have no AAAA, and the answer is NODATA (NOERROR, SOA)
    (f"echo.default.svc.{D}", "AAAA", RCODE.NOERROR, [], []),
    (f"db.data.svc.{D}", "AAAA", RCODE.NOERROR, [], []),
    (f"echo.default.svc.{D}", "TXT", RCODE.NOERROR, [], []),
    (f"default.svc.{D}", "A", RCODE.NOERROR, [], []),
    (f"svc.{D}", "A", RCODE.NOERROR, [], []),
    (f"nowhere.svc.{D}", "A", RCODE.NXDOMAIN, [], []),
    (f"nope.default.svc.{D}", "A", RCODE.NXDOMAIN, [], []),
    (f"nope.default.svc.{D}", "AAAA", RCODE.NXDOMAIN, [], []),
    (f"echo.default.svc.{D}.default.svc.{D}", "A", RCODE.NXDOMAIN, [], []),  # search path
    (f"www.example.com.default.svc.{D}", "A", RCODE.NXDOMAIN, [], []),
    (f"a.b.c.d.echo.default.svc.{D}", "A", RCODE.NXDOMAIN, [], []),
    (f"foo.{D}", "A", RCODE.NXDOMAIN, [], []),
    (f"dns-version.{D}", "TXT", RCODE.NOERROR, ['"1.1.0"'], []),
    (D, "NS", RCODE.NOERROR, [f"ns.dns.{D}."], ["10.96.0.10"]),
    (D, "SOA", RCODE.NOERROR, [f"ns.dns.{D}. hostmaster.{D}. 1 7200 1800 86400 5"], []),
]


@pytest.mark.parametrize(("name", "qtype", "rcode", "answers", "additional"), CASES)
def test_answer(
    name: str, qtype: str, rcode: int, answers: list[str], additional: list[str]
) -> None:
    query = DNSRecord.question(name, qtype)
    reply = answer(query.pack(), SNAP)
    assert reply is not None
    assert reply.header.id == query.header.id
    assert reply.header.rcode == rcode
    assert reply.header.aa == 1
    assert rdata(reply) == answers
    assert rdata(reply, "ar") == additional
    assert all(rr.ttl == 5 for rr in reply.rr + reply.ar + reply.auth)
    assert str(reply.q.qname) == str(query.q.qname)  # the question as asked
    if answers:
        assert not reply.auth
        assert all(str(rr.rname) == str(query.q.qname) for rr in reply.rr)
    elif qtype != "SOA":
        (soa,) = reply.auth
        assert soa.rtype == QTYPE.SOA and str(soa.rname) == f"{D}."
        assert soa.rdata.times[-1] == 5  # negative TTL


@pytest.mark.parametrize(
    ("name", "qtype"),
    [
        ("example.com", "A"),
        ("cluster.local.example.com", "A"),
        ("kubernetes", "A"),
        ("1.1.168.192.in-addr.arpa", "PTR"),  # not a cluster address
        ("5.0.244.10.in-addr.arpa", "PTR"),
    ],
)
def test_names_outside_the_cluster_are_forwarded(name: str, qtype: str) -> None:
    assert answer(DNSRecord.question(name, qtype), SNAP) is None
    assert isinstance(plan_reply(DNSRecord.question(name, qtype).pack(), SNAP), Forward)


def test_other_cluster_domain() -> None:
    snap = build_snapshot("corp.internal.", SERVICES, ENDPOINTS, PODS)
    reply = answer(DNSRecord.question("echo.default.svc.corp.internal", "A"), snap)
    assert reply is not None and rdata(reply) == ["10.96.0.20"]
    assert answer(DNSRecord.question(f"echo.default.svc.{D}", "A"), snap) is None


def _header(ident: int, flags: int, qd: int = 1) -> bytes:
    return struct.pack("!HHHHHH", ident, flags, qd, 0, 0, 0)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "drop"),
        (b"\x12\x34\x01", "drop"),
        (_header(0x1234, 0x0100) + b"\x07truncat", RCODE.FORMERR),  # question cut short
        (_header(0x1234, 0x0100, qd=0), RCODE.FORMERR),  # no question
        (_header(0x1234, 0x0100, qd=2) + (b"\x01a\x00\x00\x01\x00\x01" * 2), RCODE.FORMERR),
        (_header(0x1234, 0x8100) + b"\x01a\x00\x00\x01\x00\x01", "drop"),  # a response
        (_header(0x1234, 0x2100) + b"\x01a\x00\x00\x01\x00\x01", RCODE.NOTIMP),  # UPDATE
        (_header(0x1234, 0x0100) + b"\xc0\x0c\x00\x01\x00\x01", RCODE.FORMERR),  # pointer loop
        (_header(0x1234, 0x0100) + b"\x01a\x00\x00", RCODE.FORMERR),  # qtype cut
    ],
)
def test_malformed_queries(data: bytes, expected: object) -> None:
    decision = plan_reply(data, SNAP)
    if expected == "drop":
        assert isinstance(decision, Drop)
        return
    assert isinstance(decision, Reply)
    assert decision.record.header.rcode == expected
    assert decision.record.header.id == 0x1234
    assert decision.record.header.qr == 1


def test_edns_query_gets_opt_and_larger_udp_limit() -> None:
    query = DNSRecord.question(f"echo.default.svc.{D}")
    query.add_ar(EDNS0(udp_len=4096))
    decision = plan_reply(query.pack(), SNAP)
    assert isinstance(decision, Reply)
    assert decision.max_udp == 4096
    assert [rr.rtype for rr in decision.record.ar] == [QTYPE.OPT]


# -- the server on loopback ---------------------------------------------------------------


class FakeUpstream(asyncio.DatagramProtocol):
    """Answers every A query with 203.0.113.7 (UDP), unless told to stay silent."""

    def __init__(self) -> None:
        self.silent = False
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.silent:
            self.transport.sendto(self.reply(data), addr)

    @staticmethod
    def reply(data: bytes) -> bytes:
        query = DNSRecord.parse(data)
        reply = query.reply()
        reply.add_answer(RR(query.q.qname, QTYPE.A, ttl=60, rdata=A("203.0.113.7")))
        packed: bytes = reply.pack()
        return packed


async def _tcp_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    (size,) = struct.unpack("!H", await reader.readexactly(2))
    out = FakeUpstream.reply(await reader.readexactly(size))
    writer.write(struct.pack("!H", len(out)) + out)
    await writer.drain()
    writer.close()


async def udp_ask(addr: tuple[str, int], data: bytes, timeout: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, reply: bytes, _: Any) -> None:
            if not got.done():
                got.set_result(reply)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=addr)
    try:
        transport.sendto(data)
        return await asyncio.wait_for(got, timeout)
    finally:
        transport.close()


async def tcp_ask(addr: tuple[str, int], *queries: bytes) -> list[bytes]:
    reader, writer = await asyncio.open_connection(*addr)
    out = []
    try:
        for data in queries:
            writer.write(struct.pack("!H", len(data)) + data)
            await writer.drain()
            (size,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 5))
            out.append(await reader.readexactly(size))
    finally:
        writer.close()
    return out


@pytest.fixture
async def dns() -> Any:
    loop = asyncio.get_running_loop()
    upstream = FakeUpstream()
    up_transport, _ = await loop.create_datagram_endpoint(
        lambda: upstream, local_addr=("127.0.0.1", 0)
    )
    up_port = up_transport.get_extra_info("sockname")[1]
    tcp_up = await asyncio.start_server(_tcp_upstream, "127.0.0.1", up_port)
    settings = DnsSettings.from_env(
        {"DNS_LISTEN": "127.0.0.1:0", "UPSTREAM_DNS": f"127.0.0.1:{up_port}"}
    )
    settings = DnsSettings(settings.domain, settings.upstream, settings.listen, forward_timeout=0.3)
    server = ClusterDnsServer(settings, SNAP)
    await server.start()
    try:
        yield server, upstream
    finally:
        await server.stop()
        up_transport.close()
        tcp_up.close()
        await tcp_up.wait_closed()


async def test_server_answers_udp_and_tcp(dns: Any) -> None:
    server, upstream = dns
    addr = server.address
    query = DNSRecord.question(f"echo.default.svc.{D}")
    reply = DNSRecord.parse(await udp_ask(addr, query.pack()))
    assert reply.header.id == query.header.id and rdata(reply) == ["10.96.0.20"]

    outside = DNSRecord.question("example.com")
    srv = DNSRecord.question(f"_pg._tcp.db.data.svc.{D}", "SRV")
    tcp_replies = [DNSRecord.parse(r) for r in await tcp_ask(addr, srv.pack(), outside.pack())]
    assert len(tcp_replies[0].rr) == 2
    assert rdata(tcp_replies[1]) == ["203.0.113.7"]  # relayed from the TCP upstream
    assert tcp_replies[1].header.id == outside.header.id

    relayed = DNSRecord.parse(await udp_ask(addr, outside.pack()))
    assert rdata(relayed) == ["203.0.113.7"] and relayed.header.id == outside.header.id

    # A new snapshot is visible to the next query.
    server.snapshot = build_snapshot(
        D, [svc("new", "default", "10.96.0.99", [port("p", 1)])], [], []
    )
    reply = DNSRecord.parse(await udp_ask(addr, DNSRecord.question(f"new.default.svc.{D}").pack()))
    assert rdata(reply) == ["10.96.0.99"]
    assert server.stats.forwarded == 2 and server.stats.answered == 3


async def test_server_servfail_when_upstream_is_silent(dns: Any) -> None:
    server, upstream = dns
    upstream.silent = True
    query = DNSRecord.question("example.org")
    reply = DNSRecord.parse(await udp_ask(server.address, query.pack()))
    assert reply.header.rcode == RCODE.SERVFAIL and reply.header.id == query.header.id
    assert server.stats.upstream_failures == 1


async def test_server_survives_garbage(dns: Any) -> None:
    server, _ = dns
    addr = server.address
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for junk in (b"", b"\x00", b"\xff" * 700, _header(7, 0x0100) + b"\x3f"):
            sock.sendto(junk, addr)
    finally:
        sock.close()
    formerr = DNSRecord.parse(await udp_ask(addr, _header(9, 0x0100, qd=0)))
    assert formerr.header.rcode == RCODE.FORMERR and formerr.header.id == 9
    # TCP: garbage after a header gets FORMERR and the connection stays usable; a message
    # too short to answer makes the server hang up.
    replies = await tcp_ask(
        addr, _header(11, 0x0100) + b"\x3f", DNSRecord.question(f"svc.{D}").pack()
    )
    assert DNSRecord.parse(replies[0]).header.rcode == RCODE.FORMERR
    assert DNSRecord.parse(replies[1]).header.rcode == RCODE.NOERROR
    with pytest.raises(asyncio.IncompleteReadError):
        await tcp_ask(addr, b"\x01\x02\x03")
    reply = DNSRecord.parse(await udp_ask(addr, DNSRecord.question(f"echo.default.svc.{D}").pack()))
    assert rdata(reply) == ["10.96.0.20"]
    assert server.stats.dropped >= 2 and server.stats.formerr >= 2


async def test_udp_truncation_for_large_answers(dns: Any) -> None:
    server, _ = dns
    addresses = [{"ip": f"10.244.{i // 250}.{i % 250 + 1}"} for i in range(60)]
    server.snapshot = build_snapshot(
        D,
        [svc("big", "default", "None", [port("p", 1)])],
        [
            {
                "metadata": {"name": "big", "namespace": "default"},
                "subsets": [{"addresses": addresses, "ports": [port("p", 1)]}],
            }
        ],
        [],
    )
    query = DNSRecord.question(f"big.default.svc.{D}")
    udp = DNSRecord.parse(await udp_ask(server.address, query.pack()))
    assert udp.header.tc == 1 and not udp.rr
    (tcp,) = await tcp_ask(server.address, query.pack())
    assert len(DNSRecord.parse(tcp).rr) == 60


def test_settings_from_env() -> None:
    s = DnsSettings.from_env(
        {
            "CLUSTER_DOMAIN": "Corp.Local.",
            "UPSTREAM_DNS": "10.0.0.2",
            "KVPN_SANDBOX_KUBECONFIG": "/k",
        }
    )
    assert (s.domain, s.upstream, s.listen, s.kubeconfig) == (
        "corp.local",
        ("10.0.0.2", 53),
        ("0.0.0.0", 53),
        "/k",
    )


def test_empty_snapshot_knows_nothing() -> None:
    reply = answer(DNSRecord.question(f"echo.default.svc.{D}"), Snapshot())
    assert reply is not None and reply.header.rcode == RCODE.NXDOMAIN


# -- against the sandbox API server: list + watch with the official client --------------------


async def test_cluster_dns_follows_the_api_server(tmp_path: Any) -> None:
    import yaml
    from aiohttp import web

    from sandbox.apiserver import resources as R
    from sandbox.apiserver.api import Api
    from sandbox.apiserver.app import build_app
    from sandbox.apiserver.store import Store
    from sandbox.cluster_dns import ClusterDns
    from sandbox.config import SandboxConfig

    api = Api(Store(), SandboxConfig("dnstest"))
    api.create(R.NAMESPACES, None, {"metadata": {"name": "default"}})
    api.create(R.SERVICES, "default", svc("first", "default", "10.96.0.40", [port("p", 80)]))
    runner = web.AppRunner(build_app(api, token="tok", streams=None, bookmark_interval=0.3))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    api_port = runner.addresses[0][1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "t",
                "clusters": [{"name": "t", "cluster": {"server": f"http://127.0.0.1:{api_port}"}}],
                "users": [{"name": "t", "user": {"token": "tok"}}],
                "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}],
            }
        )
    )
    settings = DnsSettings.from_env(
        {
            "DNS_LISTEN": "127.0.0.1:0",
            "UPSTREAM_DNS": "127.0.0.1:9",
            "KVPN_SANDBOX_KUBECONFIG": str(kubeconfig),
        }
    )
    dns = ClusterDns(settings)
    dns.watcher.watch_timeout = 1
    await dns.start()

    async def resolve(name: str) -> DNSRecord:
        return DNSRecord.parse(await udp_ask(dns.server.address, DNSRecord.question(name).pack()))

    async def eventually(name: str, want: list[str]) -> None:
        deadline = asyncio.get_running_loop().time() + 10
        while rdata(await resolve(name)) != want:
            assert asyncio.get_running_loop().time() < deadline, f"{name} never became {want}"
            await asyncio.sleep(0.05)

    try:
        # Listed before the listeners opened: known at once.
        assert rdata(await resolve(f"first.default.svc.{D}")) == ["10.96.0.40"]
        # Watched: a new service, then its deletion.
        api.create(R.SERVICES, "default", svc("second", "default", "10.96.0.41", [port("p", 80)]))
        await eventually(f"second.default.svc.{D}", ["10.96.0.41"])
        api.delete(R.SERVICES, "default", "first")
        await eventually(f"first.default.svc.{D}", [])
        assert (await resolve(f"first.default.svc.{D}")).header.rcode == RCODE.NXDOMAIN
        # Endpoints and pods are watched too.
        api.create(R.SERVICES, "default", svc("hl", "default", "None", [port("p", 80)]))
        api.create(
            R.ENDPOINTS,
            "default",
            {
                "metadata": {"name": "hl"},
                "subsets": [{"addresses": [{"ip": "10.244.0.50"}], "ports": [port("p", 80)]}],
            },
        )
        await eventually(f"hl.default.svc.{D}", ["10.244.0.50"])
    finally:
        await dns.stop()
        await asyncio.to_thread(dns.watcher.join, 5)
        await runner.cleanup()


def test_watcher_relists_after_gone() -> None:
    """At the client boundary: a 410 from the watch makes the watcher list again."""
    import json

    from kubernetes.client.exceptions import ApiException

    from sandbox.cluster_dns import KubeWatcher

    first = svc("first", "default", "10.96.0.40", [port("p", 80)])
    second = svc("second", "default", "10.96.0.41", [port("p", 80)])
    lists: list[str] = []
    watches: list[str] = []
    changes: list[list[str]] = []

    class Response:
        def __init__(self, body: Obj) -> None:
            self.data = json.dumps(body).encode()

    def list_services(**kwargs: Any) -> Response:
        lists.append(str(kwargs.get("_preload_content")))
        return Response({"metadata": {"resourceVersion": str(10 * len(lists))}, "items": [first]})

    watcher = KubeWatcher(api_client=None, on_change=lambda: None)

    def on_change() -> None:
        changes.append(sorted(o["metadata"]["name"] for o in watcher.objects("services")))

    watcher.on_change = on_change

    class FakeWatch:
        def stream(self, fn: Any, **kwargs: Any) -> Any:
            watches.append(kwargs["resource_version"])
            if len(watches) == 1:
                yield {"type": "ADDED", "object": second}
                yield {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "15"}}}
                yield {"type": "MODIFIED", "object": "garbage"}  # ignored
                raise ApiException(status=410, reason="Expired")
            watcher.stop()
            yield {"type": "DELETED", "object": first}

        def stop(self) -> None:
            pass

    watcher.watch_factory = FakeWatch
    watcher.list_functions = {"services": list_services}
    watcher._run("services")
    assert lists == ["False", "False"]  # listed, then listed again after the 410
    assert watches == ["10", "20"]
    assert changes == [["first"], ["first", "second"], ["first"], []]
    assert watcher.synced is False  # only services were listed here
