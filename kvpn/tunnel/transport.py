"""Byte-stream transports that the SSH client runs over.

Every transport's :meth:`open` returns a connected stream socket that is handed to
``asyncssh.connect(sock=...)``:

* :class:`DirectTransport` is a plain TCP connection (the pod IP is routable, or tests).
* :class:`PortForwardTransport` reaches the pod's port through the Kubernetes API server's
  ``pods/{name}/portforward`` websocket. asyncssh wants a socket, the websocket is not one,
  so the transport creates a ``socketpair`` and pumps bytes between the far end and the
  websocket (:mod:`kvpn.tunnel.portforward_framing` does the framing). Kernel socket
  buffers give back-pressure in both directions for free: a full socketpair stalls the
  websocket reader, which stalls the API server's TCP stream.

A transport that fails after :meth:`open` returned (the API server closes the stream, the
kubelet reports an error) records the reason in :attr:`failure` and closes the socket, so
the SSH layer sees EOF and can report the transport's reason instead of "connection lost".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp

from kvpn.tunnel.errors import PortForwardError, TransportError
from kvpn.tunnel.portforward_framing import (
    SUBPROTOCOL,
    DataReceived,
    ErrorReceived,
    PortForwardFraming,
)

logger = logging.getLogger(__name__)

_PUMP_CHUNK = 65536
_MAX_WS_MESSAGE = 16 * 1024 * 1024


class Transport(Protocol):
    async def open(self) -> socket.socket: ...

    @property
    def failure(self) -> TransportError | None: ...

    def describe(self) -> str: ...

    async def close(self) -> None: ...


class DirectTransport:
    """A TCP connection to host:port."""

    def __init__(self, host: str, port: int, *, connect_timeout: float = 10.0) -> None:
        self.host = host
        self.port = port
        self._connect_timeout = connect_timeout
        self._sock: socket.socket | None = None

    @property
    def failure(self) -> TransportError | None:
        return None

    def describe(self) -> str:
        return f"{self.host}:{self.port}"

    async def open(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise TransportError(f"cannot resolve {self.host}: {exc}") from None
        last: BaseException | None = None
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, addr), self._connect_timeout)
            except (OSError, TimeoutError) as exc:
                sock.close()
                last = exc
                continue
            self._sock = sock
            return sock
        raise TransportError(f"cannot connect to {self.describe()}: {last or 'no address'}")

    async def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _ssl_context(config: Any) -> ssl.SSLContext | bool:
    """Build the TLS settings the kubernetes client would use for this Configuration."""
    if not str(config.host).startswith("https"):
        return False
    if not config.verify_ssl:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(cafile=config.ssl_ca_cert)
        if config.assert_hostname is False:
            ctx.check_hostname = False
    if config.cert_file:
        ctx.load_cert_chain(config.cert_file, config.key_file)
    return ctx


def _authorization(config: Any) -> str | None:
    setting = config.auth_settings().get("BearerToken")
    value = setting.get("value") if setting else None
    if not value:
        return None
    value = str(value)
    return value if " " in value else f"Bearer {value}"


class PortForwardTransport:
    """One TCP stream to ``pod:port`` through the API server's port-forward websocket."""

    def __init__(
        self,
        api_client_config: Any,
        namespace: str,
        pod: str,
        port: int = 2222,
        *,
        open_timeout: float = 15.0,
    ) -> None:
        self._config = api_client_config
        self.namespace = namespace
        self.pod = pod
        self.port = port
        self._open_timeout = open_timeout
        self._failure: TransportError | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._pump_sock: socket.socket | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self.bytes_up = 0
        self.bytes_down = 0

    @property
    def failure(self) -> TransportError | None:
        return self._failure

    def describe(self) -> str:
        return f"pod {self.namespace}/{self.pod} port {self.port} via the API server port-forward"

    @property
    def url(self) -> str:
        host = str(self._config.host).rstrip("/")
        return (
            f"{host}/api/v1/namespaces/{quote(self.namespace, safe='')}/pods/"
            f"{quote(self.pod, safe='')}/portforward?ports={self.port}"
        )

    async def open(self) -> socket.socket:
        if self._session is not None:
            raise RuntimeError("PortForwardTransport.open() may only be called once")
        framing = PortForwardFraming(self.port)
        self._session = aiohttp.ClientSession()
        try:
            ws = await asyncio.wait_for(self._connect(self._session), self._open_timeout)
            self._ws = ws
            early = await asyncio.wait_for(self._await_ports(ws, framing), self._open_timeout)
        except TimeoutError:
            await self.close()
            raise PortForwardError(
                f"port-forward to {self.describe()} did not start within {self._open_timeout:g}s"
            ) from None
        except BaseException:
            await self.close()
            raise
        app_sock, pump_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        app_sock.setblocking(False)
        pump_sock.setblocking(False)
        self._pump_sock = pump_sock
        self._pump_task = asyncio.create_task(self._pump(ws, framing, pump_sock, early))
        return app_sock

    async def _connect(self, session: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
        headers = {}
        auth = _authorization(self._config)
        if auth:
            headers["Authorization"] = auth
        kwargs: dict[str, Any] = {}
        if getattr(self._config, "tls_server_name", None):
            kwargs["server_hostname"] = self._config.tls_server_name
        if getattr(self._config, "proxy", None):
            kwargs["proxy"] = self._config.proxy
        try:
            ws: aiohttp.ClientWebSocketResponse = await session.ws_connect(
                self.url,
                protocols=(SUBPROTOCOL,),
                headers=headers,
                ssl=_ssl_context(self._config),
                max_msg_size=_MAX_WS_MESSAGE,
                autoping=True,
                **kwargs,
            )
        except aiohttp.WSServerHandshakeError as exc:
            raise PortForwardError(
                f"the API server refused port-forward to {self.describe()}: "
                f"HTTP {exc.status} {exc.message}"
            ) from None
        except (aiohttp.ClientError, OSError, ssl.SSLError) as exc:
            raise PortForwardError(
                f"cannot reach the API server at {self._config.host}: {exc}"
            ) from None
        if ws.protocol not in (None, SUBPROTOCOL):
            await ws.close()
            raise PortForwardError(f"the API server chose unsupported subprotocol {ws.protocol!r}")
        return ws

    async def _await_ports(
        self, ws: aiohttp.ClientWebSocketResponse, framing: PortForwardFraming
    ) -> list[bytes]:
        """Read until both channels announced the port; return data that came early."""
        early: list[bytes] = []
        while not framing.ready:
            msg = await ws.receive()
            if msg.type is not aiohttp.WSMsgType.BINARY:
                if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.PING):
                    continue
                raise PortForwardError(
                    f"port-forward to {self.describe()} closed before it started"
                    + (f": {ws.exception()}" if ws.exception() else "")
                )
            for event in framing.receive_message(msg.data):
                if isinstance(event, ErrorReceived):
                    raise PortForwardError(f"port-forward to {self.describe()}: {event.message}")
                if isinstance(event, DataReceived):
                    early.append(event.data)
        return early

    async def _pump(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        framing: PortForwardFraming,
        pump_sock: socket.socket,
        early: list[bytes],
    ) -> None:
        down = asyncio.create_task(self._pump_down(ws, framing, pump_sock, early))
        up = asyncio.create_task(self._pump_up(ws, framing, pump_sock))
        try:
            await asyncio.wait({down, up}, return_when=asyncio.FIRST_COMPLETED)
            if down.done() and not up.done():
                # The server ended the stream: give the app EOF, let it finish and close.
                with contextlib.suppress(OSError):
                    pump_sock.shutdown(socket.SHUT_WR)
                await up
            else:
                # The app closed its end: the protocol has no half-close, end the stream.
                await ws.close()
                down.cancel()
        except asyncio.CancelledError:
            pass
        finally:
            for task in (down, up):
                task.cancel()
            await asyncio.gather(down, up, return_exceptions=True)
            await ws.close()
            pump_sock.close()
            if self._session is not None:
                await self._session.close()

    async def _pump_down(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        framing: PortForwardFraming,
        pump_sock: socket.socket,
        early: list[bytes],
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            for data in early:
                await loop.sock_sendall(pump_sock, data)
                self.bytes_down += len(data)
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.BINARY:
                    continue
                for event in framing.receive_message(msg.data):
                    if isinstance(event, DataReceived):
                        await loop.sock_sendall(pump_sock, event.data)
                        self.bytes_down += len(event.data)
                    elif isinstance(event, ErrorReceived):
                        self._failure = PortForwardError(
                            f"port-forward to {self.describe()}: {event.message}"
                        )
                        logger.warning("%s", self._failure)
                        return
        except OSError as exc:
            logger.debug("port-forward: local end closed: %s", exc)

    async def _pump_up(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        framing: PortForwardFraming,
        pump_sock: socket.socket,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await loop.sock_recv(pump_sock, _PUMP_CHUNK)
                if not data:
                    return
                await ws.send_bytes(framing.encode_data(data))
                self.bytes_up += len(data)
        except (OSError, aiohttp.ClientError) as exc:
            if self._failure is None:
                self._failure = PortForwardError(f"port-forward to {self.describe()} broke: {exc}")

    async def close(self) -> None:
        if self._pump_task is not None:
            self._pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump_task
            self._pump_task = None
        if self._ws is not None:
            await self._ws.close()
        if self._pump_sock is not None:
            self._pump_sock.close()
        if self._session is not None:
            await self._session.close()


__all__ = [
    "DirectTransport",
    "PortForwardError",
    "PortForwardTransport",
    "Transport",
    "TransportError",
]
