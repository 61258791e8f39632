"""Readiness and liveness probes of the sandbox kubelet (tcpSocket, httpGet, exec).

Probes run from the kubelet's own process, which lives in the node netns like a real kubelet,
so tcpSocket and httpGet reach the pod IP; exec probes run the command inside the container's
netns and identity. The probe *parameters* and the success/failure bookkeeping are pure
(``ProbeParams``, ``ProbeCounter``); ``ProbeRunner`` is the thin asyncio part.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

Obj = dict[str, Any]
log = logging.getLogger("sandbox.kubelet")

PROBE_USER_AGENT = "kube-probe/1.31"


@dataclass(frozen=True, slots=True)
class ProbeParams:
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3

    @classmethod
    def from_spec(cls, probe: Obj) -> ProbeParams:
        def num(key: str, default: float, minimum: float) -> float:
            value = probe.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return max(float(value), minimum)
            return default

        return cls(
            initial_delay=num("initialDelaySeconds", 0.0, 0.0),
            period=num("periodSeconds", 10.0, 1.0),
            timeout=num("timeoutSeconds", 1.0, 1.0),
            success_threshold=int(num("successThreshold", 1, 1)),
            failure_threshold=int(num("failureThreshold", 3, 1)),
        )


@dataclass(slots=True)
class ProbeCounter:
    """Consecutive successes/failures -> the probe's verdict (None: not decided yet)."""

    params: ProbeParams
    successes: int = 0
    failures: int = 0

    def observe(self, ok: bool) -> bool | None:
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            return True if self.successes >= self.params.success_threshold else None
        self.successes, self.failures = 0, self.failures + 1
        return False if self.failures >= self.params.failure_threshold else None


def resolve_port(port: object, container: Obj) -> int | None:
    """A probe's ``port`` (number, numeric string or a named container port) -> number."""
    if isinstance(port, int) and not isinstance(port, bool):
        return port if 0 < port < 65536 else None
    if isinstance(port, str):
        if port.isdigit():
            return resolve_port(int(port), container)
        for p in container.get("ports") or []:
            if p.get("name") == port:
                return resolve_port(p.get("containerPort"), container)
    return None


def http_probe_request(get: Obj, host: str, port: int) -> bytes:
    path = str(get.get("path") or "/")
    if not path.startswith("/"):
        path = "/" + path
    headers = {"Host": f"{host}:{port}", "User-Agent": PROBE_USER_AGENT, "Accept": "*/*"}
    for h in get.get("httpHeaders") or []:
        if isinstance(h, dict) and h.get("name"):
            headers[str(h["name"])] = str(h.get("value", ""))
    headers["Connection"] = "close"
    lines = [f"GET {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode("latin-1", "replace")


def http_status_ok(status_line: bytes) -> bool:
    parts = status_line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return False
    return 200 <= int(parts[1]) < 400


class ProbedWorker(Protocol):
    """What a probe needs from the pod worker (sandbox.kubelet.PodWorker)."""

    @property
    def pod(self) -> Obj: ...

    @property
    def records(self) -> Mapping[str, Any]: ...

    @property
    def procs(self) -> Mapping[str, asyncio.subprocess.Process]: ...

    @property
    def ip(self) -> str: ...

    def container_spec(self, name: str) -> Obj: ...

    def exec_target(self, name: str, command: list[str]) -> Any: ...

    def publish(self) -> None: ...


async def _tcp_check(worker: ProbedWorker, name: str, probe: Obj) -> bool:
    action = probe.get("tcpSocket") or {}
    port = resolve_port(action.get("port"), worker.container_spec(name))
    if port is None:
        return False
    _, writer = await asyncio.open_connection(str(action.get("host") or worker.ip), port)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def _http_check(worker: ProbedWorker, name: str, probe: Obj) -> bool:
    get = probe.get("httpGet") or {}
    port = resolve_port(get.get("port"), worker.container_spec(name))
    if port is None:
        return False
    host = str(get.get("host") or worker.ip)
    tls = None
    if str(get.get("scheme", "HTTP")).upper() == "HTTPS":
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(host, port, ssl=tls)
    try:
        writer.write(http_probe_request(get, host, port))
        await writer.drain()
        return http_status_ok(await reader.readline())
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def _exec_check(worker: ProbedWorker, name: str, probe: Obj) -> bool:
    command = (probe.get("exec") or {}).get("command") or []
    if not command or not all(isinstance(c, str) for c in command):
        return False
    target = worker.exec_target(name, list(command))
    proc = await asyncio.create_subprocess_exec(
        *target.argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env=target.env,
        cwd=target.cwd,
        start_new_session=True,
    )
    try:
        return await proc.wait() == 0
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


Check = Callable[[ProbedWorker, str, Obj], Awaitable[bool]]
CHECKS: Mapping[str, Check] = MappingProxyType(
    {"tcpSocket": _tcp_check, "httpGet": _http_check, "exec": _exec_check}
)


async def run_check(worker: ProbedWorker, name: str, probe: Obj, timeout: float) -> bool:
    """One probe attempt; every failure (refused, timeout, bad spec) is just ``False``."""
    for key, check in CHECKS.items():
        if key in probe:
            try:
                return await asyncio.wait_for(check(worker, name, probe), timeout)
            except (OSError, TimeoutError, ValueError, ssl.SSLError):
                return False
    return False  # grpc and unknown handlers: unsupported in the sandbox, so never passing


async def _stop_process(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(proc.wait()), grace)
            return


class ProbeRunner:
    """Readiness/liveness tasks per running container of one pod."""

    def __init__(self, worker: ProbedWorker) -> None:
        self.worker = worker
        self._tasks: dict[str, list[asyncio.Task[None]]] = {}

    def start(self, name: str) -> None:
        self.stop(name)
        spec = self.worker.container_spec(name)
        readiness, liveness = spec.get("readinessProbe"), spec.get("livenessProbe")
        if not readiness:
            self.worker.records[name].ready = True
        tasks = []
        if readiness:
            tasks.append(asyncio.create_task(self._readiness(name, readiness)))
        if liveness:
            tasks.append(asyncio.create_task(self._liveness(name, liveness)))
        self._tasks[name] = tasks

    def stop(self, name: str) -> None:
        for task in self._tasks.pop(name, []):
            task.cancel()

    def stop_all(self) -> None:
        for name in list(self._tasks):
            self.stop(name)

    async def _readiness(self, name: str, probe: Obj) -> None:
        params = ProbeParams.from_spec(probe)
        counter = ProbeCounter(params)
        await asyncio.sleep(params.initial_delay)
        while True:
            verdict = counter.observe(await run_check(self.worker, name, probe, params.timeout))
            record = self.worker.records[name]
            if verdict is not None and verdict != record.ready:
                record.ready = verdict
                self.worker.publish()
            await asyncio.sleep(params.period)

    async def _liveness(self, name: str, probe: Obj) -> None:
        params = ProbeParams.from_spec(probe)
        counter = ProbeCounter(params)
        await asyncio.sleep(params.initial_delay)
        while True:
            ok = await run_check(self.worker, name, probe, params.timeout)
            if counter.observe(ok) is False:
                proc = self.worker.procs.get(name)
                if proc is not None and proc.returncode is None:
                    log.info("container %s failed liveness probe, will be restarted", name)
                    grace = probe.get("terminationGracePeriodSeconds")
                    if not isinstance(grace, int):
                        grace = self.worker.pod["spec"].get("terminationGracePeriodSeconds", 30)
                    await _stop_process(proc, float(grace))
                return
            await asyncio.sleep(params.period)
