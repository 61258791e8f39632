"""The sandbox kubelet's decisions, with no processes, sockets or clocks: pure functions.

Theory of operation
-------------------
The kubelet (sandbox/kubelet.py) owns processes and timers; everything it *decides* lives here
so it can be tested from tables of cases:

- what program a container runs (``container_argv``: an explicit ``command``, or the program an
  image name maps to) and as whom (``run_as``, ``setpriv`` flags);
- the environment it gets (``container_env``: service links, ``valueFrom`` references,
  ``envFrom``, ``$(VAR)`` expansion as the real kubelet does it);
- which pod IP is free (``allocate_ip``);
- whether and when an exited container restarts (``should_restart``, ``backoff_delay``);
- the container state machine (``ContainerRecord``: waiting -> running -> terminated ->
  waiting ..., with a table of legal moves) and the pod status built from it (``pod_status``:
  phase, conditions with stable ``lastTransitionTime``, ``containerStatuses``).

A bad pod spec raises ``ContainerConfigError`` carrying the waiting reason a real kubelet
reports (``ErrImagePull``, ``CreateContainerConfigError``); it never escapes as a crash.
"""

from __future__ import annotations

import base64
import enum
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from sandbox.config import SandboxConfig

Obj = dict[str, Any]

# Image repository (registry host, tag and digest stripped) -> `python -m <module>` arguments.
IMAGE_PROGRAMS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "kvpn-sandbox/echo": ("-m", "sandbox.echo_server"),
        "kvpn-sandbox/dns": ("-m", "sandbox.cluster_dns"),
        "kvpn/shadow": ("-m", "kvpn.shadow"),
    }
)
# Environment the "images" above bake in (like ENV lines of a Dockerfile).
IMAGE_ENV: Mapping[str, str] = MappingProxyType({"PYTHONUNBUFFERED": "1"})
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
KUBERNETES_SERVICE_PORT = 443


class ContainerConfigError(Exception):
    """A container that cannot start; ``reason`` is the waiting reason a kubelet reports."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def pod_ref(pod: Obj) -> str:
    """``name_namespace(uid)``, the way kubelet messages name a pod."""
    meta = pod.get("metadata", {})
    return f"{meta.get('name', '')}_{meta.get('namespace', '')}({meta.get('uid', '')})"


# -- images and commands ------------------------------------------------------------------


def image_repository(image: str) -> str:
    """``registry.example:5000/kvpn/shadow:v1@sha256:..`` -> ``kvpn/shadow``."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name = name[:colon]
    parts = name.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]
    if len(parts) > 1 and parts[0] == "library":
        parts = parts[1:]
    return "/".join(parts)


def container_argv(container: Obj, python: str, env: Mapping[str, str]) -> list[str]:
    """The argv a container runs: ``command + args``, or the image's program ``+ args``.

    ``$(VAR)`` references in command and args are expanded from ``env`` like a real kubelet.
    """
    command = container.get("command") or []
    args = container.get("args") or []
    if not all(isinstance(a, str) for a in [*command, *args]):
        raise ContainerConfigError(
            "CreateContainerConfigError", "command and args must be lists of strings"
        )
    expanded_args = [expand_vars(a, env) for a in args]
    if command:
        return [expand_vars(c, env) for c in command] + expanded_args
    image = str(container.get("image") or "")
    program = IMAGE_PROGRAMS.get(image_repository(image))
    if program is None:
        known = ", ".join(sorted(IMAGE_PROGRAMS))
        raise ContainerConfigError(
            "ErrImagePull",
            f'Failed to pull image "{image}": the sandbox has no such image and the container '
            f"sets no command; known images: {known} (any registry or tag), or give a command "
            "to run a host program",
        )
    return [python, *program, *expanded_args]


def image_id(container: Obj) -> str:
    return f"sandbox://{image_repository(str(container.get('image') or ''))}"


_VAR_RE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known names are replaced, ``$$`` is a literal ``$``."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))

    return _VAR_RE.sub(one, text)


# -- identity -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunAs:
    uid: int | None
    gid: int | None
    groups: tuple[int, ...] = ()

    def setpriv_prefix(self) -> list[str]:
        """``setpriv`` arguments that switch to this identity (empty: stay root)."""
        if self.uid is None and self.gid is None and not self.groups:
            return []
        argv = ["setpriv"]
        if self.uid is not None:
            argv += ["--reuid", str(self.uid)]
        argv += ["--regid", str(self.gid if self.gid is not None else 0)]
        if self.groups:
            argv += ["--groups", ",".join(str(g) for g in self.groups)]
        else:
            argv += ["--clear-groups"]
        return [*argv, "--"]


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def run_as(pod: Obj, container: Obj) -> RunAs:
    """The identity from pod- and container-level securityContext (container wins)."""
    pod_sc = pod.get("spec", {}).get("securityContext") or {}
    ctr_sc = container.get("securityContext") or {}

    def pick(key: str) -> Any:
        return ctr_sc[key] if ctr_sc.get(key) is not None else pod_sc.get(key)

    uid = _int_or_none(pick("runAsUser"))
    gid = _int_or_none(pick("runAsGroup"))
    groups = tuple(
        g
        for g in [*(pod_sc.get("supplementalGroups") or []), pod_sc.get("fsGroup")]
        if _int_or_none(g) is not None
    )
    where = f'(pod: "{pod_ref(pod)}", container: {container.get("name", "")})'
    if pick("runAsNonRoot") is True:
        if uid is None:
            # The sandbox's images all run as root, as an image without USER does.
            raise ContainerConfigError(
                "CreateContainerConfigError",
                f"container has runAsNonRoot and image will run as root {where}",
            )
        if uid == 0:
            raise ContainerConfigError(
                "CreateContainerConfigError",
                f"container's runAsUser breaks non-root policy {where}",
            )
    return RunAs(uid, gid, groups)


# -- environment --------------------------------------------------------------------------

Lookup = Callable[[str, str], Obj | None]  # (plural "configmaps"|"secrets", name) -> object


def _env_name(service_name: str) -> str:
    return service_name.upper().replace("-", "_")


def service_link_env(services: Iterable[Obj]) -> dict[str, str]:
    """Docker-link style variables (``ECHO_SERVICE_HOST`` ...) for services with a ClusterIP."""
    env: dict[str, str] = {}
    for svc in services:
        spec = svc.get("spec", {})
        ip = spec.get("clusterIP")
        ports = spec.get("ports") or []
        if not ip or ip == "None" or not ports:
            continue
        name = _env_name(svc.get("metadata", {}).get("name", ""))
        first = ports[0]
        env[f"{name}_SERVICE_HOST"] = ip
        env[f"{name}_SERVICE_PORT"] = str(first.get("port"))
        for p in ports:
            if p.get("name"):
                env[f"{name}_SERVICE_PORT_{_env_name(p['name'])}"] = str(p.get("port"))
        env[f"{name}_PORT"] = (
            f"{str(first.get('protocol', 'TCP')).lower()}://{ip}:{first.get('port')}"
        )
        for p in ports:
            proto = str(p.get("protocol", "TCP"))
            prefix = f"{name}_PORT_{p.get('port')}_{proto.upper()}"
            env[prefix] = f"{proto.lower()}://{ip}:{p.get('port')}"
            env[f"{prefix}_PROTO"] = proto.lower()
            env[f"{prefix}_PORT"] = str(p.get("port"))
            env[f"{prefix}_ADDR"] = ip
    return env


def kubernetes_service_env(config: SandboxConfig) -> dict[str, str]:
    svc = {
        "metadata": {"name": "kubernetes"},
        "spec": {
            "clusterIP": str(config.kubernetes_service_ip),
            "ports": [{"name": "https", "port": KUBERNETES_SERVICE_PORT, "protocol": "TCP"}],
        },
    }
    return service_link_env([svc])


_LABEL_REF_RE = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_ref_value(pod: Obj, field_path: str, *, pod_ip: str, host_ip: str) -> str:
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {})
    simple: Mapping[str, Callable[[], object]] = {
        "metadata.name": lambda: meta.get("name"),
        "metadata.namespace": lambda: meta.get("namespace"),
        "metadata.uid": lambda: meta.get("uid"),
        "spec.nodeName": lambda: spec.get("nodeName"),
        "spec.serviceAccountName": lambda: spec.get("serviceAccountName", "default"),
        "status.podIP": lambda: pod_ip,
        "status.podIPs": lambda: pod_ip,
        "status.hostIP": lambda: host_ip,
        "status.hostIPs": lambda: host_ip,
    }
    getter = simple.get(field_path)
    if getter is not None:
        return str(getter() or "")
    m = _LABEL_REF_RE.match(field_path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    raise ContainerConfigError(
        "CreateContainerConfigError", f'unsupported fieldRef fieldPath "{field_path}"'
    )


def _object_data(obj: Obj, plural: str) -> dict[str, str]:
    data = {k: str(v) for k, v in (obj.get("data") or {}).items()}
    if plural == "secrets":
        decoded = {}
        for k, v in data.items():
            try:
                decoded[k] = base64.b64decode(v).decode("utf-8", "replace")
            except ValueError:
                decoded[k] = ""
        data = decoded
        data.update({k: str(v) for k, v in (obj.get("stringData") or {}).items()})
    return data


_KEY_REFS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {"configMapKeyRef": ("configmaps", "configmap"), "secretKeyRef": ("secrets", "secret")}
)
_ENV_FROM: Mapping[str, tuple[str, str]] = MappingProxyType(
    {"configMapRef": ("configmaps", "configmap"), "secretRef": ("secrets", "secret")}
)


def _key_ref_value(ref_kind: str, ref: Obj, lookup: Lookup) -> str | None:
    plural, what = _KEY_REFS[ref_kind]
    name, key = str(ref.get("name", "")), str(ref.get("key", ""))
    obj = lookup(plural, name)
    if obj is None:
        if ref.get("optional"):
            return None
        raise ContainerConfigError("CreateContainerConfigError", f'{what} "{name}" not found')
    data = _object_data(obj, plural)
    if key not in data:
        if ref.get("optional"):
            return None
        raise ContainerConfigError(
            "CreateContainerConfigError",
            f"couldn't find key {key} in {what.capitalize()} "
            f"{obj.get('metadata', {}).get('namespace', '')}/{name}",
        )
    return data[key]


def container_env(
    pod: Obj,
    container: Obj,
    *,
    config: SandboxConfig,
    pod_ip: str,
    host_ip: str,
    bin_dir: str,
    services: Iterable[Obj] = (),
    lookup: Lookup = lambda plural, name: None,
) -> dict[str, str]:
    """The full environment of a container process, in the order a kubelet builds it."""
    spec = pod.get("spec", {})
    meta = pod.get("metadata", {})
    if spec.get("hostNetwork"):
        hostname = spec.get("nodeName") or config.node_name  # a hostNetwork pod has the node's
    else:
        hostname = spec.get("hostname") or meta.get("name", "")
    env: dict[str, str] = {
        "PATH": f"{bin_dir}:{SYSTEM_PATH}",
        "HOME": "/tmp",
        "HOSTNAME": str(hostname),
    }
    if container.get("command") is None:
        env.update(IMAGE_ENV)
    if spec.get("enableServiceLinks", True):
        env.update(service_link_env(services))
    env.update(kubernetes_service_env(config))
    env["KVPN_SANDBOX_KUBECONFIG"] = str(config.state_dir / "kubeconfig-pods")
    for source in container.get("envFrom") or []:
        prefix = str(source.get("prefix") or "")
        for ref_kind, (plural, what) in _ENV_FROM.items():
            ref = source.get(ref_kind)
            if ref is None:
                continue
            obj = lookup(plural, str(ref.get("name", "")))
            if obj is None:
                if ref.get("optional"):
                    continue
                raise ContainerConfigError(
                    "CreateContainerConfigError", f'{what} "{ref.get("name", "")}" not found'
                )
            env.update({prefix + k: v for k, v in _object_data(obj, plural).items()})
    for item in container.get("env") or []:
        name = item.get("name")
        if not isinstance(name, str) or not name:
            continue
        value_from = item.get("valueFrom")
        if value_from is None:
            env[name] = expand_vars(str(item.get("value", "")), env)
            continue
        value: str | None
        if "fieldRef" in value_from:
            path = str((value_from["fieldRef"] or {}).get("fieldPath", ""))
            value = field_ref_value(pod, path, pod_ip=pod_ip, host_ip=host_ip)
        elif any(k in value_from for k in _KEY_REFS):
            kind = next(k for k in _KEY_REFS if k in value_from)
            value = _key_ref_value(kind, value_from[kind] or {}, lookup)
        else:
            raise ContainerConfigError(
                "CreateContainerConfigError",
                f"env {name}: unsupported valueFrom {sorted(value_from)} in the sandbox",
            )
        if value is not None:
            env[name] = value
    return env


# -- pod IPs ------------------------------------------------------------------------------


def allocate_ip(
    cidr: ipaddress.IPv4Network,
    used: Iterable[ipaddress.IPv4Address],
    *,
    preferred: ipaddress.IPv4Address | None = None,
) -> ipaddress.IPv4Address | None:
    """The lowest free host address of ``cidr``, skipping the gateway (``.1``); None if full.

    ``preferred`` (an address the pod already had) is returned if it is still free.
    """
    taken = set(used)
    gateway = cidr.network_address + 1
    if preferred is not None and preferred in cidr and preferred not in taken:
        if preferred not in (cidr.network_address, cidr.broadcast_address, gateway):
            return preferred
    for ip in cidr.hosts():
        if ip != gateway and ip not in taken:
            return ip
    return None


# -- restarts -----------------------------------------------------------------------------


def should_restart(restart_policy: str, exit_code: int) -> bool:
    return {"Always": True, "OnFailure": exit_code != 0, "Never": False}.get(restart_policy, True)


def backoff_delay(restarts: int, *, base: float, cap: float) -> float:
    """Seconds to wait before restart number ``restarts + 1``: 0, base, 2*base, ... <= cap."""
    if restarts <= 0:
        return 0.0
    return float(min(cap, base * (2 ** (restarts - 1))))


def exit_code_of(returncode: int) -> int:
    """asyncio's returncode (negative for a signal) -> a container exit code (128 + signal)."""
    return 128 - returncode if returncode < 0 else returncode


# -- container state machine --------------------------------------------------------------


class ContainerState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    TERMINATED = "terminated"


_TRANSITIONS: Mapping[ContainerState, frozenset[ContainerState]] = MappingProxyType(
    {
        # WAITING -> TERMINATED: the process could not be started at all (StartError).
        ContainerState.WAITING: frozenset(
            {ContainerState.WAITING, ContainerState.RUNNING, ContainerState.TERMINATED}
        ),
        ContainerState.RUNNING: frozenset({ContainerState.TERMINATED}),
        ContainerState.TERMINATED: frozenset({ContainerState.WAITING}),
    }
)


class IllegalTransition(Exception):
    pass


class ContainerRecord:
    """What the kubelet knows of one container, and its ``containerStatuses`` entry."""

    def __init__(self, name: str, image: str, image_id: str = "") -> None:
        self.name = name
        self.image = image
        self.image_id = image_id
        self.state = ContainerState.WAITING
        self.reason = "ContainerCreating"
        self.message = ""
        self.pid: int | None = None
        self.started_at = ""
        self.finished_at = ""
        self.exit_code = 0
        self.restart_count = 0
        self.ready = False
        self.has_run = False
        self.last_terminated: Obj | None = None

    def _move(self, new: ContainerState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise IllegalTransition(f"container {self.name}: {self.state.value} -> {new.value}")
        if self.state is ContainerState.TERMINATED:
            self.last_terminated = self._terminated()
        self.state = new
        self.ready = False

    def set_waiting(self, reason: str, message: str = "") -> None:
        self._move(ContainerState.WAITING)
        self.reason, self.message = reason, message

    @property
    def next_attempt(self) -> int:
        """The restart count the next started attempt will have (names its log file)."""
        return self.restart_count + 1 if self.has_run else 0

    def _begin_attempt(self, now: str) -> None:
        self.restart_count = self.next_attempt
        self.has_run = True
        self.started_at, self.finished_at = now, ""
        self.reason = self.message = ""

    def set_running(self, pid: int, now: str) -> None:
        self._move(ContainerState.RUNNING)
        self._begin_attempt(now)
        self.pid = pid

    def set_start_failed(self, now: str, message: str) -> None:
        """The runtime could not start the process (missing binary, bad cwd): exit 128."""
        self._move(ContainerState.TERMINATED)
        self._begin_attempt(now)
        self.pid = None
        self.exit_code, self.finished_at = 128, now
        self.reason, self.message = "StartError", message

    def set_terminated(self, exit_code: int, now: str) -> None:
        self._move(ContainerState.TERMINATED)
        self.exit_code, self.finished_at = exit_code, now
        self.reason = "Completed" if exit_code == 0 else "Error"

    @property
    def container_id(self) -> str:
        return f"sandbox://{self.pid}" if self.pid is not None else ""

    def _terminated(self) -> Obj:
        term: Obj = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "containerID": self.container_id,
        }
        if self.message:
            term["message"] = self.message
        if not term["containerID"]:
            del term["containerID"]
        return {"terminated": term}

    def status(self) -> Obj:
        state: Obj
        if self.state is ContainerState.RUNNING:
            state = {"running": {"startedAt": self.started_at}}
        elif self.state is ContainerState.TERMINATED:
            state = self._terminated()
        else:
            waiting: Obj = {"reason": self.reason}
            if self.message:
                waiting["message"] = self.message
            state = {"waiting": waiting}
        out: Obj = {
            "name": self.name,
            "image": self.image,
            "imageID": self.image_id if self.has_run else "",
            "ready": self.ready and self.state is ContainerState.RUNNING,
            "started": self.state is ContainerState.RUNNING,
            "restartCount": self.restart_count,
            "state": state,
            "lastState": dict(self.last_terminated or {}),
        }
        if self.container_id:
            out["containerID"] = self.container_id
        return out


# -- pod status ---------------------------------------------------------------------------


def pod_phase(restart_policy: str, records: Sequence[ContainerRecord]) -> str:
    """The phase rules of the real kubelet's ``getPhase`` (no init containers)."""
    running = waiting = stopped = succeeded = 0
    for r in records:
        if r.state is ContainerState.RUNNING:
            running += 1
        elif r.state is ContainerState.TERMINATED:
            stopped += 1
            succeeded += r.exit_code == 0
        elif r.last_terminated is not None:
            stopped += 1
            succeeded += r.last_terminated["terminated"]["exitCode"] == 0
        else:
            waiting += 1
    if waiting or not records:
        return "Pending"
    if running:
        return "Running"
    if restart_policy == "Always":
        return "Running"
    if stopped == succeeded:
        return "Succeeded"
    if restart_policy == "Never":
        return "Failed"
    return "Running"


def _condition(
    ctype: str, ok: bool, previous: Mapping[str, Obj], now: str, reason: str = "", message: str = ""
) -> Obj:
    status = "True" if ok else "False"
    old = previous.get(ctype)
    since = old.get("lastTransitionTime") if old and old.get("status") == status else None
    cond: Obj = {
        "type": ctype,
        "status": status,
        "lastProbeTime": None,
        "lastTransitionTime": since or now,
    }
    if not ok and reason:
        cond["reason"] = reason
    if not ok and message:
        cond["message"] = message
    return cond


def pod_status(
    pod: Obj,
    records: Sequence[ContainerRecord],
    *,
    now: str,
    pod_ip: str | None,
    host_ip: str,
    start_time: str,
) -> Obj:
    """The ``status`` a kubelet reports for ``pod`` given its containers' records."""
    spec = pod.get("spec", {})
    previous_status = pod.get("status") or {}
    previous = {c.get("type", ""): c for c in previous_status.get("conditions") or []}
    phase = pod_phase(spec.get("restartPolicy", "Always"), records)
    terminal = phase in ("Succeeded", "Failed")
    unready = [r.name for r in records if not r.status()["ready"]]
    all_ready = not unready and bool(records) and not terminal
    if terminal:
        reason, message = "PodCompleted", ""
    else:
        reason = "ContainersNotReady"
        message = f"containers with unready status: [{' '.join(unready)}]"
    conditions = [
        _condition("Initialized", True, previous, now),
        _condition("Ready", all_ready, previous, now, reason, message),
        _condition("ContainersReady", all_ready, previous, now, reason, message),
        _condition("PodScheduled", True, previous, now),
    ]
    status: Obj = {
        "phase": phase,
        "conditions": conditions,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "startTime": start_time,
        "containerStatuses": [r.status() for r in records],
        "qosClass": previous_status.get("qosClass", "BestEffort"),
    }
    if pod_ip:
        status["podIP"] = pod_ip
        status["podIPs"] = [{"ip": pod_ip}]
    return status
