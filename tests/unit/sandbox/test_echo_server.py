"""The demo echo server: its sans-IO request parser, and the real thing on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from sandbox.echo_server import (
    HttpError,
    Request,
    RequestHead,
    RequestParser,
    describe,
    serve,
)

CHUNKED = (
    b"POST /upload?x=1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
)
LENGTH = b"PUT /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
PLAIN = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


def _requests(parser: RequestParser) -> list[Request]:
    out = []
    while (event := parser.next_event()) is not None:
        if isinstance(event, Request):
            out.append(event)
    return out


@pytest.mark.parametrize(
    ("raw", "method", "size", "body"),
    [
        (CHUNKED, "POST", 11, b"hello world"),
        (LENGTH, "PUT", 3, b"abc"),
        (PLAIN, "GET", 0, b""),
    ],
)
def test_parser_byte_at_a_time(raw: bytes, method: str, size: int, body: bytes) -> None:
    parser = RequestParser()
    got: list[Request] = []
    for i in range(len(raw)):
        parser.feed(raw[i : i + 1])
        got += _requests(parser)
    assert len(got) == 1
    req = got[0]
    assert req.head.method == method
    assert req.body_bytes == size
    assert req.body_sha256 == hashlib.sha256(body).hexdigest()


def test_parser_pipelined_requests_and_head_event_first() -> None:
    parser = RequestParser()
    parser.feed(LENGTH + b"\r\n" + CHUNKED + PLAIN)
    events = []
    while (event := parser.next_event()) is not None:
        events.append(event)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["RequestHead", "Request"] * 3
    assert [e.head.target for e in events if isinstance(e, Request)] == ["/p", "/upload?x=1", "/"]


@pytest.mark.parametrize(
    "raw",
    [
        b"NONSENSE\r\n\r\n",
        b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n",
    ],
)
def test_parser_rejects_malformed(raw: bytes) -> None:
    parser = RequestParser()
    parser.feed(raw)
    with pytest.raises(HttpError):
        while parser.next_event() is not None:
            pass


def test_keep_alive_rules() -> None:
    def head(version: str, connection: str | None) -> RequestHead:
        headers = (("Connection", connection),) if connection else ()
        return RequestHead("GET", "/", version, headers)

    assert head("HTTP/1.1", None).keep_alive
    assert not head("HTTP/1.1", "close").keep_alive
    assert not head("HTTP/1.0", None).keep_alive
    assert head("HTTP/1.0", "Keep-Alive").keep_alive


def test_describe_names_pod_and_merges_headers() -> None:
    head = RequestHead("GET", "/a?b=c", "HTTP/1.1", (("X", "1"), ("X", "2")))
    info = describe(Request(head, 0, "h"), {"POD_NAME": "p", "POD_NAMESPACE": "ns"})
    assert info["pod"] == "p" and info["namespace"] == "ns"
    assert info["path"] == "/a" and info["query"] == "b=c"
    assert info["headers"] == {"X": "1, 2"}


async def _read_response(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    status = (await reader.readline()).decode().strip()
    headers = {}
    while (line := (await reader.readline()).decode().strip()) != "":
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


async def test_server_keep_alive_chunked_post_and_udp_echo() -> None:
    env = {"POD_NAME": "echo-1", "POD_NAMESPACE": "default"}
    server, udp = await serve("127.0.0.1", 0, env)
    port = server.sockets[0].getsockname()[1]
    udp.close()  # the UDP listener bound port 0 separately; test UDP on the TCP port below
    server.close()
    server, udp = await serve("127.0.0.1", port, env)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = b"x" * 100_000
        chunks = b"".join(
            b"%x\r\n%s\r\n" % (len(payload[i : i + 7000]), payload[i : i + 7000])
            for i in range(0, len(payload), 7000)
        )
        writer.write(
            b"POST /data HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunks
            + b"0\r\n\r\n"
        )
        status, headers, body = await _read_response(reader)
        info = json.loads(body)
        assert status == "HTTP/1.1 200 OK"
        assert headers["connection"] == "keep-alive"
        assert info["pod"] == "echo-1" and info["method"] == "POST" and info["path"] == "/data"
        assert info["body_bytes"] == len(payload)
        assert info["body_sha256"] == hashlib.sha256(payload).hexdigest()
        assert info["client_address"] == "127.0.0.1"

        # Same connection, second request, then the server closes on Connection: close.
        writer.write(b"GET /again HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        status, headers, body = await _read_response(reader)
        assert json.loads(body)["path"] == "/again"
        assert headers["connection"] == "close"
        assert await reader.read() == b""
        writer.close()

        loop = asyncio.get_running_loop()
        received: asyncio.Future[bytes] = loop.create_future()

        class Client(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                received.set_result(data)

        transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", port))
        transport.sendto(b"\x00ping\xff")
        assert await asyncio.wait_for(received, 5) == b"\x00ping\xff"
        transport.close()
    finally:
        udp.close()
        server.close()
        await server.wait_closed()


async def test_server_answers_malformed_with_400_and_closes() -> None:
    server, udp = await serve("127.0.0.1", 0, {})
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"garbage\r\n\r\n")
        status, _, _ = await _read_response(reader)
        assert status.startswith("HTTP/1.1 400")
        assert await reader.read() == b""
        writer.close()
    finally:
        udp.close()
        server.close()
        await server.wait_closed()
