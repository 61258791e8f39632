"""Pod streams of the sandbox API server: ``exec``, ``portforward`` and ``log``.

Theory of operation
-------------------
The real API server proxies these to the kubelet; here the handlers talk to the in-process
kubelet through a small protocol (``PodRuntime``) that says *how* to run a command in a
container, how to open a TCP connection inside a pod and where a container's log file is. Tests
swap in a runtime that runs commands on the host.

Wire format (``k8s.io/apimachinery/pkg/util/httpstream/wsstream``):

* Every websocket message is BINARY: one channel byte, then payload.
* exec (subprotocol ``v5.channel.k8s.io`` or ``v4.channel.k8s.io``): 0 stdin, 1 stdout,
  2 stderr, 3 error (one ``Status`` JSON when the command ends, then the socket closes), 4
  terminal resize (``{"Width": w, "Height": h}``). v5 adds ``[255, ch]``: the client closed
  channel ``ch`` (for stdin: end of input).
* portforward (``v4.channel.k8s.io``): port i of ``?ports=`` has data channel 2i and error
  channel 2i+1; first the server sends ``[ch, port & 0xff, port >> 8]`` on every channel. An
  error (connection refused) is text on the error channel. The socket closes when every port's
  connection has ended; there is no half-close.
* log: plain text; ``follow`` streams until the container's process ends or the client goes.

Errors before the upgrade are ``kind: Status`` responses (400 for a bad container name, ...),
the same the real server sends; the ``StoreError`` types are raised deep and converted here.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import signal
import socket
import struct
import termios
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import WSMsgType, web

from sandbox.apiserver.store import BadRequest, Obj, StoreError

V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
EXEC_PROTOCOLS = (V5, V4)
PORTFORWARD_PROTOCOLS = (V4,)

STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
CLOSE = 255
READ_CHUNK = 32 * 1024
LOG_POLL_S = 0.2
LOG_MAX_READ = 16 * 1024 * 1024
TERMINAL_PHASES = ("Succeeded", "Failed")
_TRUE = frozenset({"1", "t", "T", "true", "TRUE", "True"})


class ExecTargetLike(Protocol):
    @property
    def argv(self) -> list[str]: ...

    @property
    def env(self) -> dict[str, str]: ...

    @property
    def cwd(self) -> str: ...


class LogSourceLike(Protocol):
    @property
    def path(self) -> Path: ...

    @property
    def live(self) -> Callable[[], bool]: ...


class PodRuntime(Protocol):
    """What the handlers need from the kubelet (sandbox.kubelet.Kubelet implements it)."""

    def exec_target(self, pod: Obj, container: str, command: list[str]) -> ExecTargetLike: ...

    async def open_port(
        self, pod: Obj, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...

    def log_source(self, pod: Obj, container: str, *, previous: bool = False) -> LogSourceLike: ...


# -- pure helpers -------------------------------------------------------------------------


def status_response(error: StoreError) -> web.Response:
    return web.json_response(error.status(), status=error.code)


def resolve_container(pod: Obj, name: str | None) -> str:
    """The container a request means; 400 like the real server for a bad or missing name."""
    pod_name = pod.get("metadata", {}).get("name", "")
    names = [c.get("name", "") for c in pod.get("spec", {}).get("containers") or []]
    if not name:
        if len(names) == 1:
            return str(names[0])
        raise BadRequest(
            f"a container name must be specified for pod {pod_name}, choose one of: "
            f"[{' '.join(names)}]"
        )
    if name not in names:
        raise BadRequest(f"container {name} is not valid for pod {pod_name}")
    return name


def flag(query: Any, key: str) -> bool:
    return str(query.get(key, "")) in _TRUE


def parse_ports(values: Iterable[str]) -> list[int]:
    ports: list[int] = []
    for value in values:
        for token in value.split(","):
            token = token.strip()
            if not token:
                continue
            if not token.isdigit() or not 0 < int(token) < 65536:
                raise BadRequest(f'unable to parse "{token}" as a port: invalid port')
            ports.append(int(token))
    if not ports:
        raise BadRequest("at least one port must be specified")
    return ports


def exit_status(exit_code: int) -> Obj:
    """The Status sent on the error channel when a command ends."""
    if exit_code == 0:
        return {"metadata": {}, "status": "Success"}
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: exit status {exit_code}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(exit_code)}]},
    }


def start_failure_status(message: str) -> Obj:
    return {"metadata": {}, "status": "Failure", "message": message, "reason": "InternalError",
            "code": 500}  # fmt: skip


def tail_lines(data: bytes, count: int) -> bytes:
    if count <= 0:
        return b""
    lines = data.splitlines(keepends=True)
    return b"".join(lines[-count:])


def port_header(channel: int, port: int) -> bytes:
    return bytes([channel, port & 0xFF, (port >> 8) & 0xFF])


def _is_upgrade(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


def _frame_bytes(msg: Any) -> bytes | None:
    if msg.type == WSMsgType.BINARY:
        return bytes(msg.data)
    if msg.type == WSMsgType.TEXT:
        return str(msg.data).encode("utf-8")
    return None


# -- the handlers -------------------------------------------------------------------------


class PodStreams:
    def __init__(self, kubelet: PodRuntime) -> None:
        self.kubelet = kubelet

    # -- exec ------------------------------------------------------------------------------

    async def exec(self, request: web.Request, pod: Obj) -> web.StreamResponse:
        query = request.query
        try:
            command = query.getall("command", [])
            if not command:
                raise BadRequest("you must specify at least one command for the container")
            want = {k: flag(query, k) for k in ("stdin", "stdout", "stderr", "tty")}
            if not (want["stdin"] or want["stdout"] or want["stderr"]):
                raise BadRequest("you must specify at least 1 of stdin, stdout, stderr")
            container = resolve_container(pod, query.get("container"))
            phase = pod.get("status", {}).get("phase")
            if phase in TERMINAL_PHASES:
                raise BadRequest(
                    f"cannot exec into a container in a completed pod; current phase is {phase}"
                )
            if not _is_upgrade(request):
                raise BadRequest("Upgrade request required")
            target = self.kubelet.exec_target(pod, container, list(command))
        except StoreError as e:
            return status_response(e)
        ws = web.WebSocketResponse(protocols=EXEC_PROTOCOLS, max_msg_size=0)
        await ws.prepare(request)
        session = _ExecSession(ws, target, want)
        try:
            await session.run()
        finally:
            await ws.close()
        return ws

    # -- portforward -----------------------------------------------------------------------

    async def portforward(self, request: web.Request, pod: Obj) -> web.StreamResponse:
        try:
            ports = parse_ports(request.query.getall("ports", []))
            if not _is_upgrade(request):
                raise BadRequest("Upgrade request required")
        except StoreError as e:
            return status_response(e)
        ws = web.WebSocketResponse(protocols=PORTFORWARD_PROTOCOLS, max_msg_size=0)
        await ws.prepare(request)
        try:
            await _PortForwardSession(ws, self.kubelet, pod, ports).run()
        finally:
            await ws.close()
        return ws

    # -- log -------------------------------------------------------------------------------

    async def log(self, request: web.Request, pod: Obj) -> web.StreamResponse:
        query = request.query
        try:
            container = resolve_container(pod, query.get("container"))
            source = self.kubelet.log_source(pod, container, previous=flag(query, "previous"))
            tail = _int_param(query, "tailLines")
            limit = _int_param(query, "limitBytes")
        except StoreError as e:
            return status_response(e)
        data, offset = _read_all(source.path)
        if tail is not None:
            data = tail_lines(data, tail)
        if not flag(query, "follow"):
            if limit is not None:
                data = data[:limit]
            return web.Response(body=data, content_type="text/plain")
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        sent = 0
        try:
            while True:
                if limit is not None:
                    data = data[: max(0, limit - sent)]
                if data:
                    await resp.write(data)
                    sent += len(data)
                if (limit is not None and sent >= limit) or _gone(request):
                    break
                live = source.live()  # asked before reading, so no last words are lost
                data = _read_from(source.path, offset)
                offset += len(data)
                if not data:
                    if not live:
                        break
                    await asyncio.sleep(LOG_POLL_S)
        except ConnectionResetError:
            return resp
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp


def _int_param(query: Any, key: str) -> int | None:
    raw = query.get(key)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f'{key}: invalid value "{raw}"') from None
    if value < 0:
        raise BadRequest(f"{key}: must be greater than or equal to 0")
    return value


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _read_all(path: Path) -> tuple[bytes, int]:
    """The file's last ``LOG_MAX_READ`` bytes and the offset just after them."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - LOG_MAX_READ))
            data = f.read(LOG_MAX_READ)
            return data, f.tell()
    except OSError:
        return b"", 0


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(LOG_MAX_READ)
    except OSError:
        return b""


# -- exec session -------------------------------------------------------------------------


class _ExecSession:
    """One exec: a process wired to websocket channels."""

    def __init__(self, ws: web.WebSocketResponse, target: ExecTargetLike, want: dict[str, bool]):
        self.ws = ws
        self.target = target
        self.want = want
        self.v5 = ws.ws_protocol == V5
        self.proc: asyncio.subprocess.Process | None = None
        self.master_fd: int | None = None

    async def _spawn(self) -> asyncio.subprocess.Process:
        pipe, devnull = asyncio.subprocess.PIPE, asyncio.subprocess.DEVNULL
        common: dict[str, Any] = {"env": self.target.env, "cwd": self.target.cwd}
        if self.want["tty"]:
            master, slave = pty.openpty()
            self.master_fd = master
            try:
                return await asyncio.create_subprocess_exec(
                    # setsid -c: new session with the pty as its controlling terminal.
                    "setsid", "-c", *self.target.argv,
                    stdin=slave, stdout=slave, stderr=slave, **common,
                )  # fmt: skip
            finally:
                os.close(slave)
        return await asyncio.create_subprocess_exec(
            *self.target.argv,
            stdin=pipe if self.want["stdin"] else devnull,
            stdout=pipe if self.want["stdout"] else devnull,
            stderr=pipe if self.want["stderr"] else devnull,
            start_new_session=True,
            **common,
        )

    async def run(self) -> None:
        try:
            self.proc = await self._spawn()
        except OSError as e:
            await self._send(ERROR, json.dumps(start_failure_status(str(e))).encode())
            self._close_master()
            return
        proc = self.proc
        pumps: list[asyncio.Task[None]] = []
        if self.master_fd is not None:
            pumps.append(asyncio.create_task(self._pump_pty(self.master_fd)))
        else:
            for channel, stream in ((STDOUT, proc.stdout), (STDERR, proc.stderr)):
                if stream is not None:
                    pumps.append(asyncio.create_task(self._pump(channel, stream)))
        reader = asyncio.create_task(self._read_client())
        waiter = asyncio.create_task(self._wait_output(proc, pumps))
        try:
            done, _ = await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if waiter in done:
                returncode = waiter.result()
                code = 128 - returncode if returncode < 0 else returncode
                await self._send(ERROR, json.dumps(exit_status(code)).encode())
            elif proc.returncode is None:
                # The client went away first: end the command like a hung-up terminal.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
        finally:
            for task in (reader, waiter, *pumps):
                task.cancel()
            await asyncio.gather(reader, waiter, *pumps, return_exceptions=True)
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
            self._close_master()

    def _close_master(self) -> None:
        if self.master_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.master_fd)
            self.master_fd = None

    async def _wait_output(
        self, proc: asyncio.subprocess.Process, pumps: list[asyncio.Task[None]]
    ) -> int:
        returncode = await proc.wait()
        if pumps:
            await asyncio.gather(*pumps, return_exceptions=True)
        return returncode

    async def _send(self, channel: int, payload: bytes) -> None:
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await self.ws.send_bytes(bytes([channel]) + payload)

    async def _pump(self, channel: int, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(READ_CHUNK):
            await self._send(channel, chunk)

    async def _pump_pty(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes] = asyncio.Queue()

        def readable() -> None:
            try:
                data = os.read(fd, READ_CHUNK)
            except OSError:  # EIO: every slave end is closed
                data = b""
            if not data:
                loop.remove_reader(fd)
            queue.put_nowait(data)

        loop.add_reader(fd, readable)
        try:
            while chunk := await queue.get():
                await self._send(STDOUT, chunk)
        finally:
            loop.remove_reader(fd)

    async def _read_client(self) -> None:
        async for msg in self.ws:
            data = _frame_bytes(msg)
            if not data:
                continue
            channel, payload = data[0], data[1:]
            if channel == STDIN:
                await self._write_stdin(payload)
            elif channel == CLOSE and self.v5 and payload[:1] == bytes([STDIN]):
                self._close_stdin()
            elif channel == RESIZE:
                self._resize(payload)

    async def _write_stdin(self, payload: bytes) -> None:
        if not self.want["stdin"] or not payload:
            return
        if self.master_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.master_fd, payload)
            return
        stdin = self.proc.stdin if self.proc else None
        if stdin is not None and not stdin.is_closing():
            stdin.write(payload)
            with contextlib.suppress(ConnectionError):
                await stdin.drain()

    def _close_stdin(self) -> None:
        if self.master_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.master_fd, b"\x04")  # a terminal's end of input: ^D
            return
        stdin = self.proc.stdin if self.proc else None
        if stdin is not None:
            stdin.close()

    def _resize(self, payload: bytes) -> None:
        if self.master_fd is None:
            return
        try:
            size = json.loads(payload)
            width, height = int(size.get("Width", 0)), int(size.get("Height", 0))
        except (ValueError, TypeError, AttributeError):
            return
        if 0 < width < 65536 and 0 < height < 65536:
            with contextlib.suppress(OSError):
                fcntl.ioctl(
                    self.master_fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0)
                )


def _reason(error: OSError) -> str:
    """``connection refused`` rather than asyncio's ``Connect call failed (...)``."""
    if error.errno:
        return os.strerror(error.errno).lower()
    return str(error).lower()


def _no_delay(writer: asyncio.StreamWriter) -> None:
    """Turn Nagle off on the pod-side TCP connection, as Go's net package (the kubelet) does.

    asyncio only does it for sockets whose ``proto`` is ``IPPROTO_TCP``; a socket made with
    ``socket.socket(AF_INET, SOCK_STREAM)`` has proto 0 and keeps Nagle, which with the
    peer's delayed ACK stalls every second small write by ~40 ms (an SSH channel open then
    costs 40 ms).
    """
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# -- port-forward session -----------------------------------------------------------------


class _PortForwardSession:
    def __init__(
        self, ws: web.WebSocketResponse, runtime: PodRuntime, pod: Obj, ports: list[int]
    ) -> None:
        self.ws = ws
        self.runtime = runtime
        self.pod = pod
        self.ports = ports
        # port index -> its connection once made (None: it failed or has ended)
        self.connections: dict[int, asyncio.Future[asyncio.StreamWriter | None]] = {}

    async def _send(self, channel: int, payload: bytes) -> None:
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await self.ws.send_bytes(bytes([channel]) + payload)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for i, port in enumerate(self.ports):
            self.connections[i] = loop.create_future()
            for channel in (2 * i, 2 * i + 1):
                await self._send(channel, port_header(channel, port)[1:])
        pumps = [asyncio.create_task(self._forward(i, port)) for i, port in enumerate(self.ports)]
        reader = asyncio.create_task(self._read_client())
        all_done: asyncio.Future[Any] = asyncio.ensure_future(
            asyncio.gather(*pumps, return_exceptions=True)
        )
        try:
            await asyncio.wait([reader, all_done], return_when=asyncio.FIRST_COMPLETED)
        finally:
            reader.cancel()
            for task in pumps:
                task.cancel()
            await asyncio.gather(reader, all_done, return_exceptions=True)
            for fut in self.connections.values():
                writer = fut.result() if fut.done() else None
                if writer is not None:
                    writer.close()

    async def _forward(self, index: int, port: int) -> None:
        connection = self.connections[index]
        try:
            reader, writer = await self.runtime.open_port(self.pod, port)
        except OSError as e:
            connection.set_result(None)
            name = self.pod.get("metadata", {}).get("name", "")
            uid = self.pod.get("metadata", {}).get("uid", "")
            message = (
                f"error forwarding port {port} to pod {name}, uid {uid}: failed to connect to "
                f"localhost:{port} inside the pod's network namespace: dial tcp4 "
                f"127.0.0.1:{port}: connect: {_reason(e)}"
            )
            await self._send(2 * index + 1, message.encode())
            return
        _no_delay(writer)
        connection.set_result(writer)
        try:
            while chunk := await reader.read(READ_CHUNK):
                await self._send(2 * index, chunk)
        except OSError:
            pass
        finally:
            writer.close()

    async def _read_client(self) -> None:
        async for msg in self.ws:
            data = _frame_bytes(msg)
            if not data:
                continue
            channel, payload = data[0], data[1:]
            if channel % 2 or channel // 2 >= len(self.ports) or not payload:
                continue  # error channels are server -> client only
            writer = await self.connections[channel // 2]
            if writer is not None and not writer.is_closing():
                writer.write(payload)
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
