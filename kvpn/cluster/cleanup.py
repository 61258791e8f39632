"""What ``kvpn clean`` and ``kvpn recover SVC`` would do: pure decisions over plain objects.

Inputs are the objects as the API returns them (dicts, camelCase, as from
``ApiClient.sanitize_for_serialization``), the caller's identity, the time, and the
``kvpn connect`` sessions alive on this machine. The output is a :class:`CleanupPlan`: a
list of actions (printed by ``--dry-run``, applied otherwise) and notes about what is left
alone and why.

The rules (the tests in ``tests/unit/cluster/test_cleanup.py`` are the table):

- ``clean`` restores a Service only when its lock belongs to *this user* and its heartbeat
  expired; a live lock - anyone's - is never touched, another user's dead lock is reported
  with the ``kvpn recover`` command that would restore it.
- ``clean`` deletes this user's shadow pods whose session is dead: an exchange or preview
  pod whose Service no longer carries a live lock of its session; a ``kvpn connect`` pod
  (no ``kvpn.dev/kind``) whose heartbeat (:mod:`kvpn.cluster.pod_heartbeat`) expired and
  that no live session on this machine owns. A connect pod with a live heartbeat is kept
  even with no session here (the same user connected from another machine). A pod without
  a heartbeat (an older kvpn) is judged by this machine's session files, once it is older
  than a connect's start-up time (a connect still starting has no session file yet).
- ``clean`` deletes this user's preview Services whose heartbeat expired.
- ``kvpn mesh`` (:mod:`kvpn.cluster.mesh_cleanup`): ``clean`` removes this user's dead
  members and restores a mesh nobody is alive in; it deletes router pods and stand-in
  Services (kvpn's, anyone's) whose Service records no mesh. ``recover SVC`` restores the
  mesh unless a member is alive, and deletes an orphan router pod of SVC.
- ``recover SVC`` restores one Service whatever its user, unless its lock is alive.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from kvpn.cluster.exchange_plan import (
    KIND_ANNOTATION,
    ORIGINAL_REPLICAS_ANNOTATION,
    ORIGINAL_SELECTOR_ANNOTATION,
    SCALED_BY_ANNOTATION,
    SCALED_DEPLOYMENT_ANNOTATION,
    SERVICE_ANNOTATION,
    restore_deployment_ops,
    restore_service_ops,
)
from kvpn.cluster.locks import Identity, Lock, LockVerdict, judge_lock, parse_time, read_lock
from kvpn.cluster.mesh_cleanup import (  # kvpn mesh (issue 7)
    DeleteMeshService,
    DropMeshMembers,
    RestoreMesh,
    orphan_member_services,
    orphan_router_pods,
    orphan_standin_services,
    plan_mesh_cleanup,
)
from kvpn.cluster.pod_heartbeat import HEARTBEAT_ANNOTATION, HeartbeatState, heartbeat_state
from kvpn.cluster.shadow_pod import (
    MANAGED_BY_LABEL,
    SESSION_LABEL,
    STARTED_AT_ANNOTATION,
    USER_ANNOTATION,
)
from kvpn.shadow.mesh_names import ROUTER_LABEL

CONNECT_STARTUP_GRACE = timedelta(seconds=180)
PREVIEW_KIND = "preview"

Obj = Mapping[str, Any]


def _meta(obj: Obj) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _annotations(obj: Obj) -> dict[str, str]:
    raw = _meta(obj).get("annotations")
    return {k: v for k, v in raw.items() if isinstance(v, str)} if isinstance(raw, Mapping) else {}


def _labels(obj: Obj) -> dict[str, str]:
    raw = _meta(obj).get("labels")
    return {k: v for k, v in raw.items() if isinstance(v, str)} if isinstance(raw, Mapping) else {}


def _key(obj: Obj) -> tuple[str, str]:
    meta = _meta(obj)
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


@dataclass(frozen=True, slots=True)
class RestoreDeployment:
    namespace: str
    name: str
    ops: tuple[dict[str, Any], ...]
    replicas: int

    def describe(self) -> str:
        return f"scale deployment {self.namespace}/{self.name} back to {self.replicas}"


@dataclass(frozen=True, slots=True)
class RestoreService:
    namespace: str
    name: str
    ops: tuple[dict[str, Any], ...]
    reason: str
    selector: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        what = f"restore service {self.namespace}/{self.name}"
        if self.selector:
            what += " (selector " + ",".join(f"{k}={v}" for k, v in self.selector) + ")"
        return f"{what}: {self.reason}"


@dataclass(frozen=True, slots=True)
class DeleteService:
    namespace: str
    name: str
    reason: str

    def describe(self) -> str:
        return f"delete preview service {self.namespace}/{self.name}: {self.reason}"


@dataclass(frozen=True, slots=True)
class DeletePod:
    namespace: str
    name: str
    reason: str
    what: str = "shadow pod"  # or a mesh's router pod

    def describe(self) -> str:
        return f"delete {self.what} {self.namespace}/{self.name}: {self.reason}"


CleanupAction = (
    RestoreDeployment
    | RestoreService
    | DeleteService
    | DeletePod
    | RestoreMesh
    | DropMeshMembers
    | DeleteMeshService
)
# Scale back first (the pods take longest), then the Service, then the leftovers.
_ORDER: Mapping[type, int] = {
    RestoreDeployment: 0,
    RestoreService: 1,
    DeletePod: 2,
    DeleteService: 3,
    RestoreMesh: 1,
    DropMeshMembers: 1,
    DeleteMeshService: 3,
}


@dataclass(frozen=True, slots=True)
class CleanupPlan:
    actions: tuple[CleanupAction, ...] = ()
    notes: tuple[str, ...] = ()

    def describe(self) -> list[str]:
        return [a.describe() for a in self.actions] + [f"note: {n}" for n in self.notes]


class RecoverRefused(Exception):
    """``kvpn recover`` would touch a live session, or the Service does not exist."""


@dataclass
class _Builder:
    actions: list[CleanupAction] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def plan(self) -> CleanupPlan:
        ordered = sorted(self.actions, key=lambda a: _ORDER[type(a)])
        return CleanupPlan(tuple(ordered), tuple(self.notes))


def _restore_exchange(
    b: _Builder, service: Obj, deployments: Mapping[tuple[str, str], Obj], reason: str
) -> None:
    namespace, name = _key(service)
    restore = restore_service_ops(_annotations(service))
    if restore.problems:
        b.notes.append(f"service {namespace}/{name} left as it is: " + "; ".join(restore.problems))
        return
    if restore.deployment is not None:
        deployment = deployments.get((namespace, restore.deployment))
        ops = restore_deployment_ops(_annotations(deployment)) if deployment else None
        if ops is None:
            b.notes.append(
                f"deployment {namespace}/{restore.deployment} records no replica count "
                f"({ORIGINAL_REPLICAS_ANNOTATION}); scale it by hand"
            )
        else:
            replicas = int(_annotations(deployment or {})[ORIGINAL_REPLICAS_ANNOTATION])
            b.actions.append(RestoreDeployment(namespace, restore.deployment, tuple(ops), replicas))
    selector = tuple(sorted((restore.selector or {}).items()))
    b.actions.append(RestoreService(namespace, name, restore.ops, reason, selector))


def _has_leftovers(annotations: Mapping[str, str]) -> bool:
    return any(
        k in annotations for k in (ORIGINAL_SELECTOR_ANNOTATION, SCALED_DEPLOYMENT_ANNOTATION)
    )


def plan_clean(
    services: Iterable[Obj],
    pods: Iterable[Obj],
    deployments: Iterable[Obj],
    *,
    me: Identity,
    now: datetime,
    live_connect_sessions: Set[str] | None = frozenset(),
) -> CleanupPlan:
    """``live_connect_sessions`` None: unknown (unreadable), so no connect pod is touched."""
    services, pods = list(services), list(pods)
    b = _Builder()
    by_deployment = {_key(d): d for d in deployments}
    live_locks: dict[tuple[str, str], Lock] = {}  # (namespace, session) -> live lock
    for service in services:
        namespace, name = _key(service)
        annotations = _annotations(service)
        raw, lock = read_lock(annotations)
        verdict = judge_lock(raw, lock, me=me, now=now)
        if lock is not None and not lock.expired(now):
            live_locks[(namespace, lock.session)] = lock
        is_preview = lock is not None and lock.kind == PREVIEW_KIND
        if verdict == LockVerdict.MINE_EXPIRED and lock is not None:
            reason = f"its session {lock.session} stopped heartbeating at {lock.heartbeat}"
            if is_preview and _labels(service).get(MANAGED_BY_LABEL) == "kvpn":
                b.actions.append(DeleteService(namespace, name, reason))
            elif not is_preview:
                _restore_exchange(b, service, by_deployment, reason)
        elif verdict == LockVerdict.OTHERS_EXPIRED and lock is not None:
            b.notes.append(
                f"service {namespace}/{name}: {lock.describe(now)}; not yours: "
                f"`kvpn recover {name} -n {namespace}` restores it"
            )
        elif verdict == LockVerdict.MALFORMED:
            b.notes.append(
                f"service {namespace}/{name} has an unreadable kvpn lock; "
                f"`kvpn recover {name} -n {namespace}` restores it"
            )
        elif verdict == LockVerdict.FREE and _has_leftovers(annotations):
            b.notes.append(
                f"service {namespace}/{name} carries kvpn annotations but no lock; "
                f"`kvpn recover {name} -n {namespace}` restores it"
            )
        _clean_mesh(b, service, me=me, now=now, live_locks=live_locks)
    _clean_orphan_member_services(b, services, me=me, live_locks=live_locks)
    _clean_orphan_routers(b, services, pods, now=now)
    for pod in pods:
        _judge_pod(b, pod, me=me, now=now, live_locks=live_locks, live=live_connect_sessions)
    return b.plan()


# --- kvpn mesh (issue 7): decisions in kvpn.cluster.mesh_cleanup ----------------------------


def _clean_mesh(
    b: _Builder,
    service: Obj,
    *,
    me: Identity,
    now: datetime,
    live_locks: dict[tuple[str, str], Lock],
) -> None:
    """This user's dead mesh members go; the mesh is restored once nobody is left in it. Live
    members count as live locks, so their shadow pods are kept."""
    namespace, _ = _key(service)
    mesh = plan_mesh_cleanup(service, user=me.user, now=now, on_request=False)
    for member in mesh.live_members:
        live_locks[(namespace, member.session)] = member.lock
    b.actions.extend(mesh.actions)
    b.notes.extend(mesh.notes)


def _clean_orphan_member_services(
    b: _Builder,
    services: Iterable[Obj],
    *,
    me: Identity,
    live_locks: Mapping[tuple[str, str], Lock],
) -> None:
    already = {
        (a.namespace, s)
        for a in b.actions
        if isinstance(a, RestoreMesh)
        for s in a.restore.member_services
    }
    already |= {
        (a.namespace, s)
        for a in b.actions
        if isinstance(a, DropMeshMembers)
        for s in a.member_services
    }
    for action in orphan_member_services(list(services), set(live_locks), user=me.user):
        if (action.namespace, action.name) not in already:
            b.actions.append(action)


def _clean_orphan_routers(
    b: _Builder, services: list[Obj], pods: list[Obj], *, now: datetime
) -> None:
    """Router pods and stand-in Services (kvpn's, whoever's) of Services with no mesh."""
    for orphan in orphan_router_pods(services, pods, now=now):
        b.actions.append(DeletePod(orphan.namespace, orphan.name, orphan.reason, "mesh router pod"))
    b.actions.extend(orphan_standin_services(services, now=now))


def _recover_mesh(b: _Builder, service: Obj, *, me: Identity, now: datetime) -> frozenset[str]:
    """Restore a mesh whoever's it was, unless a member is alive; the members removed."""
    mesh = plan_mesh_cleanup(service, user=me.user, now=now, on_request=True)
    if mesh.refusal is not None:
        raise RecoverRefused(mesh.refusal)
    b.actions.extend(mesh.actions)
    b.notes.extend(mesh.notes)
    return mesh.dead_sessions


# --- end kvpn mesh ----------------------------------------------------------------------------


def _judge_pod(
    b: _Builder,
    pod: Obj,
    *,
    me: Identity,
    now: datetime,
    live_locks: Mapping[tuple[str, str], Lock],
    live: Set[str] | None,
) -> None:
    namespace, name = _key(pod)
    labels, annotations = _labels(pod), _annotations(pod)
    if labels.get(MANAGED_BY_LABEL) != "kvpn" or _meta(pod).get("deletionTimestamp"):
        return
    if annotations.get(USER_ANNOTATION) != me.user:
        return
    session = labels.get(SESSION_LABEL, "")
    kind = annotations.get(KIND_ANNOTATION)
    if kind is not None:
        if (namespace, session) in live_locks:
            return
        service = annotations.get(SERVICE_ANNOTATION, "?")
        b.actions.append(
            DeletePod(namespace, name, f"its {kind} of {service} (session {session}) is over")
        )
        return
    if live is not None and session in live:
        return
    beat = heartbeat_state(annotations, now)
    if beat == HeartbeatState.ALIVE:
        return  # a live session, maybe on another machine: never touched
    if beat == HeartbeatState.EXPIRED:
        when = annotations.get(HEARTBEAT_ANNOTATION, "?")
        b.actions.append(
            DeletePod(
                namespace,
                name,
                f"its kvpn connect session {session} stopped heartbeating at {when}",
            )
        )
        return
    # No (readable) heartbeat: a pod of an older kvpn, or of a connect still starting.
    if live is None:
        b.notes.append(
            f"shadow pod {namespace}/{name} of kvpn connect kept: this machine's session "
            "files are not readable (run kvpn clean as the user who ran kvpn connect)"
        )
        return
    started = parse_time(annotations.get(STARTED_AT_ANNOTATION, ""))
    if started is not None and now - started < CONNECT_STARTUP_GRACE:
        return  # maybe a connect still starting: it writes its session file once connected
    b.actions.append(
        DeletePod(namespace, name, f"no kvpn connect session {session} runs on this machine")
    )


def plan_recover(
    service: Obj | None,
    deployments: Iterable[Obj],
    pods: Iterable[Obj],
    *,
    namespace: str,
    name: str,
    me: Identity,
    now: datetime,
) -> CleanupPlan:
    """Restore one Service, whoever changed it, unless a live session holds it."""
    if service is None:
        raise RecoverRefused(f"service {namespace}/{name} not found")
    pods = list(pods)
    b = _Builder()
    annotations = _annotations(service)
    raw, lock = read_lock(annotations)
    verdict = judge_lock(raw, lock, me=me, now=now)
    if verdict in (LockVerdict.OTHERS_LIVE, LockVerdict.MINE_LIVE) and lock is not None:
        wait = max(0, int((lock.expires_at() - now).total_seconds()))
        raise RecoverRefused(
            f"service {namespace}/{name} is held by a live session: {lock.describe(now)}; "
            f"stop that session (Ctrl-C), or retry once its heartbeat has expired (in {wait}s)"
        )
    mesh_sessions = _recover_mesh(b, service, me=me, now=now)  # kvpn mesh (issue 7)
    if not any(isinstance(a, RestoreMesh) for a in b.actions):  # kvpn mesh: a router left
        routers = [p for p in pods if _labels(p).get(ROUTER_LABEL) == name]
        for orphan in orphan_router_pods([service], routers, now=now):
            b.actions.append(DeletePod(namespace, orphan.name, orphan.reason, "mesh router pod"))
    if lock is not None and lock.kind == PREVIEW_KIND:
        b.actions.append(DeleteService(namespace, name, f"preview of dead session {lock.session}"))
    elif raw is not None or _has_leftovers(annotations):
        reason = "on request" + (f" (was: {lock.describe(now)})" if lock else "")
        _restore_exchange(b, service, {_key(d): d for d in deployments}, reason)
    elif not b.actions:
        b.notes.append(f"service {namespace}/{name} carries no kvpn changes")
    sessions = ({lock.session} if lock is not None else set()) | mesh_sessions
    for pod in pods:
        pns, pname = _key(pod)
        labels, pod_annotations = _labels(pod), _annotations(pod)
        if (
            pns == namespace
            and labels.get(MANAGED_BY_LABEL) == "kvpn"
            and pod_annotations.get(SERVICE_ANNOTATION) == name
            and labels.get(SESSION_LABEL) in sessions
            and not _meta(pod).get("deletionTimestamp")
        ):
            b.actions.append(DeletePod(pns, pname, "its session is over"))
    return b.plan()


__all__ = [
    "SCALED_BY_ANNOTATION",
    "CleanupAction",
    "CleanupPlan",
    "DeletePod",
    "DeleteService",
    "RecoverRefused",
    "RestoreDeployment",
    "RestoreService",
    "plan_clean",
    "plan_recover",
]
