"""What ``kvpn exchange`` and ``kvpn preview`` share: options, the Service lock's keeper,
the local port check, and the shadow pod with its SSH remote forwards.

The shadow pod is reached through the API server's port-forward (no root needed, no
``kvpn connect`` either). The agent is asked to listen on each target port
(``tcpip-forward``, :func:`kvpn.shadow.agent.remote_forward_refusal`); every connection it
accepts comes back as a ``forwarded-tcpip`` channel that asyncssh connects to
``localhost:LOCAL``. Each step registers its undo before it runs.

Reconnect (issue 9): once up, the session is kept up by the same
:class:`kvpn.link_supervisor.LinkSupervisor` as ``kvpn connect`` (:func:`supervise`). SSH
keepalives (2 s x 3) notice a dead tunnel; each reconnect attempt first refreshes the
session's lock or mesh membership (a session that somebody recovered while this process was
stopped must not bring its pod back: the lost lock ends it, leaving the Service as it is),
then :class:`kvpn.shadow_link.ShadowLink` dials a new port-forward to the same pod -
recreating it from the same manifest and key if it is gone - and :meth:`InterceptLink.serve`
listens on every target port again and re-applies the serving labels. The Service is not
touched meanwhile: it selects the pod's labels, which a recreated pod carries again. The
session writes a status file like ``kvpn connect`` (:mod:`kvpn.session_status`).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import asyncssh
import urllib3.exceptions

from kvpn.cli.errors import UserError
from kvpn.cluster.exchange_plan import InterceptPodPlan
from kvpn.cluster.intercept_api import InterceptApiError, KubeClients, PatchRejected
from kvpn.cluster.locks import DEFAULT_HEARTBEAT_SECONDS, Lock, refresh_ops, release_ops
from kvpn.cluster.service_ports import Exposure, PortForward
from kvpn.cluster.shadow_pod import wait_shadow_ready
from kvpn.connect_session import ConnectOptions, load_cluster
from kvpn.dns.session import DnsOwner
from kvpn.journal_replay import undo_remove_file
from kvpn.link_supervisor import LinkConfig, LinkSupervisor, NoDataPlane
from kvpn.session_status import (
    ensure_private_dir,
    live_status,
    status_path,
    user_state_dir,
    write_status,
)
from kvpn.shadow.agent import DEFAULT_PORT
from kvpn.shadow_link import ShadowLink
from kvpn.tunnel.client import ShadowTunnel
from kvpn.tunnel.errors import TunnelError
from kvpn.tunnel.transport import PortForwardTransport
from kvpn.undo_stack import UndoStack

LOCAL_HOST = "localhost"
Out = Callable[[str], None]
T = TypeVar("T")
log = logging.getLogger(__name__)
#: what a heartbeat retries on: an API error, or no answer at all (the kubernetes client raises
#: urllib3's errors, not an ApiException, when the API server cannot be reached)
HEARTBEAT_RETRIED = (InterceptApiError, urllib3.exceptions.HTTPError)


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


class Heartbeating(abc.ABC):
    """What a session's keeper of a claim on a Service shares (:class:`LockKeeper`, the mesh's
    ``MemberKeeper``): a task calling :meth:`refresh` every ``interval`` until the claim is
    lost (reported once), retrying while the API server is unreachable."""

    lost: asyncio.Event
    _out: Out
    _task: asyncio.Task[None] | None

    @abc.abstractmethod
    async def refresh(self) -> None:
        """Rewrite the heartbeat; raises :class:`LockLost` when the claim is gone."""

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
            except HEARTBEAT_RETRIED as exc:  # the API server is unreachable: retry
                self._out(f"kvpn: heartbeat failed ({exc}); retrying")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


class LockKeeper(Heartbeating):
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
        # A heartbeat cancelled while its patch was in flight (stop(), a cancelled reconnect
        # attempt) may still have landed on the server: the lock it wrote, tried once more
        # before a rejected patch counts as a lost lock.
        self._unsure: Lock | None = None
        self._mutex = asyncio.Lock()
        self.lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def patch(self, build: Callable[[Lock], list[dict[str, Any]]]) -> dict[str, Any]:
        async with self._mutex:
            return await self._patch_held(build)

    async def _patch_held(self, build: Callable[[Lock], list[dict[str, Any]]]) -> dict[str, Any]:
        if self.lost.is_set():
            raise LockLost(self._lost_message())
        try:
            return await self._kube.patch_service(self._namespace, self._service, build(self.lock))
        except PatchRejected:
            unsure, self._unsure = self._unsure, None
            if unsure is not None:
                with contextlib.suppress(PatchRejected):
                    result = await self._kube.patch_service(
                        self._namespace, self._service, build(unsure)
                    )
                    self.lock = unsure
                    return result
            self.lost.set()
            raise LockLost(self._lost_message()) from None

    def _lost_message(self) -> str:
        return (
            f"service {self._namespace}/{self._service} is no longer locked by this session; "
            "left as it is"
        )

    async def refresh(self) -> None:
        """Rewrite the heartbeat, testing the lock last written (the heartbeat task and a
        reconnect attempt may both refresh: the mutex keeps the old value they test exact)."""
        async with self._mutex:
            new = self.lock.refreshed(now_utc())
            try:
                await self._patch_held(lambda old: refresh_ops(old, new))
            except (asyncio.CancelledError, *HEARTBEAT_RETRIED):  # it may have landed
                self._unsure = new
                raise
            self.lock = new
            self._unsure = None

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


#: how often the agent of an intercept pod checks that its client is alive (4 unanswered:
#: gone). After a silent outage (the laptop offline or asleep) the new tunnel can listen on
#: the target ports only once the agent has dropped the old one: 20 s, not its default 60 s.
AGENT_KEEPALIVE_SECONDS = 5


def intercept_manifest(pod: InterceptPodPlan) -> dict[str, Any]:
    """The pod's manifest, with the agent told to notice a dead client sooner."""
    manifest = pod.manifest()
    env = manifest["spec"]["containers"][0].setdefault("env", [])
    env.append({"name": "KVPN_KEEPALIVE_INTERVAL", "value": str(AGENT_KEEPALIVE_SECONDS)})
    return manifest


class Keeper(Protocol):
    """A session's claim on its Service (:class:`LockKeeper`, or a mesh member's keeper)."""

    lost: asyncio.Event

    async def refresh(self) -> None: ...


class InterceptLink:
    """The SSH tunnel to an intercept session's shadow pod, with its remote forwards.

    The first tunnel is opened by :meth:`connect_first` (from :func:`start_shadow`); later
    ones by ``link.connect()`` (:class:`~kvpn.shadow_link.ShadowLink`: the same pod, or the
    same pod created again). :meth:`serve` runs on each: listen on every target port, then
    add the serving labels."""

    def __init__(
        self,
        kube: KubeClients,
        configuration: Any,
        pod: InterceptPodPlan,
        key: asyncssh.SSHKey,
        host_key: asyncssh.SSHKey,
        out: Out,
        config: LinkConfig,
    ) -> None:
        self._kube = kube
        self._configuration = configuration
        self._key = key
        self._host_key = host_key
        self.pod = pod
        self.config = config
        self.link = ShadowLink(
            kube.core,
            configuration,
            pod.shadow,
            client_key=key,
            host_key=host_key,
            transport="portforward",
            direct_peer=None,
            out=out,
            keepalive_interval=config.keepalive_interval,
            keepalive_count_max=config.keepalive_count_max,
            manifest=intercept_manifest(pod),
            after_connect=self.serve,
        )
        self.first: ShadowTunnel | None = None
        self.supervisor: LinkSupervisor | None = None

    @property
    def tunnel(self) -> ShadowTunnel | None:
        """The tunnel in use (None before the first one)."""
        if self.supervisor is not None:
            tunnel = self.supervisor.tunnel
            return tunnel if isinstance(tunnel, ShadowTunnel) else self.first
        return self.first

    async def connect_first(self) -> ShadowTunnel:
        pod = self.pod
        transport = PortForwardTransport(
            self._configuration, pod.namespace, pod.name, pod.shadow.port
        )
        tunnel = await ShadowTunnel.connect(
            transport,
            client_key=self._key,
            host_key=self._host_key,
            keepalive_interval=self.config.keepalive_interval,
            keepalive_count_max=self.config.keepalive_count_max,
        )
        self.first = tunnel
        await self.serve(tunnel)
        return tunnel

    async def serve(self, tunnel: ShadowTunnel) -> None:
        pod = self.pod
        for forward in pod.forwards:
            try:
                await tunnel.connection.forward_remote_port(
                    "0.0.0.0", forward.target_port, LOCAL_HOST, forward.local_port
                )
            except asyncssh.ChannelListenError as exc:
                # after a reconnect: the agent may still hold the old connection's listener
                # until it notices that connection is gone (the next attempt tries again)
                raise TunnelError(
                    f"the shadow agent cannot listen on port {forward.target_port}: {exc}"
                ) from None
        if pod.serving_labels:
            await self._kube.patch_pod(pod.namespace, pod.name, pod.serving_patch())

    async def close(self) -> None:
        """Close the tunnel in use (an undo step)."""
        if self.supervisor is not None:
            await self.supervisor.close_tunnel()
        elif self.first is not None:
            await self.first.close()


async def start_shadow(
    kube: KubeClients,
    configuration: Any,
    pod: InterceptPodPlan,
    key: asyncssh.SSHKey,
    undo: UndoStack,
    out: Out,
    *,
    config: LinkConfig | None = None,
) -> InterceptLink:
    """Create the shadow pod, connect to it, and listen on every forward's target port."""
    undo.push(f"delete shadow pod {pod.name}", lambda: kube.delete_pod(pod.namespace, pod.name))
    await kube.create_pod(pod.namespace, intercept_manifest(pod))
    out(f"shadow pod {pod.namespace}/{pod.name} created")
    ready = await wait_shadow_ready(
        kube.core, pod.shadow, lambda p: out(f"shadow pod: {p.describe()}")
    )
    link = InterceptLink(kube, configuration, pod, key, ready.host_key, out, config or LinkConfig())
    undo.push("close the SSH tunnel", link.close)
    await link.connect_first()
    return link


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


@dataclass(frozen=True)
class SessionFacts:
    """What ``kvpn status`` says about an intercept session besides its link."""

    kind: str  # exchange, preview, mesh
    session: str
    namespace: str
    service: str
    mode: str = ""
    mark: str = ""
    ports: tuple[str, ...] = ()
    state_dir: Path | None = None  # None: user_state_dir()

    def record(self, shadow_pod: str) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "session": self.session,
            "kind": self.kind,
            "namespace": self.namespace,
            "service": f"{self.namespace}/{self.service}",
            "mode": self.mode,
            "mark": self.mark,
            "ports": list(self.ports),
            "shadow_pod": shadow_pod,
            "transport": "portforward",
        }


class StatusFiles:
    """``<state>/sessions/<id>.json`` and ``<id>.status.json`` of one intercept session."""

    def __init__(self, sessions_dir: Path, facts: SessionFacts) -> None:
        self.record_path = sessions_dir / f"{facts.session}.json"
        self.status_path = status_path(sessions_dir, facts.session)
        self._facts = facts

    def write_record(self, shadow_pod: str) -> None:
        fd, temp = tempfile.mkstemp(
            dir=self.record_path.parent, prefix=f".{self.record_path.name}.", suffix=".tmp"
        )
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self._facts.record(shadow_pod), f, indent=1)
            os.replace(temp, self.record_path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    def publish(self, supervisor: LinkSupervisor, link: InterceptLink) -> None:
        snapshot = supervisor.snapshot()
        mono = asyncio.get_running_loop().time()
        wall = time.time()
        facts = self._facts
        status = live_status(
            facts.session,
            snapshot,
            pid_start=DnsOwner.this_process(facts.session).started,
            mono=mono,
            wall=wall,
            shadow_pod=f"{link.pod.namespace}/{link.pod.name}",
            pods_recreated=link.link.pods_recreated,
            transport="portforward",
            kind=facts.kind,
            service=f"{facts.namespace}/{facts.service}",
            mode=facts.mode,
            mark=facts.mark,
            ports=facts.ports,
        )
        try:
            write_status(self.status_path, status)
        except OSError as exc:
            log.warning("cannot write the status file %s: %s", self.status_path, exc)

    async def remove(self) -> None:
        for path in (self.status_path, self.record_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def open_status_files(facts: SessionFacts, link: InterceptLink, out: Out) -> StatusFiles | None:
    """The session's files, the record written; None (said once) when the state directory
    cannot be used: the session runs on without them."""
    sessions_dir = (facts.state_dir or user_state_dir()) / "sessions"
    try:
        ensure_private_dir(sessions_dir)
        ensure_private_dir(sessions_dir.parent)
        files = StatusFiles(sessions_dir, facts)
        files.write_record(f"{link.pod.namespace}/{link.pod.name}")
    except OSError as exc:
        out(f"note: no status for kvpn status: cannot use {sessions_dir}: {exc}")
        return None
    return files


async def _first_of(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def supervise(
    link: InterceptLink,
    keeper: Keeper,
    stop: asyncio.Event,
    out: Out,
    *,
    undo: UndoStack,
    facts: SessionFacts,
    lost: str = "the lock was lost",
    verb: str = "restoring",
) -> int:
    """Keep the tunnel up (reconnecting as long as it takes) until ``stop`` (0) or the lock
    or membership is lost (1, after saying ``lost``; ``verb``)."""
    tunnel = link.tunnel
    if tunnel is None:
        raise TunnelError("no tunnel to the shadow pod")

    async def reconnect() -> ShadowTunnel:
        await keeper.refresh()  # raises LockLost (and sets keeper.lost) if it is not ours
        return await link.link.connect()

    files = open_status_files(facts, link, out)
    if files is not None:  # one step removes both: the record's journal entry goes last
        undo.record("write the status file", undo_remove_file(files.status_path))
        undo.push("remove the session files", files.remove, undo_remove_file(files.record_path))

    def publish() -> None:
        if files is not None and link.supervisor is not None:
            files.publish(link.supervisor, link)

    supervisor = LinkSupervisor(
        NoDataPlane(), tunnel, reconnect, out=out, publish=publish, config=link.config
    )
    link.supervisor = supervisor
    end = asyncio.Event()
    watcher = asyncio.ensure_future(_first_of(stop, keeper.lost))
    watcher.add_done_callback(lambda _: end.set())
    try:
        await supervisor.run(end)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    if stop.is_set():
        return 0
    out(f"{lost}; {verb}")
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
    from kvpn.event_loop import run as run_event_loop  # uvloop when installed

    return run_event_loop(main())
