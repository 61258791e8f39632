"""The sandbox kubelet: runs the pods bound to the node as processes in network namespaces.

Theory of operation
-------------------
One reconcile loop, woken by store events and every ``resync_interval`` seconds, compares the
pods in the store with the ``PodWorker`` it runs:

* a pod without ``spec.nodeName`` is bound to this node (the sandbox's whole scheduler), unless
  its ``nodeSelector`` does not match the node, which leaves it Pending/Unschedulable;
* a pod bound here without a worker gets one: it takes a pod IP, sets up the pod's netns
  (``network.setup_pod_network``) and runs one task per container;
* a pod with ``metadata.deletionTimestamp`` is stopped gracefully (SIGTERM to each container's
  process group, SIGKILL after the grace period), its network torn down, its IP freed and the
  pod finally removed from the store;
* a pod gone from the store (forced delete) has its processes killed at once.

A container task starts the container's process (``ip netns exec <netns> [setpriv ...]
argv``; logs go straight to a file), waits for it, and restarts it per ``restartPolicy`` with
exponential back-off. Probe tasks run readiness and liveness probes from the kubelet's own
process (which lives in the node netns, so it reaches pod IPs). Every change re-computes the pod
status with ``kubelet_logic.pod_status`` and writes it through ``api.update(...,
subresource="status")`` when it differs. All decisions are in ``sandbox/kubelet_logic.py``;
this module only moves processes, timers and sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ipaddress
import logging
import os
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sandbox import kubelet_logic as logic
from sandbox.apiserver.resources import CONFIGMAPS, NODES, PODS, SECRETS, SERVICES
from sandbox.apiserver.store import BadRequest, Obj, StoreError, now_rfc3339
from sandbox.config import SandboxConfig
from sandbox.inside_netns import inside_netns
from sandbox.kubelet_probes import ProbeRunner

log = logging.getLogger("sandbox.kubelet")

NETWORK_RETRY_S = 2.0
CONFIG_RETRY_S = 2.0
KILL_WAIT_S = 5.0
GRACE_POLL_S = 0.5
DEFAULT_SCHEDULER = "default-scheduler"


class NetworkModule(Protocol):
    def setup_pod_network(
        self, config: SandboxConfig, netns: str, ip: str, namespace: str
    ) -> object: ...

    def teardown_pod_network(self, config: SandboxConfig, netns: str) -> None: ...


class ApiLike(Protocol):
    store: Any

    def get(self, rt: Any, namespace: str | None, name: str) -> Obj: ...

    def update(
        self, rt: Any, namespace: str | None, name: str, obj: Obj, *, subresource: str | None = None
    ) -> Obj: ...


@dataclass(frozen=True, slots=True)
class ExecTarget:
    """How to run a command inside a container (for ``exec`` and exec probes)."""

    argv: list[str]
    env: dict[str, str]
    cwd: str


@dataclass(frozen=True, slots=True)
class LogSource:
    """A container attempt's log file and whether its process may still write to it."""

    path: Path
    live: Callable[[], bool]


def _host_network(pod: Obj) -> bool:
    return bool(pod.get("spec", {}).get("hostNetwork"))


class Kubelet:
    def __init__(
        self,
        api: ApiLike,
        config: SandboxConfig,
        network: NetworkModule,
        *,
        python: str = sys.executable,
        resync_interval: float = 1.0,
        backoff_base: float = 1.0,
        backoff_cap: float = 10.0,
    ) -> None:
        self.api = api
        self.config = config
        self.network = network
        self.python = python
        self.bin_dir = str(Path(python).parent)
        self.resync_interval = resync_interval
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._workers: dict[str, PodWorker] = {}
        self._ips: dict[str, ipaddress.IPv4Address] = {}  # pod uid -> IP
        self._wake: asyncio.Event | None = None
        self._stopping = False

    # -- names and places ------------------------------------------------------------------

    def pod_netns(self, pod: Obj) -> str:
        if _host_network(pod):
            return self.config.node_netns
        return self.config.pod_netns(pod["metadata"]["uid"])

    def netns_prefix(self, pod: Obj) -> list[str]:
        """argv prefix that enters the pod's netns (none for hostNetwork: we are the node)."""
        return [] if _host_network(pod) else ["ip", "netns", "exec", self.pod_netns(pod)]

    def pod_ip(self, pod: Obj) -> str | None:
        if _host_network(pod):
            return str(self.config.node_address)
        ip = self._ips.get(pod.get("metadata", {}).get("uid", ""))
        return str(ip) if ip is not None else None

    def pod_log_dir(self, pod: Obj) -> Path:
        meta = pod["metadata"]
        return self.config.state_dir / "logs" / f"{meta['namespace']}_{meta['name']}_{meta['uid']}"

    def log_path(self, pod: Obj, container: str, *, attempt: int | None = None) -> Path:
        """The log file of a container's current (or given) attempt."""
        if attempt is None:
            worker = self._workers.get(pod["metadata"]["uid"])
            record = worker.records.get(container) if worker else None
            attempt = record.restart_count if record is not None else 0
        return self.pod_log_dir(pod) / container / f"{attempt}.log"

    # -- what pod streams use --------------------------------------------------------------

    def _running_worker(self, pod: Obj, container: str) -> tuple[PodWorker, logic.ContainerRecord]:
        name = pod["metadata"]["name"]
        if not pod.get("spec", {}).get("nodeName"):
            raise BadRequest(f"pod {name} does not have a host assigned")
        worker = self._workers.get(pod["metadata"]["uid"])
        record = worker.records.get(container) if worker else None
        if worker is None or record is None:
            raise BadRequest(f'container "{container}" in pod "{name}" is not available')
        return worker, record

    def exec_target(self, pod: Obj, container: str, command: list[str]) -> ExecTarget:
        worker, record = self._running_worker(pod, container)
        if record.state is not logic.ContainerState.RUNNING:
            raise BadRequest(f'container not found ("{container}")')
        return worker.exec_target(container, command)

    def log_source(self, pod: Obj, container: str, *, previous: bool = False) -> LogSource:
        name = pod["metadata"]["name"]
        worker = self._workers.get(pod["metadata"]["uid"])
        record = worker.records.get(container) if worker else None
        if worker is None or record is None or not record.has_run:
            reason = record.reason if record is not None else "ContainerCreating"
            raise BadRequest(
                f'container "{container}" in pod "{name}" is waiting to start: {reason}'
            )
        attempt = record.restart_count
        if previous:
            if attempt == 0:
                raise BadRequest(
                    f'previous terminated container "{container}" in pod "{name}" not found'
                )
            attempt -= 1
        path = self.log_path(pod, container, attempt=attempt)
        current = attempt

        def live() -> bool:
            return (
                not worker.finished
                and record.restart_count == current
                and record.state is logic.ContainerState.RUNNING
            )

        return LogSource(path, live)

    async def open_port(
        self, pod: Obj, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to ``localhost:port`` inside the pod's netns, as a real kubelet does."""
        if _host_network(pod):
            return await asyncio.open_connection("127.0.0.1", port)
        sock = await _socket_in_netns(self.pod_netns(pod))
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    # -- reconcile loop --------------------------------------------------------------------

    async def run(self) -> None:
        self._wake = asyncio.Event()
        sub = self.api.store.subscribe()
        pump = asyncio.create_task(self._pump(sub))
        try:
            while not self._stopping:
                self._wake.clear()
                try:
                    self.sync()
                except Exception:  # one bad pod must not stop the node
                    log.exception("kubelet sync failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.resync_interval)
        finally:
            pump.cancel()
            sub.close()

    async def _pump(self, sub: Any) -> None:
        async for event in sub:
            if event.resource.key == PODS.key and self._wake is not None:
                self._wake.set()

    def sync(self) -> None:
        pods, _ = self.api.store.list(PODS)
        seen: set[str] = set()
        for pod in pods:
            try:
                self._sync_pod(pod, seen)
            except Exception:  # one bad pod must not stop the others
                meta = pod.get("metadata", {})
                log.exception("kubelet: pod %s/%s", meta.get("namespace"), meta.get("name"))
        for uid, worker in list(self._workers.items()):
            if uid not in seen:
                worker.kill()

    def _sync_pod(self, pod: Obj, seen: set[str]) -> None:
        spec = pod.get("spec", {})
        node = spec.get("nodeName")
        if not node:
            scheduler = spec.get("schedulerName") or DEFAULT_SCHEDULER
            if scheduler == DEFAULT_SCHEDULER and not pod["metadata"].get("deletionTimestamp"):
                self._bind(pod)
            return
        if node != self.config.node_name:
            return
        uid = pod["metadata"]["uid"]
        seen.add(uid)
        worker = self._workers.get(uid)
        if worker is None and not self._stopping:
            self._start_worker(pod)
        elif worker is not None:
            worker.update(pod)

    def _bind(self, pod: Obj) -> None:
        meta = pod["metadata"]
        selector = pod["spec"].get("nodeSelector") or {}
        node = self.api.store.find(NODES, None, self.config.node_name) or {}
        labels = node.get("metadata", {}).get("labels") or {}
        if any(labels.get(k) != v for k, v in selector.items()):
            self._write_unschedulable(pod)
            return
        pod["spec"]["nodeName"] = self.config.node_name
        try:
            self.api.update(PODS, meta["namespace"], meta["name"], pod)
        except StoreError as e:
            log.info("binding pod %s/%s: %s", meta["namespace"], meta["name"], e)

    def _write_unschedulable(self, pod: Obj) -> None:
        old = pod.get("status") or {}
        conditions = [c for c in old.get("conditions") or [] if c.get("type") == "PodScheduled"]
        if conditions and conditions[0].get("reason") == "Unschedulable":
            return
        status = {
            "phase": "Pending",
            "qosClass": old.get("qosClass", "BestEffort"),
            "conditions": [{
                "type": "PodScheduled", "status": "False", "lastProbeTime": None,
                "lastTransitionTime": now_rfc3339(), "reason": "Unschedulable",
                "message": "0/1 nodes are available: 1 node(s) didn't match Pod's node "
                           "affinity/selector.",
            }],
        }  # fmt: skip
        self.write_status(pod, status)

    def _start_worker(self, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        if not _host_network(pod):
            preferred = None
            with contextlib.suppress(ValueError):
                preferred = ipaddress.IPv4Address(pod.get("status", {}).get("podIP", ""))
            ip = logic.allocate_ip(
                self.config.node_pod_cidr, self._ips.values(), preferred=preferred
            )
            if ip is None:
                log.error("no free pod IP in %s for pod %s", self.config.node_pod_cidr, uid)
                return
            self._ips[uid] = ip
        worker = PodWorker(self, pod)
        self._workers[uid] = worker
        worker.start()

    def forget(self, uid: str) -> None:
        self._workers.pop(uid, None)
        self._ips.pop(uid, None)
        if self._wake is not None:
            self._wake.set()

    def write_status(self, pod: Obj, status: Obj) -> Obj | None:
        """Write a pod's status if it changed; None if the pod is gone."""
        meta = pod["metadata"]
        current: Obj | None = self.api.store.find(PODS, meta["namespace"], meta["name"])
        if current is None or current["metadata"].get("uid") != meta.get("uid"):
            return None
        if current.get("status") == status:
            return current
        current["status"] = status
        current["metadata"].pop("resourceVersion", None)
        try:
            written: Obj = self.api.update(
                PODS, meta["namespace"], meta["name"], current, subresource="status"
            )
            return written
        except StoreError as e:
            log.info("status of pod %s/%s: %s", meta["namespace"], meta["name"], e)
            return None

    async def stop(self) -> None:
        """Kill every container process and tear down every pod network."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        workers = list(self._workers.values())
        for worker in workers:
            worker.kill()
        await asyncio.gather(*(w.wait() for w in workers), return_exceptions=True)

    # -- helpers for workers ---------------------------------------------------------------

    def lookup(self, namespace: str) -> logic.Lookup:
        types = {"configmaps": CONFIGMAPS, "secrets": SECRETS}

        def find(plural: str, name: str) -> Obj | None:
            found: Obj | None = self.api.store.find(types[plural], namespace, name)
            return found

        return find

    def services(self, namespace: str) -> list[Obj]:
        items, _ = self.api.store.list(SERVICES, namespace)
        return list(items)


async def _socket_in_netns(netns: str) -> socket.socket:
    """A TCP socket created inside ``netns`` (in a throw-away thread: setns is per thread)."""

    def make() -> socket.socket:
        with inside_netns(netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setblocking(False)
        return sock

    loop = asyncio.get_running_loop()
    fut: asyncio.Future[socket.socket] = loop.create_future()

    def thread_main() -> None:
        try:
            result = make()
        except BaseException as e:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(_settle, fut, None, e)
        else:
            loop.call_soon_threadsafe(_settle, fut, result, None)

    threading.Thread(target=thread_main, name=f"netns-socket-{netns}", daemon=True).start()
    return await fut


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():
        if result is not None:
            result.close()
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class PodWorker:
    """Runs one pod: network, container tasks, probes, status, graceful termination."""

    def __init__(self, kubelet: Kubelet, pod: Obj) -> None:
        self.kubelet = kubelet
        self.pod = copy.deepcopy(pod)
        meta = self.pod["metadata"]
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.records: dict[str, logic.ContainerRecord] = {}
        for c in self.pod["spec"].get("containers") or []:
            self.records[c["name"]] = logic.ContainerRecord(
                c["name"], str(c.get("image", "")), logic.image_id(c)
            )
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.envs: dict[str, dict[str, str]] = {}
        self.terminating = asyncio.Event()
        if meta.get("deletionTimestamp"):
            self.terminating.set()  # deleted before it ever ran: just clean up
        self.killed = False
        self.finished = False
        self.network_ready = False
        self.start_time = now_rfc3339()
        self._task: asyncio.Task[None] | None = None
        self._probes = ProbeRunner(self)

    # -- control from the kubelet ----------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"pod {self.namespace}/{self.name}")

    async def wait(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    def update(self, pod: Obj) -> None:
        self.pod = copy.deepcopy(pod)
        if pod["metadata"].get("deletionTimestamp"):
            self.terminating.set()

    def kill(self) -> None:
        """Removed from the store (or the kubelet stops): SIGKILL everything now."""
        self.killed = True
        self.terminating.set()
        for proc in self.procs.values():
            _signal_group(proc, signal.SIGKILL)

    # -- pod spec helpers ------------------------------------------------------------------

    def container_spec(self, name: str) -> Obj:
        for c in self.pod["spec"].get("containers") or []:
            if c.get("name") == name:
                return dict(c)
        raise KeyError(name)

    def exec_target(self, name: str, command: list[str]) -> ExecTarget:
        """A command run inside container ``name``: its netns, identity, env and cwd."""
        spec = self.container_spec(name)
        identity = logic.run_as(self.pod, spec)
        argv = [*self.kubelet.netns_prefix(self.pod), *identity.setpriv_prefix(), *command]
        return ExecTarget(argv, dict(self.envs.get(name, {})), self.cwd(spec))

    def cwd(self, container: Obj) -> str:
        return str(container.get("workingDir") or "/")

    @property
    def ip(self) -> str:
        return self.kubelet.pod_ip(self.pod) or ""

    @property
    def host_ip(self) -> str:
        return str(self.kubelet.config.node_address)

    def publish(self) -> None:
        if self.killed:
            return
        status = logic.pod_status(
            self.pod,
            list(self.records.values()),
            now=now_rfc3339(),
            pod_ip=self.ip if self.network_ready else None,
            host_ip=self.host_ip,
            start_time=self.start_time,
        )
        written = self.kubelet.write_status(self.pod, status)
        if written is not None:
            self.pod = written

    # -- lifecycle -------------------------------------------------------------------------

    async def _run(self) -> None:
        tasks: list[asyncio.Task[None]] = []
        try:
            self.publish()
            if not await self._setup_network():
                return
            self.network_ready = True
            self.publish()
            tasks = [asyncio.create_task(self._container_loop(name)) for name in self.records]
            await self.terminating.wait()
            await self._terminate(tasks)
        except Exception:
            log.exception("pod %s/%s worker failed", self.namespace, self.name)
        finally:
            for t in tasks:
                t.cancel()
            for proc in self.procs.values():
                _signal_group(proc, signal.SIGKILL)
            self._probes.stop_all()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.finished = True
            await self._teardown()

    async def _setup_network(self) -> bool:
        if _host_network(self.pod):
            return not self.terminating.is_set()
        kubelet = self.kubelet
        netns = kubelet.pod_netns(self.pod)
        while not self.terminating.is_set():
            try:
                await asyncio.to_thread(
                    kubelet.network.setup_pod_network,
                    kubelet.config, netns, self.ip, self.namespace,
                )  # fmt: skip
                return True
            except Exception as e:
                log.warning("pod %s/%s network: %s", self.namespace, self.name, e)
                for record in self.records.values():
                    if record.state is logic.ContainerState.WAITING:
                        record.set_waiting("ContainerCreating", f"pod network: {e}")
                self.publish()
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(
                        kubelet.network.teardown_pod_network, kubelet.config, netns
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.terminating.wait(), NETWORK_RETRY_S)
        return False

    async def _teardown(self) -> None:
        kubelet = self.kubelet
        if not _host_network(self.pod):
            try:
                await asyncio.to_thread(
                    kubelet.network.teardown_pod_network,
                    kubelet.config,
                    kubelet.pod_netns(self.pod),
                )
            except Exception as e:
                log.warning("pod %s/%s network teardown: %s", self.namespace, self.name, e)
        kubelet.forget(self.uid)
        if kubelet._stopping and not self.pod["metadata"].get("deletionTimestamp"):
            return  # control plane shutting down: the pod object stays
        shutil.rmtree(kubelet.pod_log_dir(self.pod), ignore_errors=True)
        if self.killed:
            return
        current = kubelet.api.store.find(PODS, self.namespace, self.name)
        if current is not None and current["metadata"].get("uid") == self.uid:
            with contextlib.suppress(StoreError):
                kubelet.api.store.delete(PODS, self.namespace, self.name)

    def _grace_period(self) -> float:
        grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
        if not isinstance(grace, int):
            grace = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        return float(max(0, grace)) if isinstance(grace, int) else 30.0

    async def _terminate(self, tasks: list[asyncio.Task[None]]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        if not self.killed:
            for proc in self.procs.values():
                _signal_group(proc, signal.SIGTERM)
        # The grace period may shrink while we wait (a second delete with a shorter one).
        while tasks and not self.killed:
            remaining = started + self._grace_period() - loop.time()
            if remaining <= 0:
                break
            _, pending = await asyncio.wait(tasks, timeout=min(remaining, GRACE_POLL_S))
            if not pending:
                break
        for proc in self.procs.values():
            _signal_group(proc, signal.SIGKILL)
        if tasks:
            await asyncio.wait(tasks, timeout=KILL_WAIT_S)

    # -- one container ---------------------------------------------------------------------

    async def _container_loop(self, name: str) -> None:
        record = self.records[name]
        policy = self.pod["spec"].get("restartPolicy", "Always")
        while not self.terminating.is_set():
            try:
                proc = await self._start_container(name)
            except logic.ContainerConfigError as e:
                record.set_waiting(e.reason, e.message)
                self.publish()
                await self._sleep_unless_terminating(CONFIG_RETRY_S)
                continue
            if proc is not None:
                self.procs[name] = proc
                self._probes.start(name)
                self.publish()
                returncode = await proc.wait()
                self._probes.stop(name)
                record.set_terminated(logic.exit_code_of(returncode), now_rfc3339())
                self.procs.pop(name, None)
                self.publish()
            if self.terminating.is_set() or not logic.should_restart(policy, record.exit_code):
                return
            delay = logic.backoff_delay(
                record.restart_count,
                base=self.kubelet.backoff_base,
                cap=self.kubelet.backoff_cap,
            )
            if delay > 0:
                record.set_waiting(
                    "CrashLoopBackOff",
                    f"back-off {delay:g}s restarting failed container={name} "
                    f"pod={logic.pod_ref(self.pod)}",
                )
            else:
                record.set_waiting("ContainerCreating")
            self.publish()
            await self._sleep_unless_terminating(delay)

    async def _sleep_unless_terminating(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.terminating.wait(), seconds)

    async def _start_container(self, name: str) -> asyncio.subprocess.Process | None:
        """Start a container's process; None if it could not start (recorded StartError)."""
        kubelet = self.kubelet
        spec = self.container_spec(name)
        record = self.records[name]
        identity = logic.run_as(self.pod, spec)
        env = logic.container_env(
            self.pod,
            spec,
            config=kubelet.config,
            pod_ip=self.ip,
            host_ip=self.host_ip,
            bin_dir=kubelet.bin_dir,
            services=kubelet.services(self.namespace),
            lookup=kubelet.lookup(self.namespace),
        )
        argv = logic.container_argv(spec, kubelet.python, env)
        self.envs[name] = env
        cwd = self.cwd(spec)
        attempt = record.next_attempt
        problem = None
        if shutil.which(argv[0], path=env["PATH"]) is None:
            problem = f'exec: "{argv[0]}": executable file not found in $PATH'
        elif not os.path.isdir(cwd):
            problem = f'chdir to cwd ("{cwd}") set in config.json failed: no such file or directory'
        if problem is not None:
            self._record_start_error(record, attempt, problem)
            return None
        path = kubelet.log_path(self.pod, name, attempt=attempt)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            kubelet.log_path(self.pod, name, attempt=attempt - 2).unlink()
        with open(path, "ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *kubelet.netns_prefix(self.pod),
                *identity.setpriv_prefix(),
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        record.set_running(proc.pid, now_rfc3339())
        return proc

    def _record_start_error(
        self, record: logic.ContainerRecord, attempt: int, message: str
    ) -> None:
        record.set_start_failed(now_rfc3339(), message)
        path = self.kubelet.log_path(self.pod, record.name, attempt=attempt)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{message}\n")
        self.publish()


def _signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
