"""The sandbox's demo workload: an HTTP/1.1 echo server plus a UDP echo, on one port number.

``python -m sandbox.echo_server`` listens on ``$PORT`` (default 8080) on ``$HOST`` (default all
addresses), TCP and UDP. Every HTTP request (any method, keep-alive, bodies with Content-Length
or chunked, read in full and hashed) gets ``200`` and a JSON description of itself: which pod
answered (``$POD_NAME``, else ``$HOSTNAME`` or the host name, ``$POD_NAMESPACE``), the method, path, headers, body
size and SHA-256, and the client address the server saw. Every UDP datagram is sent back as is.

The HTTP parsing is a sans-IO state machine (``RequestParser``: feed bytes, pull events); the
asyncio protocol only moves bytes. A malformed request gets ``400`` and the connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import json
import os
import signal
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, cast

MAX_HEAD_BYTES = 64 * 1024
MAX_CHUNK_LINE = 1024
DEFAULT_PORT = 8080


class HttpError(Exception):
    """The peer broke HTTP/1.1; answered with 400 and a closed connection."""


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in (self.header("connection") or "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens

    @property
    def expects_continue(self) -> bool:
        return (self.header("expect") or "").lower() == "100-continue"


@dataclass(frozen=True, slots=True)
class Request:
    head: RequestHead
    body_bytes: int
    body_sha256: str


class _State(enum.Enum):
    HEAD = "head"
    BODY = "body"  # Content-Length body
    CHUNK_SIZE = "chunk-size"
    CHUNK_DATA = "chunk-data"
    CHUNK_END = "chunk-end"  # the CRLF after a chunk's data
    TRAILERS = "trailers"


@dataclass
class RequestParser:
    """HTTP/1.1 request parser: ``feed(bytes)``, then ``next_event()`` until it returns None.

    Events are a ``RequestHead`` (as soon as the head is in: time to send ``100 Continue``)
    and then a ``Request`` once the body has been read in full.
    """

    _buf: bytearray = field(default_factory=bytearray)
    _state: _State = _State.HEAD
    _head: RequestHead | None = None
    _remaining: int = 0
    _size: int = 0
    _hash: Any = field(default_factory=hashlib.sha256)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_event(self) -> RequestHead | Request | None:
        """The next event, or None if more bytes are needed. Raises ``HttpError``."""
        while True:
            step = _STEPS[self._state]
            result = step(self)
            if result is _NEED_MORE:
                return None
            if result is not None:
                return result  # type: ignore[return-value]

    # -- one step per state; each returns an event, None (go on) or _NEED_MORE -------------

    def _step_head(self) -> object:
        # Tolerate stray CRLFs before a request line (RFC 9112 section 2.2).
        while self._buf[:2] == b"\r\n":
            del self._buf[:2]
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEAD_BYTES:
                raise HttpError("request head too large")
            return _NEED_MORE
        raw = bytes(self._buf[:end])
        del self._buf[: end + 4]
        head = _parse_head(raw)
        self._head, self._size, self._hash = head, 0, hashlib.sha256()
        if "chunked" in (head.header("transfer-encoding") or "").lower():
            self._state = _State.CHUNK_SIZE
        else:
            length = head.header("content-length")
            if length is None:
                length = "0"
            if not length.strip().isdigit():
                raise HttpError(f"bad Content-Length {length!r}")
            self._remaining = int(length.strip())
            self._state = _State.BODY
        return head

    def _take(self, limit: int) -> bytes:
        data = bytes(self._buf[:limit])
        del self._buf[:limit]
        self._size += len(data)
        self._hash.update(data)
        return data

    def _step_body(self) -> object:
        if self._remaining:
            if not self._buf:
                return _NEED_MORE
            self._remaining -= len(self._take(self._remaining))
            if self._remaining:
                return _NEED_MORE
        return self._finish()

    def _step_chunk_size(self) -> object:
        end = self._buf.find(b"\r\n")
        if end < 0:
            if len(self._buf) > MAX_CHUNK_LINE:
                raise HttpError("chunk size line too long")
            return _NEED_MORE
        line = bytes(self._buf[:end]).split(b";", 1)[0].strip()
        del self._buf[: end + 2]
        try:
            size = int(line, 16)
        except ValueError:
            raise HttpError(f"bad chunk size {line!r}") from None
        if size < 0:
            raise HttpError("negative chunk size")
        self._remaining = size
        self._state = _State.CHUNK_DATA if size else _State.TRAILERS
        return None

    def _step_chunk_data(self) -> object:
        if not self._buf:
            return _NEED_MORE
        self._remaining -= len(self._take(self._remaining))
        if self._remaining:
            return _NEED_MORE
        self._state = _State.CHUNK_END
        return None

    def _step_chunk_end(self) -> object:
        if len(self._buf) < 2:
            return _NEED_MORE
        if self._buf[:2] != b"\r\n":
            raise HttpError("chunk data not followed by CRLF")
        del self._buf[:2]
        self._state = _State.CHUNK_SIZE
        return None

    def _step_trailers(self) -> object:
        end = self._buf.find(b"\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEAD_BYTES:
                raise HttpError("trailers too large")
            return _NEED_MORE
        line = bytes(self._buf[:end])
        del self._buf[: end + 2]
        if line:
            return None  # a trailer field: ignored
        return self._finish()

    def _finish(self) -> Request:
        head = self._head
        if head is None:  # unreachable: BODY states only follow a head
            raise HttpError("body without a head")
        self._state, self._head = _State.HEAD, None
        return Request(head, self._size, self._hash.hexdigest())


_NEED_MORE = object()
_STEPS: Mapping[_State, Callable[[RequestParser], object]] = MappingProxyType(
    {
        _State.HEAD: RequestParser._step_head,
        _State.BODY: RequestParser._step_body,
        _State.CHUNK_SIZE: RequestParser._step_chunk_size,
        _State.CHUNK_DATA: RequestParser._step_chunk_data,
        _State.CHUNK_END: RequestParser._step_chunk_end,
        _State.TRAILERS: RequestParser._step_trailers,
    }
)


def _parse_head(raw: bytes) -> RequestHead:
    text = raw.decode("latin-1")  # never fails: every byte is a latin-1 character
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not parts[2].startswith("HTTP/1."):
        raise HttpError(f"bad request line {lines[0]!r}")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(f"bad header line {line!r}")
        headers.append((name, value.strip()))
    return RequestHead(parts[0], parts[1], parts[2], tuple(headers))


# -- responses ----------------------------------------------------------------------------


def describe(
    request: Request,
    env: Mapping[str, str],
    *,
    client: tuple[str, int] | None = None,
    server: tuple[str, int] | None = None,
) -> dict[str, Any]:
    head = request.head
    path, _, query = head.target.partition("?")
    headers: dict[str, str] = {}
    for name, value in head.headers:
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    body: dict[str, Any] = {
        "pod": env.get("POD_NAME") or env.get("HOSTNAME") or socket.gethostname(),
        "namespace": env.get("POD_NAMESPACE", ""),
        "method": head.method,
        "path": path,
        "query": query,
        "http_version": head.version,
        "headers": headers,
        "body_bytes": request.body_bytes,
        "body_sha256": request.body_sha256,
    }
    if client is not None:
        body["client_address"], body["client_port"] = client[0], client[1]
    if server is not None:
        body["server_address"], body["server_port"] = server[0], server[1]
    return body


def render_response(
    status: str, body: bytes, *, keep_alive: bool, head_only: bool = False
) -> bytes:
    lines = [
        f"HTTP/1.1 {status}",
        "Content-Type: application/json" if body else "Content-Type: text/plain",
        f"Content-Length: {len(body)}",
        "Connection: keep-alive" if keep_alive else "Connection: close",
        "",
        "",
    ]
    out = "\r\n".join(lines).encode("latin-1")
    return out if head_only else out + body


# -- asyncio adapters ---------------------------------------------------------------------


class EchoHttp(asyncio.Protocol):
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.parser = RequestParser()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.parser.feed(data)
        try:
            while (event := self.parser.next_event()) is not None:
                if isinstance(event, RequestHead):
                    if event.expects_continue:
                        transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    continue
                self._respond(transport, event)
                if not event.head.keep_alive:
                    transport.close()
                    return
        except HttpError as e:
            body = (json.dumps({"error": str(e)}) + "\n").encode()
            transport.write(render_response("400 Bad Request", body, keep_alive=False))
            transport.close()

    def _respond(self, transport: asyncio.Transport, request: Request) -> None:
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        info = describe(
            request,
            self.env,
            client=(peer[0], peer[1]) if peer else None,
            server=(sock[0], sock[1]) if sock else None,
        )
        body = (json.dumps(info, indent=2) + "\n").encode()
        transport.write(
            render_response(
                "200 OK",
                body,
                keep_alive=request.head.keep_alive,
                head_only=request.head.method == "HEAD",
            )
        )


class EchoUdp(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)


async def serve(
    host: str, port: int, env: Mapping[str, str]
) -> tuple[asyncio.Server, asyncio.DatagramTransport]:
    """Start the TCP and UDP listeners; the caller closes them."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: EchoHttp(env), host, port, reuse_address=True)
    udp, _ = await loop.create_datagram_endpoint(EchoUdp, local_addr=(host, port))
    return server, udp


async def main_async(env: Mapping[str, str]) -> None:
    port = int(env.get("PORT") or DEFAULT_PORT)
    host = env.get("HOST") or "0.0.0.0"
    server, udp = await serve(host, port, env)
    print(f"echo server listening on {host}:{port} (http over tcp, echo over udp)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        udp.close()
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()


def main() -> None:
    asyncio.run(main_async(dict(os.environ)))


if __name__ == "__main__":
    main()
