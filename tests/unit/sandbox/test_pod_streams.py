"""exec / portforward / log handlers, driven by the official kubernetes client over loopback.

The handlers get a fake runtime that runs commands on the host and connects to loopback
ports, so no root or network namespace is needed; what is tested is the wire framing the
official client expects.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import portforward, stream

from sandbox.apiserver.pod_streams import (
    PodStreams,
    exit_status,
    parse_ports,
    port_header,
    resolve_container,
    tail_lines,
)
from sandbox.apiserver.store import BadRequest

POD: dict[str, Any] = {
    "metadata": {"name": "web", "namespace": "default", "uid": "uid-1"},
    "spec": {"containers": [{"name": "main", "image": "kvpn-sandbox/echo"}]},
    "status": {"phase": "Running"},
}


@dataclass(frozen=True)
class Target:
    argv: list[str]
    env: dict[str, str]
    cwd: str


@dataclass(frozen=True)
class Source:
    path: Path
    live: Any


@dataclass
class FakeRuntime:
    log_dir: Path
    live: bool = False
    opened: list[int] = field(default_factory=list)
    # like the sandbox kubelet: a socket made with proto 0, which asyncio leaves with Nagle on
    plain_socket: bool = False
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    def exec_target(self, pod: dict[str, Any], container: str, command: list[str]) -> Target:
        return Target(list(command), dict(os.environ), "/")

    async def open_port(
        self, pod: dict[str, Any], port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.opened.append(port)
        if not self.plain_socket:
            return await asyncio.open_connection("127.0.0.1", port)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        self.writers.append(writer)
        return reader, writer

    def log_source(self, pod: dict[str, Any], container: str, *, previous: bool = False) -> Source:
        name = "previous.log" if previous else "current.log"
        return Source(self.log_dir / name, lambda: self.live)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[client.CoreV1Api, FakeRuntime]]:
    runtime = FakeRuntime(tmp_path)
    streams = PodStreams(runtime)
    prefix = "/api/v1/namespaces/{ns}/pods/{name}/"

    def handler(kind: str) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            result: web.StreamResponse = await getattr(streams, kind)(request, POD)
            return result

        return handle

    app = web.Application()
    for kind, sub in (("exec", "exec"), ("portforward", "portforward"), ("log", "log")):
        app.router.add_route("*", prefix + sub, handler(kind))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    conf = client.Configuration(host=f"http://127.0.0.1:{port}")
    api = client.CoreV1Api(client.ApiClient(conf))
    try:
        yield api, runtime
    finally:
        await runner.cleanup()


# -- pure helpers -------------------------------------------------------------------------


def test_resolve_container_errors_like_the_real_server() -> None:
    assert resolve_container(POD, None) == "main"
    with pytest.raises(BadRequest, match="container nope is not valid for pod web"):
        resolve_container(POD, "nope")
    two = {**POD, "spec": {"containers": [{"name": "a"}, {"name": "b"}]}}
    with pytest.raises(BadRequest, match=r"choose one of: \[a b\]"):
        resolve_container(two, None)


def test_framing_helpers() -> None:
    assert port_header(3, 8080) == bytes([3, 0x90, 0x1F])
    assert parse_ports(["80,443", "8080"]) == [80, 443, 8080]
    with pytest.raises(BadRequest):
        parse_ports(["0"])
    with pytest.raises(BadRequest):
        parse_ports([])
    assert exit_status(0) == {"metadata": {}, "status": "Success"}
    failed = exit_status(7)
    assert failed["reason"] == "NonZeroExitCode"
    assert failed["details"]["causes"] == [{"reason": "ExitCode", "message": "7"}]
    assert tail_lines(b"a\nb\nc\n", 2) == b"b\nc\n"
    assert tail_lines(b"a\nb", 0) == b""


# -- exec ---------------------------------------------------------------------------------


def _exec_streaming(api: client.CoreV1Api, command: list[str], **kw: Any) -> Any:
    return stream(
        api.connect_get_namespaced_pod_exec, "web", "default", command=command,
        stdout=True, stderr=kw.pop("stderr", True), stdin=kw.pop("stdin", False),
        tty=kw.pop("tty", False), _preload_content=False, **kw,
    )  # fmt: skip


async def test_exec_stdout_stderr_and_exit_code(server: Any) -> None:
    api, _ = server

    def run() -> tuple[str, str, int | None, str | None]:
        resp = _exec_streaming(api, ["sh", "-c", "echo out; echo err >&2; exit 3"])
        resp.run_forever(timeout=20)
        out, err = resp.read_stdout(), resp.read_stderr()
        code = resp.returncode
        proto = resp.subprotocol
        resp.close()
        return out, err, code, proto

    out, err, code, proto = await asyncio.to_thread(run)
    assert (out, err, code) == ("out\n", "err\n", 3)
    assert proto == "v5.channel.k8s.io"


async def test_exec_preloaded_output_and_success(server: Any) -> None:
    api, _ = server

    def run() -> str:
        result: str = stream(
            api.connect_get_namespaced_pod_exec, "web", "default",
            command=["printf", "%s-%s", "a", "b"], stdout=True, stderr=True, stdin=False,
            tty=False,
        )  # fmt: skip
        return result

    assert await asyncio.to_thread(run) == "a-b"


async def test_exec_stdin_closed_with_v5_close_frame(server: Any) -> None:
    api, _ = server

    def run() -> tuple[str, int | None]:
        resp = _exec_streaming(api, ["wc", "-c"], stdin=True)
        resp.write_stdin("hello ")
        resp.write_stdin(b"world")
        resp.close_channel(0)
        resp.run_forever(timeout=20)
        out, code = resp.read_stdout(), resp.returncode
        resp.close()
        return out, code

    out, code = await asyncio.to_thread(run)
    assert out.strip() == "11" and code == 0


async def test_exec_tty_and_resize(server: Any) -> None:
    api, _ = server

    def run() -> str:
        resp = _exec_streaming(
            api, ["sh", "-c", "read line; stty size; test -t 0 && echo tty-$line"],
            stdin=True, tty=True, stderr=False,
        )  # fmt: skip
        resp.write_channel(4, json.dumps({"Width": 100, "Height": 30}))
        resp.write_stdin("ok\n")
        resp.run_forever(timeout=20)
        out: str = resp.read_stdout()
        resp.close()
        return out

    out = await asyncio.to_thread(run)
    assert "30 100" in out and "tty-ok" in out


async def test_exec_bad_container_is_a_400_before_upgrade(server: Any) -> None:
    api, _ = server

    def run() -> None:
        stream(
            api.connect_get_namespaced_pod_exec, "web", "default", command=["true"],
            container="nope", stdout=True, stderr=True, stdin=False, tty=False,
        )  # fmt: skip

    with pytest.raises(ApiException) as err:
        await asyncio.to_thread(run)
    assert "400" in str(err.value.reason)


# -- portforward --------------------------------------------------------------------------


async def _upper_server() -> tuple[asyncio.Server, int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data.upper())
            await writer.drain()
        writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def test_portforward_round_trip_with_official_client(server: Any) -> None:
    api, runtime = server
    srv, port = await _upper_server()

    def run() -> bytes:
        pf = portforward(api.connect_get_namespaced_pod_portforward, "web", "default",
                         ports=str(port))  # fmt: skip
        sock = pf.socket(port)
        sock.settimeout(20)
        payload = b"abc" * 50_000
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        sock.close()
        assert pf.error(port) is None
        return got

    try:
        got = await asyncio.to_thread(run)
    finally:
        srv.close()
    assert got == b"ABC" * 50_000
    assert runtime.opened == [port]


async def test_portforward_turns_nagle_off_on_the_pod_side_socket(server: Any) -> None:
    # Nagle on the pod-side socket + the pod's delayed ACK cost ~40 ms per SSH channel open.
    api, runtime = server
    runtime.plain_socket = True
    srv, port = await _upper_server()

    def run() -> int:
        pf = portforward(api.connect_get_namespaced_pod_portforward, "web", "default",
                         ports=str(port))  # fmt: skip
        sock = pf.socket(port)
        sock.settimeout(20)
        sock.sendall(b"x")
        assert sock.recv(10) == b"X"
        pod_side = runtime.writers[0].get_extra_info("socket")
        value = int(pod_side.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        sock.close()
        return value

    try:
        assert await asyncio.to_thread(run) != 0
    finally:
        srv.close()


async def test_portforward_refused_reports_on_error_channel(server: Any) -> None:
    api, _ = server
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed_port = probe.getsockname()[1]
    probe.close()

    def run() -> tuple[bytes, str | None]:
        pf = portforward(api.connect_get_namespaced_pod_portforward, "web", "default",
                         ports=str(closed_port))  # fmt: skip
        sock = pf.socket(closed_port)
        sock.settimeout(20)
        data = sock.recv(10)
        for _ in range(200):  # the proxy thread records the error right before closing
            if pf.error(closed_port) is not None:
                break
            time.sleep(0.01)
        return data, pf.error(closed_port)

    data, error = await asyncio.to_thread(run)
    assert data == b""
    assert error is not None and "connection refused" in error
    assert f"error forwarding port {closed_port}" in error


async def test_portforward_closes_websocket_when_pod_side_closes(server: Any) -> None:
    api, _ = server

    async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(hello, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]

    def run() -> bytes:
        pf = portforward(api.connect_get_namespaced_pod_portforward, "web", "default",
                         ports=str(port))  # fmt: skip
        sock = pf.socket(port)
        sock.settimeout(20)
        got = b""
        while chunk := sock.recv(100):
            got += chunk
        return got

    try:
        assert await asyncio.to_thread(run) == b"bye"
    finally:
        srv.close()


# -- log ----------------------------------------------------------------------------------


async def test_log_plain_tail_previous_and_bad_container(server: Any) -> None:
    api, runtime = server
    (runtime.log_dir / "current.log").write_text("one\ntwo\nthree\n")
    (runtime.log_dir / "previous.log").write_text("before\n")

    def run() -> tuple[str, str, str, int]:
        all_ = api.read_namespaced_pod_log("web", "default")
        tail = api.read_namespaced_pod_log("web", "default", container="main", tail_lines=2)
        prev = api.read_namespaced_pod_log("web", "default", previous=True)
        try:
            api.read_namespaced_pod_log("web", "default", container="nope")
        except ApiException as e:
            body = json.loads(e.body or "{}")
            assert body["kind"] == "Status" and "not valid" in body["message"]
            return all_, tail, prev, e.status
        return all_, tail, prev, 0

    all_, tail, prev, status = await asyncio.to_thread(run)
    assert all_ == "one\ntwo\nthree\n"
    assert tail == "two\nthree\n"
    assert prev == "before\n"
    assert status == 400


async def test_log_follow_streams_until_the_process_ends(server: Any) -> None:
    api, runtime = server
    path = runtime.log_dir / "current.log"
    path.write_text("first\n")
    runtime.live = True

    def run() -> list[bytes]:
        resp = api.read_namespaced_pod_log("web", "default", follow=True, _preload_content=False)
        return list(resp.stream(64))

    reading = asyncio.create_task(asyncio.to_thread(run))
    await asyncio.sleep(0.5)
    with open(path, "a") as f:
        f.write("second\n")
    await asyncio.sleep(0.5)
    runtime.live = False
    chunks = await asyncio.wait_for(reading, 20)
    assert b"".join(chunks) == b"first\nsecond\n"
