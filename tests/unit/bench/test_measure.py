"""bench.measure and bench.server against each other on loopback, plus the pure helpers.

No speed is asserted: the runs are tiny and only check that every measurement kind and the
server agree on the protocol and report sane counts.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import pytest
from dnslib import QTYPE, DNSRecord

from bench import measure
from bench.processes import measure_argv, parse_measure_output
from bench.server import HEADER, OP_ECHO, header, serve_forever


@pytest.fixture
def server() -> Iterator[int]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    thread = threading.Thread(target=serve_forever, args=(listener,), daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (Linux)
        listener.close()
        thread.join(5)
        assert not thread.is_alive()


def run(kind: str, port: int, *options: str) -> dict[str, object]:
    args = measure.parse_args([kind, "--host", "127.0.0.1", "--port", str(port), *options])
    return measure.KINDS[kind](args)


def test_header_layout() -> None:
    assert header(OP_ECHO) == b"E" + bytes(8)
    assert header(b"D", 1500) == b"D" + (1500).to_bytes(8, "big")
    assert HEADER.size == 9


@pytest.mark.parametrize("kind", ["up", "down"])
@pytest.mark.parametrize("streams", ["1", "3"])
def test_bulk_counts_bytes(server: int, kind: str, streams: str) -> None:
    result = run(kind, server, "--streams", streams, "--seconds", "0.05")
    assert result["ok"] is True, result
    assert result["streams"] == int(streams)
    assert isinstance(result["bytes"], int) and result["bytes"] > 0
    assert isinstance(result["seconds"], float) and result["seconds"] > 0


def test_rtt_connrate_concurrent_whoami(server: int) -> None:
    rtt = run("rtt", server, "--count", "20", "--warmup", "5")
    assert rtt["ok"] is True and isinstance(rtt["samples_us"], list)
    assert len(rtt["samples_us"]) == 20
    rate = run("connrate", server, "--count", "5", "--seconds", "10")
    assert rate["ok"] is True and rate["connections"] == 5
    conc = run("conc", server, "--count", "30", "--seconds", "10")
    assert conc == {**conc, "ok": True, "succeeded": 30, "attempted": 30, "errors": []}
    assert run("whoami", server) == {"ok": True, "peer": "127.0.0.1"}
    assert run("wait", server, "--seconds", "5") == {"ok": True}


def test_refused_and_unanswered_are_reported_not_raised() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: connections are refused
        conc = run("conc", port, "--count", "3", "--seconds", "2")
        assert conc["ok"] is False and conc["succeeded"] == 0
        assert run("wait", port, "--seconds", "0.2")["ok"] is False
        rate = run("connrate", port, "--count", "3", "--seconds", "2")
        assert rate["ok"] is False and rate["connections"] == 0


def test_a_connection_without_a_header_is_just_closed(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server), timeout=5) as sock:
        sock.sendall(b"E\x00")
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(10) == b""
    assert run("whoami", server)["ok"] is True  # still serving


# -- DNS -------------------------------------------------------------------------------------


def test_dns_query_is_a_standard_a_query() -> None:
    parsed = DNSRecord.parse(measure.dns_query("echo.default.svc.cluster.local", 4242))
    assert parsed.header.id == 4242
    assert parsed.header.rd == 1 and parsed.header.qr == 0
    assert [(str(q.qname), q.qtype) for q in parsed.questions] == [
        ("echo.default.svc.cluster.local.", QTYPE.A)
    ]


def test_dns_response_matching() -> None:
    query = DNSRecord.parse(measure.dns_query("example.test.", 7))
    reply = query.reply().pack()
    assert measure.dns_response_matches(reply, 7)
    assert not measure.dns_response_matches(reply, 8)
    assert not measure.dns_response_matches(query.pack(), 7)  # a query, not a response
    assert not measure.dns_response_matches(b"\x00\x07", 7)


def test_dns_lookups_against_a_loopback_server() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dns:
        dns.bind(("127.0.0.1", 0))
        port = dns.getsockname()[1]
        names: list[str] = []

        def answer() -> None:
            for _ in range(3):
                data, peer = dns.recvfrom(512)
                query = DNSRecord.parse(data)
                names.append(str(query.q.qname))
                dns.sendto(query.reply().pack(), peer)

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        result = run("dns", port, "--count", "3", "--name", "n{i}.example.test")
        thread.join(5)
    assert result["ok"] is True and len(result["samples_ms"]) == 3  # type: ignore[arg-type]
    assert names == ["n0.example.test.", "n1.example.test.", "n2.example.test."]


# -- running measurements from the orchestrator ----------------------------------------------


def test_measure_argv() -> None:
    argv = measure_argv("lab", "conc", "10.96.0.5", 5201, count=1000, hold=True, hold_max=60,
                        name=None, streams=False)  # fmt: skip
    assert argv[:4] == ["ip", "netns", "exec", "lab"]
    assert argv[5:] == [
        "-m", "bench.measure", "conc", "--host", "10.96.0.5", "--port", "5201",
        "--count", "1000", "--hold", "--hold-max", "60",
    ]  # fmt: skip


def test_parse_measure_output() -> None:
    line = json.dumps({"ok": True, "bytes": 5})
    assert parse_measure_output("noise\n" + line + "\n") == {"ok": True, "bytes": 5}
    assert parse_measure_output("{broken\n" + line) == {"ok": True, "bytes": 5}
    assert parse_measure_output("", "Traceback\nOSError: boom\n") == {
        "ok": False,
        "error": "OSError: boom",
    }
    assert parse_measure_output("[1]") == {"ok": False, "error": "no output"}
