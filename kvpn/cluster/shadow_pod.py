"""The shadow pod: its plan (manifest), and create / wait-until-ready / delete.

The plan is a plain frozen object built before anything touches the cluster, so it can be
printed by ``--dry-run``, journaled, and undone on exit. The pod runs the shadow agent
(``python -m kvpn.shadow``) under the PodSecurity "restricted" profile: non-root user 1000,
no capabilities, no privilege escalation, read-only root file system, RuntimeDefault
seccomp. It also asks for the namespaced safe sysctl ``net.ipv4.ping_group_range`` so the
unprivileged agent may open ICMP ping sockets.

Readiness is the agent's own announcement: the pod is running and its log contains the
line ``KVPN-HOST-KEY <openssh public key>``, printed once the SSH server listens. The
client pins that key; the log is read through the authenticated Kubernetes API.

The kubernetes client is synchronous; every call runs in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import asyncssh
from kubernetes.client.exceptions import ApiException

from kvpn.cluster.forbidden import describe_api_error
from kvpn.cluster.settled_call import call_settled
from kvpn.shadow.agent import DEFAULT_PORT, HOST_KEY_LOG_PREFIX

DEFAULT_SHADOW_IMAGE = "kvpn/shadow:0.1.0"
CONTAINER_NAME = "shadow"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
SESSION_LABEL = "kvpn.dev/session"
USER_ANNOTATION = "kvpn.dev/user"
STARTED_AT_ANNOTATION = "kvpn.dev/started-at"

# Container waiting reasons that will not fix themselves while we wait.
FATAL_WAITING_REASONS = frozenset(
    {
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "CrashLoopBackOff",
        "RunContainerError",
    }
)

_SESSION_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")


class ShadowPodError(Exception):
    """The shadow pod could not be created, failed, or never became ready."""


def restricted_container_fields() -> dict[str, Any]:
    """``resources`` and ``securityContext`` of a container of the shadow image (agent or
    mesh router): PodSecurity "restricted", user 1000, read-only root file system. A fresh
    dict each time."""
    return {
        "resources": {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"memory": "256Mi"},
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


@dataclass(frozen=True, slots=True)
class ShadowPodPlan:
    namespace: str
    name: str
    image: str
    session_id: str
    user: str
    started_at: str
    authorized_key: str
    port: int = DEFAULT_PORT

    @classmethod
    def new(
        cls,
        namespace: str,
        authorized_key: str,
        *,
        user: str,
        image: str = DEFAULT_SHADOW_IMAGE,
        session_id: str | None = None,
        now: datetime | None = None,
        port: int = DEFAULT_PORT,
    ) -> ShadowPodPlan:
        session = session_id or secrets.token_hex(4)
        if not _SESSION_ID.match(session):
            raise ValueError(f"session id {session!r} is not a valid label value")
        started = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
        return cls(
            namespace=namespace,
            name=f"kvpn-shadow-{session}",
            image=image,
            session_id=session,
            user=user,
            started_at=started,
            authorized_key=authorized_key.strip(),
            port=port,
        )

    @property
    def labels(self) -> dict[str, str]:
        return {
            MANAGED_BY_LABEL: "kvpn",
            "app.kubernetes.io/name": "kvpn-shadow",
            SESSION_LABEL: self.session_id,
        }

    def manifest(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": self.labels,
                "annotations": {
                    USER_ANNOTATION: self.user,
                    STARTED_AT_ANNOTATION: self.started_at,
                },
            },
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "terminationGracePeriodSeconds": 2,
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": 1000,
                    "runAsGroup": 1000,
                    "seccompProfile": {"type": "RuntimeDefault"},
                    "sysctls": [{"name": "net.ipv4.ping_group_range", "value": "0 2147483647"}],
                },
                "containers": [
                    {
                        "name": CONTAINER_NAME,
                        "image": self.image,
                        "imagePullPolicy": "IfNotPresent",
                        "env": [
                            {"name": "KVPN_AUTHORIZED_KEY", "value": self.authorized_key},
                            {"name": "KVPN_LISTEN_PORT", "value": str(self.port)},
                            {"name": "PYTHONUNBUFFERED", "value": "1"},
                        ],
                        "ports": [{"name": "ssh", "containerPort": self.port, "protocol": "TCP"}],
                        **restricted_container_fields(),
                    }
                ],
            },
        }


@dataclass(frozen=True, slots=True)
class ShadowPodProgress:
    """What the pod is doing, as reported to the user while waiting."""

    phase: str
    reason: str | None = None
    message: str | None = None
    pod_ip: str | None = None
    running: bool = False
    exit_code: int | None = None

    def describe(self) -> str:
        text = self.phase
        if self.reason:
            text += f" ({self.reason})"
        if self.message:
            text += f": {self.message}"
        return text


class ShadowPodReady(NamedTuple):
    pod_ip: str
    host_key: asyncssh.SSHKey


def _get(obj: Any, *path: str) -> Any:
    """Walk attributes of kubernetes models (None-safe)."""
    for name in path:
        if obj is None:
            return None
        obj = getattr(obj, name, None)
    return obj


def pod_progress(pod: Any) -> ShadowPodProgress:
    """Summarise a V1Pod: phase, and the shadow container's waiting/terminated reason."""
    phase = _get(pod, "status", "phase") or "Pending"
    reason = _get(pod, "status", "reason")
    message = _get(pod, "status", "message")
    running = False
    exit_code = None
    for cs in _get(pod, "status", "container_statuses") or []:
        if _get(cs, "name") != CONTAINER_NAME:
            continue
        waiting = _get(cs, "state", "waiting")
        terminated = _get(cs, "state", "terminated")
        if waiting is not None:
            reason = _get(waiting, "reason") or reason
            message = _get(waiting, "message") or message
        elif terminated is not None:
            reason = _get(terminated, "reason") or "Terminated"
            message = _get(terminated, "message") or message
            exit_code = _get(terminated, "exit_code")
        elif _get(cs, "state", "running") is not None:
            running = True
    if not running and reason is None:
        for cond in _get(pod, "status", "conditions") or []:
            if _get(cond, "type") == "PodScheduled" and _get(cond, "status") == "False":
                reason = _get(cond, "reason")
                message = _get(cond, "message")
    return ShadowPodProgress(
        phase=phase,
        reason=reason,
        message=message,
        pod_ip=_get(pod, "status", "pod_ip"),
        running=running,
        exit_code=exit_code,
    )


def fatal_problem(progress: ShadowPodProgress) -> str | None:
    """Why waiting longer is pointless, or None."""
    if progress.phase in ("Failed", "Succeeded"):
        return f"the shadow pod stopped: {progress.describe()}"
    if progress.exit_code is not None:
        return f"the shadow agent exited with code {progress.exit_code}: {progress.describe()}"
    if progress.reason in FATAL_WAITING_REASONS:
        return f"the shadow pod cannot start: {progress.describe()}"
    return None


def parse_host_key_line(log: str) -> asyncssh.SSHKey | None:
    """The agent's announced host key (the last ``KVPN-HOST-KEY`` line), or None."""
    prefix = HOST_KEY_LOG_PREFIX + " "
    for line in reversed(log.splitlines()):
        if line.startswith(prefix):
            try:
                return asyncssh.import_public_key(line[len(prefix) :].strip())
            except (asyncssh.KeyImportError, ValueError):
                return None
    return None


def _api_reason(exc: ApiException) -> str:
    return describe_api_error(exc)


async def create_shadow_pod(core_v1: Any, plan: ShadowPodPlan) -> None:
    try:
        await call_settled(core_v1.create_namespaced_pod, plan.namespace, plan.manifest())
    except ApiException as exc:
        raise ShadowPodError(
            f"cannot create shadow pod {plan.namespace}/{plan.name}: {_api_reason(exc)}"
        ) from None


async def _log_tail(core_v1: Any, plan: ShadowPodPlan, lines: int = 20) -> str:
    try:
        log = await asyncio.to_thread(
            core_v1.read_namespaced_pod_log,
            plan.name,
            plan.namespace,
            container=CONTAINER_NAME,
            tail_lines=lines,
        )
    except ApiException:
        return ""
    return str(log or "").strip()


async def wait_shadow_ready(
    core_v1: Any,
    plan: ShadowPodPlan,
    on_progress: Callable[[ShadowPodProgress], None],
    *,
    timeout: float = 120.0,
    poll_interval: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
) -> ShadowPodReady:
    """Poll until the agent announced its host key; report each new state to on_progress."""
    deadline = clock() + timeout
    last: ShadowPodProgress | None = None
    while True:
        try:
            pod = await asyncio.to_thread(core_v1.read_namespaced_pod, plan.name, plan.namespace)
        except ApiException as exc:
            if exc.status == 404:
                raise ShadowPodError(
                    f"shadow pod {plan.namespace}/{plan.name} disappeared while starting"
                ) from None
            raise ShadowPodError(
                f"cannot read shadow pod {plan.namespace}/{plan.name}: {_api_reason(exc)}"
            ) from None
        progress = pod_progress(pod)
        if progress != last:
            on_progress(progress)
            last = progress
        problem = fatal_problem(progress)
        if problem is not None:
            tail = await _log_tail(core_v1, plan)
            raise ShadowPodError(problem + (f"\n--- pod log ---\n{tail}" if tail else ""))
        if progress.running and progress.pod_ip:
            host_key = parse_host_key_line(await _log_tail(core_v1, plan, lines=200))
            if host_key is not None:
                return ShadowPodReady(progress.pod_ip, host_key)
        if clock() >= deadline:
            raise ShadowPodError(
                f"shadow pod {plan.namespace}/{plan.name} not ready after {timeout:g}s "
                f"(last state: {last.describe() if last else 'unknown'})"
            )
        await asyncio.sleep(poll_interval)


async def delete_shadow_pod(
    core_v1: Any, plan: ShadowPodPlan, *, grace_period_seconds: int = 0
) -> bool:
    """Delete the pod; False if it was already gone."""
    try:
        await asyncio.to_thread(
            core_v1.delete_namespaced_pod,
            plan.name,
            plan.namespace,
            grace_period_seconds=grace_period_seconds,
        )
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise ShadowPodError(
            f"cannot delete shadow pod {plan.namespace}/{plan.name}: {_api_reason(exc)}"
        ) from None
    return True


def plan_summary(plan: ShadowPodPlan) -> Mapping[str, str]:
    """Short human summary for --dry-run output and journals."""
    return {
        "pod": f"{plan.namespace}/{plan.name}",
        "image": plan.image,
        "session": plan.session_id,
        "user": plan.user,
        "started-at": plan.started_at,
    }
