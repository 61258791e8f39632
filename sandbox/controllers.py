"""The sandbox's controller manager: deployments, replica sets, endpoints, GC and namespaces.

Theory of operation
-------------------
Every controller is a *pure* planner: a function from the current objects (a
:class:`ClusterState` snapshot taken from the store in one go, so it is consistent) to a list of
actions (:class:`CreateObject`, :class:`UpdateObject`, :class:`DeleteObject`). Planners are
level-triggered like the real kube-controller-manager: they look at what is, never at what
changed, so a pass that sees a converged cluster plans nothing.

:class:`Controllers` is the thin loop around them. It subscribes to the store's watch events,
waits a short debounce after the first event so a burst becomes one pass, snapshots, plans,
applies the actions through the :class:`~sandbox.apiserver.api.Api` (so admission, defaulting
and graceful pod deletion apply as for any client) and repeats; a periodic resync catches what
no event announces (time-based availability, ``minReadySeconds``). A write the API refuses is
counted; a Conflict (somebody else moved first) makes the next pass come after the debounce,
other refusals wait for the resync and are logged once.

The actions and shared object helpers are in :mod:`sandbox.controller_actions`, the workload
planners (Deployment -> ReplicaSet -> Pod) in :mod:`sandbox.workload_controllers`; this module
holds the snapshot, the endpoints, garbage-collector and namespace planners and the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as _dt
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sandbox.apiserver.resources import (
    ALL,
    CONFIGMAPS,
    DEPLOYMENTS,
    ENDPOINTS,
    NAMESPACES,
    PODS,
    REPLICASETS,
    SERVICEACCOUNTS,
    SERVICES,
    ResourceType,
)
from sandbox.apiserver.store import Conflict, Obj, Store, StoreError, Subscription
from sandbox.config import SandboxConfig
from sandbox.controller_actions import (
    Action,
    CreateObject,
    DeleteMode,
    DeleteObject,
    UpdateObject,
    is_deleting,
    labels_of,
    meta,
    pod_is_ready,
)
from sandbox.workload_controllers import plan_deployment, plan_replicaset

__all__ = [
    "Action",
    "ClusterState",
    "Controllers",
    "ControllerStats",
    "CreateObject",
    "DeleteMode",
    "DeleteObject",
    "UpdateObject",
    "plan_all",
    "plan_endpoints",
    "plan_garbage_collection",
    "plan_namespaces",
]

log = logging.getLogger("sandbox.controllers")

ROOT_CA_CONFIGMAP = "kube-root-ca.crt"
# A placeholder that looks like a certificate: the sandbox API server speaks plain HTTP.
PLACEHOLDER_CA_PEM = (
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBdzCCAR2gAwIBAgIBADAKBggqhkjOPQQDAjAjMSEwHwYDVQQDDBhrdnBuLXNh\n"
    "bmRib3gtY2x1c3Rlci1jYTAeFw0yNDAxMDEwMDAwMDBaFw0zNDAxMDEwMDAwMDBa\n"
    "MCMxITAfBgNVBAMMGGt2cG4tc2FuZGJveC1jbHVzdGVyLWNhMFkwEwYHKoZIzj0C\n"
    "-----END CERTIFICATE-----\n"
)
FOREGROUND_FINALIZER = "foregroundDeletion"
ORPHAN_FINALIZER = "orphan"


# -- the snapshot ------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterState:
    """All objects of the served types at one store revision, by resource key.

    The objects are shared with the store (no copies, for speed): planners must not mutate
    them, and copy what they turn into new objects.
    """

    objects: Mapping[str, tuple[Obj, ...]]
    revision: int = 0

    @classmethod
    def from_store(cls, store: Store, types: Iterable[ResourceType] = ALL) -> ClusterState:
        return cls({rt.key: tuple(store.iter_objects(rt)) for rt in types}, revision=store.revision)

    @classmethod
    def of_objects(cls, by_type: Mapping[ResourceType, Sequence[Obj]]) -> ClusterState:
        """A snapshot from plain lists (tests)."""
        return cls({rt.key: tuple(objs) for rt, objs in by_type.items()})

    def of(self, rt: ResourceType, namespace: str | None = None) -> tuple[Obj, ...]:
        objs = self.objects.get(rt.key, ())
        if namespace is None:
            return objs
        return tuple(o for o in objs if meta(o).get("namespace") == namespace)

    def by_namespace(self, rt: ResourceType) -> dict[str, list[Obj]]:
        out: dict[str, list[Obj]] = {}
        for obj in self.objects.get(rt.key, ()):
            out.setdefault(meta(obj).get("namespace") or "", []).append(obj)
        return out

    def find(self, rt: ResourceType, namespace: str | None, name: str) -> Obj | None:
        for obj in self.of(rt, namespace):
            if meta(obj).get("name") == name:
                return obj
        return None

    def uids(self) -> frozenset[str]:
        return frozenset(
            uid for objs in self.objects.values() for o in objs if (uid := meta(o).get("uid"))
        )


def _resource_types(state: ClusterState) -> list[ResourceType]:
    by_key = {rt.key: rt for rt in ALL}
    return [by_key[k] for k in state.objects if k in by_key]


# -- endpoints ---------------------------------------------------------------------------


def _container_port(pod: Obj, name: str, protocol: str) -> int | None:
    for container in pod.get("spec", {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == name and port.get("protocol", "TCP") == protocol:
                value = port.get("containerPort")
                return value if isinstance(value, int) else None
    return None


def _resolve_target_port(service_port: Obj, pod: Obj) -> int | None:
    target = service_port.get("targetPort", service_port.get("port"))
    if isinstance(target, int):
        return target
    if isinstance(target, str):
        if target.isdigit():
            return int(target)
        return _container_port(pod, target, service_port.get("protocol", "TCP"))
    return None


def _endpoint_port(service_port: Obj, port: int) -> Obj:
    out: Obj = {"port": port, "protocol": service_port.get("protocol", "TCP")}
    if service_port.get("name"):
        out["name"] = service_port["name"]
    if service_port.get("appProtocol"):
        out["appProtocol"] = service_port["appProtocol"]
    return out


def _endpoint_address(pod: Obj, service: Obj) -> Obj:
    pmeta = meta(pod)
    address: Obj = {
        "ip": pod["status"]["podIP"],
        "targetRef": {
            "kind": "Pod",
            "namespace": pmeta.get("namespace"),
            "name": pmeta.get("name"),
            "uid": pmeta.get("uid"),
        },
    }
    spec = pod.get("spec", {})
    if spec.get("nodeName"):
        address["nodeName"] = spec["nodeName"]
    if spec.get("hostname") and spec.get("subdomain") == meta(service).get("name"):
        address["hostname"] = spec["hostname"]
    return address


def _pod_in_endpoints(pod: Obj, publish_not_ready: bool) -> bool:
    if not pod.get("status", {}).get("podIP"):
        return False
    if is_deleting(pod) and not publish_not_ready:
        return False
    phase = pod.get("status", {}).get("phase")
    restart = pod.get("spec", {}).get("restartPolicy", "Always")
    return not (phase in ("Succeeded", "Failed") and restart != "Always")


def endpoint_subsets(service: Obj, pods: Sequence[Obj]) -> list[Obj]:
    """The ``subsets`` of a selector service's Endpoints, grouped by resolved ports."""
    spec = service.get("spec", {})
    selector = spec.get("selector") or {}
    publish_not_ready = bool(spec.get("publishNotReadyAddresses"))
    service_ports: list[Obj] = list(spec.get("ports") or [])
    headless = spec.get("clusterIP") == "None"
    groups: dict[tuple[tuple[Any, ...], ...], tuple[list[Obj], list[Obj], list[Obj]]] = {}
    for pod in pods:
        pod_labels = labels_of(pod)
        if any(pod_labels.get(k) != v for k, v in selector.items()):
            continue
        if not _pod_in_endpoints(pod, publish_not_ready):
            continue
        ports = []
        for sp in service_ports:
            resolved = _resolve_target_port(sp, pod)
            if resolved is not None:
                ports.append(_endpoint_port(sp, resolved))
        if not ports and not (headless and not service_ports):
            continue
        key = tuple(sorted(tuple(sorted(p.items())) for p in ports))
        ready_list, not_ready_list, port_list = groups.setdefault(key, ([], [], ports))
        target = ready_list if (publish_not_ready or pod_is_ready(pod)) else not_ready_list
        target.append(_endpoint_address(pod, service))
    subsets = []
    for key in sorted(groups):
        ready_list, not_ready_list, port_list = groups[key]
        subset: Obj = {}
        if ready_list:
            subset["addresses"] = sorted(ready_list, key=lambda a: a["ip"])
        if not_ready_list:
            subset["notReadyAddresses"] = sorted(not_ready_list, key=lambda a: a["ip"])
        if port_list:
            subset["ports"] = sorted(port_list, key=lambda p: (p.get("name", ""), p["port"]))
        subsets.append(subset)
    return subsets


def plan_endpoints(
    services: Sequence[Obj],
    pods: Sequence[Obj],
    endpoints: Sequence[Obj],
    vanished_services: Iterable[tuple[str, str]] = (),
) -> list[Action]:
    """Endpoints for every Service with a selector; services without one are left alone.

    ``vanished_services`` are (namespace, name) of services deleted since the last pass: their
    Endpoints go too, as the real endpoints controller deletes them on the service's delete.
    """
    actions: list[Action] = []
    current = {(meta(e).get("namespace", ""), meta(e)["name"]): e for e in endpoints}
    pods_by_ns: dict[str, list[Obj]] = {}
    for pod in pods:
        pods_by_ns.setdefault(meta(pod).get("namespace", ""), []).append(pod)
    live = set()
    for svc in services:
        smeta = meta(svc)
        ns, name = smeta.get("namespace", ""), smeta["name"]
        live.add((ns, name))
        spec = svc.get("spec", {})
        if not spec.get("selector") or spec.get("type") == "ExternalName" or is_deleting(svc):
            continue
        subsets = endpoint_subsets(svc, pods_by_ns.get(ns, []))
        labels = dict(smeta.get("labels") or {})
        if spec.get("clusterIP") == "None":
            labels["service.kubernetes.io/headless"] = ""
        existing = current.get((ns, name))
        if existing is None:
            obj: Obj = {"metadata": {"name": name, "namespace": ns}, "subsets": subsets}
            if labels:
                obj["metadata"]["labels"] = labels
            actions.append(CreateObject(ENDPOINTS, ns, obj))
            continue
        if (existing.get("subsets") or []) == subsets and (
            meta(existing).get("labels") or {}
        ) == labels:
            continue
        updated = copy.deepcopy(existing)
        updated["subsets"] = subsets
        updated["metadata"]["labels"] = labels
        if not labels:
            del updated["metadata"]["labels"]
        actions.append(UpdateObject(ENDPOINTS, ns, name, updated))
    for key in vanished_services:
        if key not in live and key in current:
            actions.append(DeleteObject(ENDPOINTS, key[0], key[1]))
    return actions


# -- garbage collector -------------------------------------------------------------------


def _owner_uids(obj: Obj) -> list[str]:
    return [str(r.get("uid")) for r in meta(obj).get("ownerReferences") or []]


def plan_garbage_collection(state: ClusterState) -> list[Action]:
    """Background deletion of dependents whose owners are all gone; foreground and orphan
    finalizers of owners being deleted are worked off (dependents deleted resp. released,
    then the finalizer removed)."""
    actions: list[Action] = []
    uids = state.uids()
    dependents: dict[str, list[tuple[ResourceType, Obj]]] = {}
    types = _resource_types(state)
    for rt in types:
        for obj in state.of(rt):
            refs = meta(obj).get("ownerReferences") or []
            if not refs:
                continue
            for uid in _owner_uids(obj):
                dependents.setdefault(uid, []).append((rt, obj))
            alive = [r for r in refs if r.get("uid") in uids]
            if len(alive) == len(refs):
                continue
            m = meta(obj)
            if not alive:
                if not is_deleting(obj):
                    actions.append(DeleteObject(rt, m.get("namespace"), m["name"]))
                continue
            updated = copy.deepcopy(obj)
            updated["metadata"]["ownerReferences"] = copy.deepcopy(alive)
            actions.append(UpdateObject(rt, m.get("namespace"), m["name"], updated))
    for rt in types:
        for obj in state.of(rt):
            m = meta(obj)
            finalizers = m.get("finalizers") or []
            if not is_deleting(obj) or not (
                FOREGROUND_FINALIZER in finalizers or ORPHAN_FINALIZER in finalizers
            ):
                continue
            deps = dependents.get(m.get("uid", ""), [])
            if FOREGROUND_FINALIZER in finalizers:
                for drt, dep in deps:
                    if not is_deleting(dep):
                        dm = meta(dep)
                        actions.append(DeleteObject(drt, dm.get("namespace"), dm["name"]))
            else:
                for drt, dep in deps:
                    released = copy.deepcopy(dep)
                    released["metadata"]["ownerReferences"] = [
                        r
                        for r in meta(dep).get("ownerReferences") or []
                        if r.get("uid") != m["uid"]
                    ]
                    dm = meta(dep)
                    actions.append(UpdateObject(drt, dm.get("namespace"), dm["name"], released))
            if not deps:
                updated = copy.deepcopy(obj)
                updated["metadata"]["finalizers"] = [
                    f for f in finalizers if f not in (FOREGROUND_FINALIZER, ORPHAN_FINALIZER)
                ]
                actions.append(UpdateObject(rt, m.get("namespace"), m["name"], updated))
    return actions


# -- namespaces ---------------------------------------------------------------------------


def namespace_is_terminating(ns: Obj) -> bool:
    return ns.get("status", {}).get("phase") == "Terminating" or is_deleting(ns)


def _default_service_account(namespace: str) -> Obj:
    return {"metadata": {"name": "default", "namespace": namespace}}


def _root_ca_configmap(namespace: str) -> Obj:
    return {
        "metadata": {
            "name": ROOT_CA_CONFIGMAP,
            "namespace": namespace,
            "annotations": {
                "kubernetes.io/description": (
                    "Contains a CA bundle that can be used to verify the kube-apiserver "
                    "when using internal endpoints such as the internal service IP or "
                    "kubernetes.default.svc. No other usage is guaranteed across "
                    "distributions of Kubernetes clusters."
                )
            },
        },
        "data": {"ca.crt": PLACEHOLDER_CA_PEM},
    }


def plan_namespaces(state: ClusterState) -> list[Action]:
    """Empty and then remove terminating namespaces; give the others their default objects."""
    actions: list[Action] = []
    namespaced = [rt for rt in _resource_types(state) if rt.namespaced]
    contents: dict[str, list[tuple[ResourceType, Obj]]] = {}
    for rt in namespaced:
        for obj in state.of(rt):
            contents.setdefault(meta(obj).get("namespace", ""), []).append((rt, obj))
    for ns in state.of(NAMESPACES):
        name = meta(ns)["name"]
        inside = contents.get(name, [])
        if namespace_is_terminating(ns):
            for rt, obj in inside:
                if not is_deleting(obj):
                    actions.append(DeleteObject(rt, name, meta(obj)["name"]))
            if not inside:
                actions.append(DeleteObject(NAMESPACES, None, name, DeleteMode.REMOVE))
            continue
        have = {(rt.key, meta(o)["name"]) for rt, o in inside}
        if (SERVICEACCOUNTS.key, "default") not in have:
            actions.append(CreateObject(SERVICEACCOUNTS, name, _default_service_account(name)))
        if (CONFIGMAPS.key, ROOT_CA_CONFIGMAP) not in have:
            actions.append(CreateObject(CONFIGMAPS, name, _root_ca_configmap(name)))
    return actions


# -- all of them --------------------------------------------------------------------------


def _guarded(planner: Callable[..., list[Action]], *args: Any) -> list[Action]:
    """One planner call; a planner bug on one odd object must not stop the others."""
    try:
        return planner(*args)
    except Exception:
        log.exception("%s failed", getattr(planner, "__name__", planner))
        return []


def plan_all(
    state: ClusterState,
    now: _dt.datetime,
    vanished_services: Iterable[tuple[str, str]] = (),
) -> list[Action]:
    """One pass of every controller over a snapshot."""
    actions: list[Action] = []
    terminating = {meta(n)["name"] for n in state.of(NAMESPACES) if namespace_is_terminating(n)}

    def live(rt: ResourceType) -> list[Obj]:
        return [o for o in state.of(rt) if meta(o).get("namespace") not in terminating]

    rs_by_ns = state.by_namespace(REPLICASETS)
    pods_by_ns = state.by_namespace(PODS)
    for dep in live(DEPLOYMENTS):
        ns = meta(dep).get("namespace", "")
        actions += _guarded(plan_deployment, dep, rs_by_ns.get(ns, []), now)
    for rs in live(REPLICASETS):
        ns = meta(rs).get("namespace", "")
        actions += _guarded(plan_replicaset, rs, pods_by_ns.get(ns, []), now)
    actions += _guarded(
        plan_endpoints, live(SERVICES), state.of(PODS), state.of(ENDPOINTS), vanished_services
    )
    actions += _guarded(plan_garbage_collection, state)
    actions += _guarded(plan_namespaces, state)
    return actions


# -- the loop -----------------------------------------------------------------------------


@dataclass
class ControllerStats:
    passes: int = 0
    applied: int = 0
    failed: int = 0  # writes refused by the API (conflicts, races): retried next pass
    errors: int = 0  # unexpected exceptions in a pass


class ApiLike(Protocol):
    """What the loop needs of :class:`sandbox.apiserver.api.Api`."""

    @property
    def store(self) -> Store: ...

    def create(self, rt: ResourceType, namespace: str | None, obj: Obj) -> Obj: ...
    def update(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        obj: Obj,
        *,
        subresource: str | None = None,
    ) -> Obj: ...
    def delete(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        *,
        grace_period_seconds: int | None = None,
        propagation_policy: str | None = None,
    ) -> Obj: ...


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


@dataclass
class Controllers:
    """Runs :func:`plan_all` on store events (debounced) and every ``resync`` seconds."""

    api: ApiLike  # sandbox.apiserver.api.Api
    config: SandboxConfig
    debounce: float = 0.04
    resync: float = 1.0
    clock: Callable[[], _dt.datetime] = _utcnow
    stats: ControllerStats = field(default_factory=ControllerStats)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _dirty: asyncio.Event = field(default_factory=asyncio.Event)
    _vanished: set[tuple[str, str]] = field(default_factory=set)
    _reported: set[str] = field(default_factory=set)

    def reconcile_once(self) -> list[Action]:
        """One synchronous pass: snapshot, plan, apply. Returns the actions applied."""
        self.stats.passes += 1
        state = ClusterState.from_store(self.api.store)
        vanished, self._vanished = self._vanished, set()
        actions = plan_all(state, self.clock(), vanished)
        done: list[Action] = []
        for action in actions:
            try:
                apply_action(self.api, action)
            except StoreError as exc:
                self.stats.failed += 1
                if isinstance(exc, Conflict):
                    self._dirty.set()  # somebody moved first: look again after the debounce
                self._report(action, exc)
            else:
                self.stats.applied += 1
                done.append(action)
                log.debug("%s", action.describe())
        return done

    def _report(self, action: Action, exc: StoreError) -> None:
        """Races (409, 404) are routine; anything else is logged once per action+message."""
        text = f"{action.describe()} failed: {exc.message}"
        if exc.code in (404, 409) or text in self._reported:
            log.debug("%s", text)
            return
        if len(self._reported) > 1000:
            self._reported.clear()
        self._reported.add(text)
        log.warning("%s", text)

    async def run(self) -> None:
        sub = self.api.store.subscribe()
        pump = asyncio.create_task(self._pump(sub), name="controllers-events")
        try:
            while not self._stopping.is_set():
                self._dirty.clear()
                try:
                    self.reconcile_once()  # may set _dirty again (conflicts)
                except Exception:
                    self.stats.errors += 1
                    log.exception("controller pass failed")
                # Our own writes come back as events too; a converged pass writes nothing.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._dirty.wait(), self.resync)
                    await asyncio.sleep(self.debounce)
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            sub.close()

    async def _pump(self, sub: Subscription) -> None:
        async for event in sub:
            if event.type == "DELETED" and event.resource.key == SERVICES.key:
                self._vanished.add((event.namespace or "", event.name))
            self._dirty.set()

    async def stop(self) -> None:
        self._stopping.set()
        self._dirty.set()


def apply_action(api: ApiLike, action: Action) -> None:
    """Perform one planned write through the Api (or, for REMOVE, straight on the store)."""
    match action:
        case CreateObject():
            api.create(action.resource, action.namespace, action.obj)
        case UpdateObject():
            api.update(
                action.resource,
                action.namespace,
                action.name,
                action.obj,
                subresource=action.subresource,
            )
        case DeleteObject(mode=DeleteMode.REMOVE):
            api.store.delete(action.resource, action.namespace, action.name)
        case DeleteObject():
            api.delete(
                action.resource, action.namespace, action.name, propagation_policy="Background"
            )
