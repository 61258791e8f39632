"""Plans for ``kvpn exchange`` and ``kvpn preview``: what changes in the cluster, and its undo.

Each plan is a frozen object built from what was read, before anything is written. Applying
it and undoing it are JSON patches (RFC 6902) computed from the plan, each starting with a
``test`` of this session's lock, so an undo never overwrites a Service someone else has since
taken over. JSON patch ``replace`` is used for the selector on purpose: a strategic merge (or
JSON merge) patch *merges* map keys, so the shadow pod's label would stay in the selector.

What the cluster holds while a Service is exchanged (written so a human can undo it):

- Service: ``kvpn.dev/lock`` (:mod:`kvpn.cluster.locks`), and
  - selector mode: ``kvpn.dev/original-selector`` = the original selector as JSON, and the
    selector is ``{"kvpn.dev/exchange": <session>}``;
  - scale mode: ``kvpn.dev/scaled-deployment`` = the Deployment scaled to zero.
- Deployment (scale mode): ``kvpn.dev/original-replicas`` and ``kvpn.dev/scaled-by`` (session).
- Shadow pod ``kvpn-shadow-<session>``: labels ``app.kubernetes.io/managed-by=kvpn``,
  ``kvpn.dev/session``; annotations ``kvpn.dev/kind``, ``kvpn.dev/service``, ``kvpn.dev/user``,
  ``kvpn.dev/host``.

:func:`restore_service_ops` and :func:`restore_deployment_ops` compute the same undo from
those annotations alone; ``kvpn clean`` and ``kvpn recover`` use them after a crash.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvpn.cluster.locks import LOCK_ANNOTATION, Lock, annotation_path, json_pointer
from kvpn.cluster.service_ports import PortForward
from kvpn.cluster.shadow_pod import MANAGED_BY_LABEL, SESSION_LABEL, ShadowPodPlan

EXCHANGE_LABEL = "kvpn.dev/exchange"
PREVIEW_LABEL = "kvpn.dev/preview"
ORIGINAL_SELECTOR_ANNOTATION = "kvpn.dev/original-selector"
SCALED_DEPLOYMENT_ANNOTATION = "kvpn.dev/scaled-deployment"
ORIGINAL_REPLICAS_ANNOTATION = "kvpn.dev/original-replicas"
SCALED_BY_ANNOTATION = "kvpn.dev/scaled-by"
KIND_ANNOTATION = "kvpn.dev/kind"
SERVICE_ANNOTATION = "kvpn.dev/service"
HOST_ANNOTATION = "kvpn.dev/host"
# Labels a ReplicaSet adds to its pods: copying them would make it adopt (and kill) the pod.
CONTROLLER_LABELS = frozenset({"pod-template-hash", "controller-revision-hash"})
UNPRIVILEGED_PORT_SYSCTL = "net.ipv4.ip_unprivileged_port_start"

Selector = tuple[tuple[str, str], ...]


class ExchangeMode(enum.Enum):
    SELECTOR = "selector"
    SCALE = "scale"


def selector_of(mapping: Mapping[str, str] | None) -> Selector:
    return tuple(sorted((mapping or {}).items()))


def selects(selector: Mapping[str, str], labels: Mapping[str, str] | None) -> bool:
    """Whether an (equality) selector matches a label set; an empty selector matches none."""
    have = labels or {}
    return bool(selector) and all(have.get(k) == v for k, v in selector.items())


@dataclass(frozen=True, slots=True)
class InterceptPodPlan:
    """The shadow pod of an exchange or preview: the agent plus the ports it will listen on."""

    shadow: ShadowPodPlan
    kind: str  # "exchange" or "preview"
    service: str
    host: str
    extra_labels: Selector = ()
    forwards: tuple[PortForward, ...] = ()
    # Labels that make a Service select the pod (scale mode: the workload's), added only once
    # the agent listens on every target port, so no connection reaches a pod not yet serving.
    serving_labels: Selector = ()

    @property
    def name(self) -> str:
        return self.shadow.name

    @property
    def namespace(self) -> str:
        return self.shadow.namespace

    def labels(self) -> dict[str, str]:
        labels = dict(self.extra_labels)
        labels.update(self.shadow.labels)  # kvpn's own labels win
        return labels

    def manifest(self) -> dict[str, Any]:
        manifest = self.shadow.manifest()
        meta = manifest["metadata"]
        meta["labels"] = self.labels()
        meta["annotations"].update(
            {
                KIND_ANNOTATION: self.kind,
                SERVICE_ANNOTATION: self.service,
                HOST_ANNOTATION: self.host,
            }
        )
        container = manifest["spec"]["containers"][0]
        taken = {p["containerPort"] for p in container["ports"]}
        for forward in self.forwards:
            names = forward.container_port_names or (None,)
            for name in names:
                port: dict[str, Any] = {"containerPort": forward.target_port, "protocol": "TCP"}
                if name:
                    port["name"] = name
                if name or forward.target_port not in taken:
                    container["ports"].append(port)
                    taken.add(forward.target_port)
        if any(f.target_port < 1024 for f in self.forwards):
            # The agent runs as user 1000: ports below 1024 need this (namespaced, "safe")
            # sysctl, allowed by PodSecurity "restricted".
            manifest["spec"]["securityContext"].setdefault("sysctls", []).append(
                {"name": UNPRIVILEGED_PORT_SYSCTL, "value": "0"}
            )
        return manifest

    def serving_patch(self) -> dict[str, Any]:
        """Merge patch adding :attr:`serving_labels` (label maps merge: nothing is removed)."""
        return {"metadata": {"labels": dict(self.serving_labels)}}


@dataclass(frozen=True, slots=True)
class SelectorChange:
    """Selector mode: point the Service at the shadow pod's unique label."""

    original: Selector
    replacement: Selector

    def apply_ops(self, lock: Lock) -> list[dict[str, Any]]:
        return [
            _test_lock(lock),
            {"op": "replace", "path": "/spec/selector", "value": dict(self.replacement)},
            {
                "op": "add",
                "path": annotation_path(ORIGINAL_SELECTOR_ANNOTATION),
                "value": selector_json(self.original),
            },
        ]

    def undo_ops(self, lock: Lock) -> list[dict[str, Any]]:
        return [
            _test_lock(lock),
            {"op": "replace", "path": "/spec/selector", "value": dict(self.original)},
            {"op": "remove", "path": annotation_path(ORIGINAL_SELECTOR_ANNOTATION)},
        ]


@dataclass(frozen=True, slots=True)
class ScaleChange:
    """Scale mode: the Deployment goes to zero; the Service keeps its selector."""

    deployment: str
    original_replicas: int
    session: str

    def service_apply_ops(self, lock: Lock) -> list[dict[str, Any]]:
        path = annotation_path(SCALED_DEPLOYMENT_ANNOTATION)
        return [_test_lock(lock), {"op": "add", "path": path, "value": self.deployment}]

    def service_undo_ops(self, lock: Lock) -> list[dict[str, Any]]:
        path = annotation_path(SCALED_DEPLOYMENT_ANNOTATION)
        return [_test_lock(lock), {"op": "remove", "path": path}]

    def deployment_apply_ops(
        self, resource_version: str, annotations: Mapping[str, str] | None
    ) -> list[dict[str, Any]]:
        ops: list[dict[str, Any]] = [
            {"op": "test", "path": "/metadata/resourceVersion", "value": resource_version}
        ]
        if annotations is None:
            ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
        ops += [
            {
                "op": "add",
                "path": annotation_path(ORIGINAL_REPLICAS_ANNOTATION),
                "value": str(self.original_replicas),
            },
            {"op": "add", "path": annotation_path(SCALED_BY_ANNOTATION), "value": self.session},
            {"op": "replace", "path": "/spec/replicas", "value": 0},
        ]
        return ops

    def deployment_undo_ops(self) -> list[dict[str, Any]]:
        return [
            {"op": "test", "path": annotation_path(SCALED_BY_ANNOTATION), "value": self.session},
            {"op": "replace", "path": "/spec/replicas", "value": self.original_replicas},
            {"op": "remove", "path": annotation_path(ORIGINAL_REPLICAS_ANNOTATION)},
            {"op": "remove", "path": annotation_path(SCALED_BY_ANNOTATION)},
        ]


@dataclass(frozen=True, slots=True)
class ExchangePlan:
    namespace: str
    service: str
    mode: ExchangeMode
    lock: Lock
    pod: InterceptPodPlan
    selector: SelectorChange | None = None
    scale: ScaleChange | None = None
    notes: tuple[str, ...] = ()

    @property
    def forwards(self) -> tuple[PortForward, ...]:
        return self.pod.forwards

    def describe(self) -> list[str]:
        lines = [
            f"lock service {self.namespace}/{self.service} "
            f"({LOCK_ANNOTATION}, heartbeat every {self.lock.ttl // 3 or 1}s)",
            f"create shadow pod {self.namespace}/{self.pod.name} "
            f"with labels {_labels_text(self.pod.extra_labels)}",
        ]
        if self.pod.serving_labels:
            lines.append(
                f"once it serves, label it {_labels_text(self.pod.serving_labels)} "
                f"(the labels of deployment {self.scale.deployment if self.scale else '?'})"
            )
        if self.selector is not None:
            lines.append(
                f"replace the selector of service {self.service}: "
                f"{_labels_text(self.selector.original)} -> "
                f"{_labels_text(self.selector.replacement)} "
                f"(original kept in {ORIGINAL_SELECTOR_ANNOTATION})"
            )
        if self.scale is not None:
            lines.append(
                f"scale deployment {self.scale.deployment} from "
                f"{self.scale.original_replicas} to 0 "
                f"(count kept in {ORIGINAL_REPLICAS_ANNOTATION})"
            )
        lines += [f"forward {f.describe()}" for f in self.forwards]
        return lines


@dataclass(frozen=True, slots=True)
class PreviewPlan:
    namespace: str
    name: str
    lock: Lock
    pod: InterceptPodPlan
    external: bool = False

    def service_manifest(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {MANAGED_BY_LABEL: "kvpn", SESSION_LABEL: self.lock.session},
                "annotations": {LOCK_ANNOTATION: self.lock.to_json()},
            },
            "spec": {
                "type": "LoadBalancer" if self.external else "ClusterIP",
                "selector": {PREVIEW_LABEL: self.lock.session},
                "ports": [
                    {
                        "name": f"tcp-{f.target_port}",
                        "port": f.target_port,
                        "targetPort": f.target_port,
                        "protocol": "TCP",
                    }
                    for f in self.pod.forwards
                ],
            },
        }

    def describe(self) -> list[str]:
        kind = "LoadBalancer" if self.external else "ClusterIP"
        return [
            f"create shadow pod {self.namespace}/{self.pod.name}",
            f"create {kind} service {self.namespace}/{self.name}",
            *(f"forward {f.describe()}" for f in self.pod.forwards),
        ]


def selector_json(selector: Selector) -> str:
    return json.dumps(dict(selector), sort_keys=True, separators=(",", ":"))


def parse_selector_json(text: str) -> dict[str, str] | None:
    """An original-selector annotation, or None when it is not a non-empty str->str map."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return None
    if not isinstance(value, dict) or not value:
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return None
    return value


def _test_lock(lock: Lock) -> dict[str, Any]:
    return {"op": "test", "path": annotation_path(LOCK_ANNOTATION), "value": lock.to_json()}


def _labels_text(labels: Selector) -> str:
    return ",".join(f"{k}={v}" for k, v in labels) or "(none)"


# --- undo from what the cluster holds (kvpn clean / kvpn recover) ---------------------------


@dataclass(frozen=True, slots=True)
class ServiceRestore:
    """The JSON patch that undoes an exchange from the Service's annotations."""

    ops: tuple[dict[str, Any], ...]
    selector: dict[str, str] | None  # restored selector (selector mode)
    deployment: str | None  # scaled deployment to restore (scale mode)
    problems: tuple[str, ...] = ()


def restore_service_ops(annotations: Mapping[str, str] | None) -> ServiceRestore:
    """Remove the lock (tested by its exact value) and undo what the annotations record."""
    annotations = annotations or {}
    ops: list[dict[str, Any]] = []
    problems: list[str] = []
    raw_lock = annotations.get(LOCK_ANNOTATION)
    if raw_lock is not None:
        ops.append({"op": "test", "path": annotation_path(LOCK_ANNOTATION), "value": raw_lock})
    selector = None
    raw_selector = annotations.get(ORIGINAL_SELECTOR_ANNOTATION)
    if raw_selector is not None:
        selector = parse_selector_json(raw_selector)
        if selector is None:
            problems.append(
                f"{ORIGINAL_SELECTOR_ANNOTATION} is not a JSON label map: {raw_selector[:80]!r}"
            )
        else:
            ops.append({"op": "replace", "path": "/spec/selector", "value": selector})
            ops.append({"op": "remove", "path": annotation_path(ORIGINAL_SELECTOR_ANNOTATION)})
    deployment = annotations.get(SCALED_DEPLOYMENT_ANNOTATION) or None
    if SCALED_DEPLOYMENT_ANNOTATION in annotations:
        ops.append({"op": "remove", "path": annotation_path(SCALED_DEPLOYMENT_ANNOTATION)})
    if raw_lock is not None and not problems:
        ops.append({"op": "remove", "path": annotation_path(LOCK_ANNOTATION)})
    return ServiceRestore(tuple(ops), selector, deployment, tuple(problems))


def restore_deployment_ops(annotations: Mapping[str, str] | None) -> list[dict[str, Any]] | None:
    """Scale back to the recorded count; None when nothing (readable) is recorded."""
    annotations = annotations or {}
    raw = annotations.get(ORIGINAL_REPLICAS_ANNOTATION)
    if raw is None or not raw.isdigit():
        return None
    ops: list[dict[str, Any]] = [
        {"op": "test", "path": annotation_path(ORIGINAL_REPLICAS_ANNOTATION), "value": raw},
        {"op": "replace", "path": "/spec/replicas", "value": int(raw)},
        {"op": "remove", "path": annotation_path(ORIGINAL_REPLICAS_ANNOTATION)},
    ]
    if SCALED_BY_ANNOTATION in annotations:
        ops.append({"op": "remove", "path": annotation_path(SCALED_BY_ANNOTATION)})
    return ops


def workload_labels(template_labels: Mapping[str, str] | None) -> Selector:
    """The labels a scale-mode shadow pod copies: the template's, minus controller hashes."""
    return tuple(
        sorted((k, v) for k, v in (template_labels or {}).items() if k not in CONTROLLER_LABELS)
    )


__all__ = [
    "EXCHANGE_LABEL",
    "ExchangeMode",
    "ExchangePlan",
    "InterceptPodPlan",
    "PreviewPlan",
    "ScaleChange",
    "SelectorChange",
    "ServiceRestore",
    "json_pointer",
    "restore_deployment_ops",
    "restore_service_ops",
    "selects",
    "workload_labels",
]
