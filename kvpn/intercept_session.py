"""What ``kvpn exchange`` and ``kvpn preview`` share: options, the Service lock's keeper,
the local port check, and the shadow pod with its SSH remote forwards.

The shadow pod is reached through the API server's port-forward (no root needed, no
``kvpn connect`` either). The agent is asked to listen on each target port
(``tcpip-forward``, :func:`kvpn.shadow.agent.remote_forward_refusal`); every connection it
accepts comes back as a ``forwarded-tcpip`` channel that asyncssh connects to
``localhost:LOCAL``. Each step registers its undo before it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncssh

from kvpn.cli.errors import UserError
from kvpn.cluster.exchange_plan import InterceptPodPlan
from kvpn.cluster.intercept_api import InterceptApiError, KubeClients, PatchRejected
from kvpn.cluster.locks import DEFAULT_HEARTBEAT_SECONDS, Lock, refresh_ops, release_ops
from kvpn.cluster.service_ports import Exposure, PortForward
from kvpn.cluster.shadow_pod import wait_shadow_ready
from kvpn.connect_session import ConnectOptions, load_cluster
from kvpn.shadow.agent import DEFAULT_PORT
from kvpn.tunnel.client import ShadowTunnel
from kvpn.tunnel.errors import TunnelError
from kvpn.tunnel.transport import PortForwardTransport
from kvpn.undo_stack import UndoStack

LOCAL_HOST = "localhost"
Out = Callable[[str], None]
T = TypeVar("T")


@dataclass(frozen=True)
class InterceptOptions:
    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None
    image: str | None = None
    heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS
    ready_timeout: float = 120.0
    skip_port_check: bool = False


def now_utc() -> datetime:
    return datetime.now(UTC)


async def local_port_listening(port: int, *, timeout: float = 2.0) -> bool:
    """Whether something accepts TCP connections on localhost:PORT (a connect probe)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(LOCAL_HOST, port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def check_local_ports(exposures: tuple[Exposure, ...], options: InterceptOptions) -> None:
    if options.skip_port_check:
        return
    for exposure in exposures:
        if not await local_port_listening(exposure.local_port):
            raise UserError(
                f"nothing listens on {LOCAL_HOST}:{exposure.local_port}: start your local "
                "server first (or pass --skip-port-check)"
            )


class LockLost(Exception):
    """Our lock was replaced or removed by someone else (e.g. a recover after a stall)."""


class LockKeeper:
    """Holds this session's lock on one Service and refreshes its heartbeat.

    Every write that depends on the lock goes through :meth:`patch` so heartbeats and other
    patches never race each other: each one tests the exact lock value last written.
    """

    def __init__(
        self, kube: KubeClients, namespace: str, service: str, lock: Lock, out: Out
    ) -> None:
        self._kube = kube
        self._namespace = namespace
        self._service = service
        self._out = out
        self.lock = lock
        self._mutex = asyncio.Lock()
        self.lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def patch(self, build: Callable[[Lock], list[dict[str, Any]]]) -> dict[str, Any]:
        async with self._mutex:
            if self.lost.is_set():
                raise LockLost(self._lost_message())
            try:
                return await self._kube.patch_service(
                    self._namespace, self._service, build(self.lock)
                )
            except PatchRejected:
                self.lost.set()
                raise LockLost(self._lost_message()) from None

    def _lost_message(self) -> str:
        return (
            f"service {self._namespace}/{self._service} is no longer locked by this session; "
            "left as it is"
        )

    async def refresh(self) -> None:
        new = self.lock.refreshed(now_utc())
        old = self.lock
        await self.patch(lambda _: refresh_ops(old, new))
        self.lock = new

    def start(self, interval: float) -> None:
        self._task = asyncio.ensure_future(self._run(interval))

    async def _run(self, interval: float) -> None:
        while not self.lost.is_set():
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except LockLost as exc:
                self._out(f"kvpn: {exc}")
                return
            except InterceptApiError as exc:  # the API server is unreachable: retry
                self._out(f"kvpn: heartbeat failed ({exc}); retrying")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def release(self) -> None:
        if self.lost.is_set():
            return
        await self.stop()
        await self.patch(release_ops)


def annotations_of(obj: dict[str, Any]) -> dict[str, str] | None:
    value = (obj.get("metadata") or {}).get("annotations")
    return dict(value) if isinstance(value, dict) else None


def agent_port(forwards: tuple[PortForward, ...]) -> int:
    taken = {f.target_port for f in forwards}
    return next(p for p in range(DEFAULT_PORT, DEFAULT_PORT + 100) if p not in taken)


@contextlib.asynccontextmanager
async def open_cluster(
    options: InterceptOptions, out: Out
) -> AsyncIterator[tuple[KubeClients, str, Any]]:
    configuration, namespace, context = load_cluster(
        ConnectOptions(
            kubeconfig=options.kubeconfig, context=options.context, namespace=options.namespace
        )
    )
    kube = KubeClients.from_configuration(configuration)
    out(f"using {configuration.host} (context {context}, namespace {namespace})")
    try:
        yield kube, namespace, configuration
    finally:
        kube.close()


async def start_shadow(
    kube: KubeClients,
    configuration: Any,
    pod: InterceptPodPlan,
    key: asyncssh.SSHKey,
    undo: UndoStack,
    out: Out,
) -> ShadowTunnel:
    """Create the shadow pod, connect to it, and listen on every forward's target port."""
    undo.push(f"delete shadow pod {pod.name}", lambda: kube.delete_pod(pod.namespace, pod.name))
    await kube.create_pod(pod.namespace, pod.manifest())
    out(f"shadow pod {pod.namespace}/{pod.name} created")
    ready = await wait_shadow_ready(
        kube.core, pod.shadow, lambda p: out(f"shadow pod: {p.describe()}")
    )
    transport = PortForwardTransport(configuration, pod.namespace, pod.name, pod.shadow.port)
    tunnel = await ShadowTunnel.connect(transport, client_key=key, host_key=ready.host_key)
    undo.push("close the SSH tunnel", tunnel.close)
    for forward in pod.forwards:
        try:
            await tunnel.connection.forward_remote_port(
                "0.0.0.0", forward.target_port, LOCAL_HOST, forward.local_port
            )
        except asyncssh.ChannelListenError as exc:
            raise TunnelError(
                f"the shadow agent cannot listen on port {forward.target_port}: {exc}"
            ) from None
    if pod.serving_labels:
        await kube.patch_pod(pod.namespace, pod.name, pod.serving_patch())
    return tunnel


class StoppedWhileStarting(Exception):
    """Ctrl-C or SIGTERM arrived before the session was up."""


async def until_stopped(work: Awaitable[T], stop: asyncio.Event) -> T:
    """Run ``work`` unless ``stop`` fires first: then cancel it and raise
    :class:`StoppedWhileStarting` (the undo steps it registered still run)."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise StoppedWhileStarting()


async def wait_for_end(
    tunnel: ShadowTunnel, keeper: LockKeeper, stop: asyncio.Event, out: Out
) -> int:
    waits = {
        asyncio.ensure_future(tunnel.wait_closed()): "the tunnel to the shadow pod closed",
        asyncio.ensure_future(keeper.lost.wait()): "the lock was lost",
        asyncio.ensure_future(stop.wait()): "",
    }
    done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for fut in waits:
        fut.cancel()
    if stop.is_set():
        return 0
    out(f"{waits[next(iter(done))]}; restoring")
    return 1


async def finish_undo(undo: UndoStack, out: Out, exit_code: int) -> int:
    problems = await undo.run()
    for problem in problems:
        out(f"kvpn: could not undo: {problem}")
    return 1 if problems else exit_code


def run_blocking(session: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Run a session until Ctrl-C or SIGTERM; the CLI's entry point."""
    import signal

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await session(stop)

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="kvpn: %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    return asyncio.run(main())
