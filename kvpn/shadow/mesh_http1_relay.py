"""The mesh router's HTTP/1.x relay: one client connection, each request routed on its own.

Theory of operation (RFC 9112; framing by ``h11``, one ``h11.Connection`` per side).

* The client side is an ``h11`` server connection; each backend is an ``h11`` client
  connection. Requests are handled one at a time, in order (a pipelining client's next
  request waits in the server connection's buffer), so responses go back in request order
  even when consecutive requests go to different backends.
* For each request the target is chosen from its header fields
  (:func:`kvpn.shadow.http_routing.route_headers`). Backend connections are kept per
  (client connection, target host and port) while both sides keep them alive, and dropped
  when the backend has closed in between.
* The request head is forwarded at once; then the request body is streamed up
  (``Content-Length`` or chunked, re-framed by h11 exactly as the client framed it) while
  the response is streamed down, concurrently: ``Expect: 100-continue`` works because the
  backend's ``100 Continue`` reaches the client before it sends the body, and a backend
  that answers before reading the whole body is relayed too (the client connection is then
  closed, as its request was not consumed).
* ``101 Switching Protocols`` (WebSocket, ``h2c`` upgrade) and a 2xx answer to ``CONNECT``
  switch both h11 connections; the bytes each had buffered beyond the HTTP exchange are
  handed over and the two connections are spliced.
* A malformed request is answered ``400`` and the connection closed; a backend that cannot
  be reached or breaks HTTP before its response started is answered ``502``. Both are
  counted, nothing escapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import h11

from kvpn.shadow.http_routing import Target, fallback_of, route_headers
from kvpn.shadow.mesh_upstream import Stream, Upstreams, close_writer, splice

logger = logging.getLogger(__name__)

_CLIENT_EVENT = h11.Request | h11.Data | h11.EndOfMessage | h11.ConnectionClosed


def canned_response(status: int, reason: str) -> bytes:
    """A complete ``Connection: close`` response written without h11 (its state may be ERROR)."""
    body = f"kvpn mesh router: {status} {reason}\n".encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head + body


BAD_REQUEST = canned_response(400, "Bad Request")
BAD_GATEWAY = canned_response(502, "Bad Gateway")


def _head_size(request: h11.Request) -> int:
    return len(request.target) + sum(len(name) + len(value) + 4 for name, value in request.headers)


class ClientGone(Exception):
    """The client closed or reset its connection."""


class ClientBroken(Exception):
    """The client broke HTTP/1.1 (answered 400)."""


class BackendBroken(Exception):
    """The backend closed, reset or broke HTTP/1.1."""


class _Backend:
    def __init__(self, stream: Stream, max_header_bytes: int) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes)

    def usable(self) -> bool:
        return not self.stream.reader.at_eof() and not self.stream.writer.is_closing()

    def reusable(self) -> bool:
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    def close(self) -> None:
        close_writer(self.stream.writer)


class Http1Relay:
    """Relays one client connection whose first bytes looked like HTTP/1.x."""

    def __init__(
        self,
        upstreams: Upstreams,
        port: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        initial: bytes,
    ) -> None:
        self._up = upstreams
        self._stats = upstreams.stats
        self._tuning = upstreams.tuning
        self._port = port
        self._reader = reader
        self._writer = writer
        self._server = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self._tuning.max_header_bytes
        )
        self._server.receive_data(initial)
        self._backends: dict[tuple[str, int], _Backend] = {}
        self._response_started = False
        self._client_eof = False
        self.requests = 0
        self.targets: list[str] = []  # distinct backends used, for the connection's log line
        self.spliced = False

    # ------------------------------------------------------------------ entry point

    async def run(self) -> None:
        try:
            await self._serve()
        except ClientGone:
            pass
        except ClientBroken:
            self._stats.malformed += 1
            self._reply(BAD_REQUEST)
        except BackendBroken:
            self._stats.bad_gateway += 1
            self._reply(BAD_GATEWAY)
        finally:
            for backend in self._backends.values():
                backend.close()
            if not self.spliced:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._writer.drain(), 1.0)
                close_writer(self._writer)

    def _reply(self, canned: bytes) -> None:
        """Write a canned error unless a response is already on its way."""
        if not self._response_started and not self._writer.is_closing():
            self._writer.write(canned)

    async def _serve(self) -> None:
        while True:
            try:
                event = await asyncio.wait_for(self._client_event(), self._tuning.idle_timeout)
            except TimeoutError:
                return
            if isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                raise ClientBroken(f"unexpected {type(event).__name__}")
            if _head_size(event) > self._tuning.max_header_bytes:
                raise ClientBroken("request head too large")  # h11 only bounds partial heads
            self.requests += 1
            self._stats.requests += 1
            if not await self._exchange(event):
                return
            if self._server.our_state is not h11.DONE or self._server.their_state is not h11.DONE:
                return
            try:
                self._server.start_next_cycle()
            except h11.LocalProtocolError:
                return

    # ------------------------------------------------------------------ client side

    async def _client_event(self) -> Any:
        """The next h11 event from the client (reads as needed)."""
        while True:
            try:
                event = self._server.next_event()
            except h11.RemoteProtocolError as error:
                if self._client_eof:
                    raise ClientGone() from None  # closed in the middle of a request
                raise ClientBroken(str(error)) from None
            if event is h11.NEED_DATA:
                try:
                    data = await self._reader.read(self._tuning.read_size)
                except OSError:
                    raise ClientGone() from None
                self._client_eof = not data
                self._server.receive_data(data)
                continue
            if event is h11.PAUSED:
                return h11.ConnectionClosed()
            return event

    async def _send_client(self, event: Any) -> None:
        if isinstance(event, h11.Response | h11.InformationalResponse) and (
            event.http_version != b"1.1"
        ):
            # An HTTP/1.0 backend (``python -m http.server``): h11 only writes HTTP/1.1 and
            # frames the body for this client itself (Content-Length kept, else chunked).
            event = type(event)(
                status_code=event.status_code, headers=event.headers, reason=event.reason
            )
        try:
            data = self._server.send(event)
        except h11.LocalProtocolError as error:
            raise BackendBroken(f"cannot relay response: {error}") from None
        self._response_started = True
        if data:
            self._writer.write(data)
            try:
                await self._writer.drain()
            except OSError:
                raise ClientGone() from None

    # ------------------------------------------------------------------ backend side

    def _pooled(self, target: Target) -> _Backend | None:
        key = (target.host, target.port)
        backend = self._backends.get(key)
        if backend is not None and not backend.usable():
            backend.close()
            del self._backends[key]
            return None
        return backend

    async def _backend_for(self, target: Target) -> _Backend | None:
        """A pooled or new backend for ``target``, else for its fallback (the stand-in)."""
        backend = self._pooled(target)
        if backend is not None:
            self._up.count_route(target)
            return backend
        stream = await self._up.dial(target)
        if stream is None:
            fallback = fallback_of(self._up.settings, target)
            if fallback is None:
                self._stats.standin_unreachable += 1
                return None
            self._stats.member_unreachable += 1
            backend = self._pooled(fallback)
            if backend is not None:
                self._up.count_route(fallback)
                return backend
            stream = await self._up.dial(fallback)
            if stream is None:
                self._stats.standin_unreachable += 1
                return None
        self._up.count_route(stream.target)
        backend = _Backend(stream, self._tuning.max_header_bytes)
        self._backends[(stream.target.host, stream.target.port)] = backend
        return backend

    def _drop_backend(self, backend: _Backend) -> None:
        backend.close()
        for key in [k for k, b in self._backends.items() if b is backend]:
            del self._backends[key]

    async def _send_backend(self, backend: _Backend, event: Any) -> None:
        try:
            data = backend.conn.send(event)
        except h11.LocalProtocolError as error:
            raise ClientBroken(f"cannot relay request: {error}") from None
        if data:
            backend.stream.writer.write(data)
            try:
                await backend.stream.writer.drain()
            except OSError:
                raise BackendBroken("backend reset") from None

    async def _backend_event(self, backend: _Backend) -> Any:
        while True:
            try:
                event = backend.conn.next_event()
            except h11.RemoteProtocolError as error:
                raise BackendBroken(str(error)) from None
            if event is h11.NEED_DATA:
                try:
                    data = await backend.stream.reader.read(self._tuning.read_size)
                except OSError:
                    raise BackendBroken("backend reset") from None
                backend.conn.receive_data(data)
                continue
            return event

    # ------------------------------------------------------------------ one exchange

    async def _exchange(self, request: h11.Request) -> bool:
        """Relay one request and its response; False when the client connection must end."""
        self._response_started = False
        target = route_headers(self._up.settings, self._port, request.headers)
        backend = await self._backend_for(target)
        if backend is None:
            raise BackendBroken(f"no backend for {target.host}")
        if backend.stream.target.host not in self.targets:
            self.targets.append(backend.stream.target.host)
        upgrade = request.method == b"CONNECT" or any(n == b"upgrade" for n, _ in request.headers)
        if upgrade:
            self._stats.upgrades += 1
        await self._send_backend(backend, request)
        upload = asyncio.create_task(self._upload(backend))
        download = asyncio.create_task(self._download(backend, upload, switch_expected=upgrade))
        try:
            while not download.done():
                waiting = {download} if upload.done() else {upload, download}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if upload.done() and upload.exception() is not None:
                    await upload  # the request broke before its response: raise why
            switched = await download
            if switched:
                await self._switch(backend)
                return False
            if not upload.done() and self._server.their_state is not h11.DONE:
                upload.cancel()  # answered before the body was read: cannot go on
                with contextlib.suppress(asyncio.CancelledError):
                    await upload
                self._drop_backend(backend)
                return False
            await upload
        except BaseException:
            for task in (upload, download):
                task.cancel()
            for task in (upload, download):
                with contextlib.suppress(BaseException):
                    await task
            self._drop_backend(backend)
            raise
        if backend.reusable():
            backend.conn.start_next_cycle()
        else:
            self._drop_backend(backend)
        return self._server.their_state is h11.DONE

    async def _upload(self, backend: _Backend) -> None:
        while True:
            event = await self._client_event()
            if isinstance(event, h11.ConnectionClosed):
                raise ClientGone()
            await self._send_backend(backend, event)
            if isinstance(event, h11.EndOfMessage):
                return

    async def _download(
        self, backend: _Backend, upload: asyncio.Task[None], *, switch_expected: bool
    ) -> bool:
        """Relay the response; True when both connections switched protocols."""
        if switch_expected:
            # h11 must have sent the whole upgrade request before it sees the answer,
            # or it would read a 101 (or a CONNECT's 2xx) as an ordinary response.
            await asyncio.shield(upload)
        while True:
            event = await self._backend_event(backend)
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                raise BackendBroken("backend closed before its response")
            switching = (
                isinstance(event, h11.InformationalResponse) and event.status_code == 101
            ) or (
                isinstance(event, h11.Response) and backend.conn.our_state is h11.SWITCHED_PROTOCOL
            )
            if switching:
                await asyncio.shield(upload)  # the client's request must be complete first
            await self._send_client(event)
            if switching:
                return True
            if isinstance(event, h11.EndOfMessage):
                return False

    async def _switch(self, backend: _Backend) -> None:
        """Hand both connections over to a byte splice (WebSocket, h2c upgrade, CONNECT)."""
        to_backend, _ = self._server.trailing_data
        to_client, _ = backend.conn.trailing_data
        self._drop_from_pool(backend)
        self.spliced = True
        await splice(
            self._reader,
            self._writer,
            backend.stream,
            to_backend=bytes(to_backend),
            to_client=bytes(to_client),
            read_size=self._tuning.read_size,
        )

    def _drop_from_pool(self, backend: _Backend) -> None:
        for key in [k for k, b in self._backends.items() if b is backend]:
            del self._backends[key]
