"""What ``kvpn clean`` and ``kvpn recover`` do to a meshed Service: pure decisions.

The undo is computed from the Service's annotations alone (:func:`kvpn.cluster.mesh_plan.
restore_mesh`): ``kvpn.dev/mesh`` records the original selector, the router pod and the
stand-in; each ``kvpn.dev/mesh-member.<session>`` records its mark, hence its member Service.

- ``clean`` removes *this user's* members whose heartbeat expired (and their member Services);
  when no member is left alive and no other user's dead member remains, it restores the whole
  mesh: selector back, annotations removed, router pod, stand-in and member Services deleted.
- ``recover S`` restores the mesh whoever's it was, unless a member is alive.
- Member Services of this user whose session is no member any more are deleted.
- Orphans, whoever made them: a router pod (label ``kvpn.dev/mesh-router``) or a stand-in
  Service whose Service carries no ``kvpn.dev/mesh`` annotation (or is gone) is deleted - only
  objects labelled ``app.kubernetes.io/managed-by=kvpn``, never while a mesh (even a closing
  or unreadable one) is recorded, and only once older than :data:`ORPHAN_GRACE` (a joiner
  writes ``kvpn.dev/mesh`` before it creates them; the grace covers the Services having been
  listed before the pods, and clock skew).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from kvpn.cluster.mesh_plan import (
    MESH_SERVICE_LABEL,
    Member,
    MeshRestore,
    MeshView,
    drop_members_ops,
    labels_text,
    read_mesh,
    restore_mesh,
)
from kvpn.cluster.shadow_pod import MANAGED_BY_LABEL, SESSION_LABEL, USER_ANNOTATION
from kvpn.shadow.mesh_names import (
    MEMBER_ANNOTATION_PREFIX,
    MESH_ANNOTATION,
    ROUTER_LABEL,
    standin_service_name,
)

ORPHAN_GRACE = timedelta(seconds=60)


@dataclass(frozen=True, slots=True)
class RestoreMesh:
    """Restore a meshed Service (selector, annotations), then delete the mesh's objects."""

    namespace: str
    name: str
    restore: MeshRestore
    reason: str

    @property
    def ops(self) -> tuple[dict[str, Any], ...]:
        return self.restore.ops

    def describe(self) -> str:
        r = self.restore
        deleted = [f"router pod {r.router}", f"stand-in service {r.standin}"]
        deleted += [f"member service {s}" for s in r.member_services]
        if not r.puts_selector_back:
            return (
                f"finish closing the mesh of service {self.namespace}/{self.name} (its "
                f"selector is back already), delete {', '.join(deleted)}: {self.reason}"
            )
        return (
            f"restore meshed service {self.namespace}/{self.name} (selector "
            f"{labels_text(r.selector)}), delete {', '.join(deleted)}: {self.reason}"
        )


@dataclass(frozen=True, slots=True)
class DropMeshMembers:
    """Remove dead members from a mesh that stays (or that someone else must restore)."""

    namespace: str
    name: str
    ops: tuple[dict[str, Any], ...]
    sessions: tuple[str, ...]
    member_services: tuple[str, ...]
    reason: str

    def describe(self) -> str:
        services = "".join(f", delete member service {s}" for s in self.member_services)
        return (
            f"remove mesh member(s) {', '.join(self.sessions)} from service "
            f"{self.namespace}/{self.name}{services}: {self.reason}"
        )


@dataclass(frozen=True, slots=True)
class DeleteMeshService:
    """A member Service whose session is no member of its mesh any more, or an orphan
    stand-in Service (``what``)."""

    namespace: str
    name: str
    reason: str
    what: str = "mesh member service"

    def describe(self) -> str:
        return f"delete {self.what} {self.namespace}/{self.name}: {self.reason}"


@dataclass(frozen=True, slots=True)
class OrphanRouterPod:
    """A router pod whose Service records no mesh (``kvpn.cluster.cleanup`` deletes it)."""

    namespace: str
    name: str
    reason: str


MeshCleanupAction = RestoreMesh | DropMeshMembers | DeleteMeshService


@dataclass(frozen=True, slots=True)
class MeshCleanup:
    actions: tuple[MeshCleanupAction, ...] = ()
    notes: tuple[str, ...] = ()
    live_members: tuple[Member, ...] = ()
    dead_sessions: frozenset[str] = frozenset()  # members these actions remove
    refusal: str | None = None  # recover: a live member holds it


def _meta_of(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _str_map(raw: object) -> dict[str, str]:
    if not isinstance(raw, Mapping):
        return {}
    return {str(k): v for k, v in raw.items() if isinstance(v, str)}


def plan_mesh_cleanup(
    service: Mapping[str, Any], *, user: str, now: datetime, on_request: bool
) -> MeshCleanup:
    """What ``kvpn clean`` (``on_request`` False: only ``user``'s dead members) or
    ``kvpn recover`` (True: any dead member) does to one Service's mesh."""
    meta = _meta_of(service)
    namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
    view = read_mesh(name, _str_map(meta.get("annotations")))
    if not view.meshed:
        return MeshCleanup()
    rv = str(meta.get("resourceVersion") or "") or None
    label = f"service {namespace}/{name}"
    live = tuple(view.live(now))
    if on_request and live:
        return MeshCleanup(
            live_members=live,
            refusal=f"{label} is meshed by live sessions: "
            + "; ".join(m.describe(now) for m in live)
            + "; stop them (Ctrl-C), or retry once their heartbeats have expired",
        )
    notes: list[str] = []
    dead = [(k, raw, m) for k, raw, m in view.members if m is None or m.expired(now)]
    removable = [(k, raw, m) for k, raw, m in dead if on_request or (m and m.lock.user == user)]
    blocked = [(k, raw, m) for k, raw, m in dead if (k, raw, m) not in removable]
    for key, _, m in blocked:
        who = m.describe(now) if m is not None else f"unreadable {key}"
        notes.append(
            f"{label}: mesh member {who}; not yours: `kvpn recover {name} -n {namespace}` "
            "restores it"
        )
    if view.raw_state is not None and view.state is None:
        notes.append(f"{label} has an unreadable {MESH_ANNOTATION}; restore it by hand")
    actions: list[MeshCleanupAction] = []
    if not live and not blocked and view.state is not None:
        restore = restore_mesh(view, rv, now=now, two_step=False)
        if restore is not None:
            why = "on request" if on_request else "no live member remains"
            actions.append(RestoreMesh(namespace, name, restore, why))
    elif removable:
        sessions = tuple(k[len(MEMBER_ANNOTATION_PREFIX) :] for k, _, _ in removable)
        services = tuple(sorted({view.member_service(m) for _, _, m in removable if m}))
        ops = tuple(drop_members_ops(rv, [(k, raw) for k, raw, _ in removable]))
        reason = "their heartbeats expired" if live or blocked else "no mesh is recorded"
        actions.append(DropMeshMembers(namespace, name, ops, sessions, services, reason))
    removed = (
        {k[len(MEMBER_ANNOTATION_PREFIX) :] for k, _, _ in view.members}
        if any(isinstance(a, RestoreMesh) for a in actions)
        else {k[len(MEMBER_ANNOTATION_PREFIX) :] for k, _, _ in removable}
    )
    return MeshCleanup(tuple(actions), tuple(notes), live, frozenset(removed & _all_sessions(view)))


def _all_sessions(view: MeshView) -> set[str]:
    return {k[len(MEMBER_ANNOTATION_PREFIX) :] for k, _, _ in view.members}


def orphan_member_services(
    services: Sequence[Mapping[str, Any]],
    live_sessions: set[tuple[str, str]],
    *,
    user: str | None,
) -> list[DeleteMeshService]:
    """Member Services (of ``user``; None: anyone's) whose session is no live mesh member."""
    found = []
    for service in services:
        meta = _meta_of(service)
        labels = _str_map(meta.get("labels"))
        annotations = _str_map(meta.get("annotations"))
        session = labels.get(SESSION_LABEL)
        if labels.get(MANAGED_BY_LABEL) != "kvpn" or MESH_SERVICE_LABEL not in labels:
            continue
        if session is None or (user is not None and annotations.get(USER_ANNOTATION) != user):
            continue
        namespace = str(meta.get("namespace") or "")
        if (namespace, session) in live_sessions:
            continue
        found.append(
            DeleteMeshService(
                namespace,
                str(meta.get("name") or ""),
                f"session {session} is no member of the mesh of {labels[MESH_SERVICE_LABEL]}",
            )
        )
    return found


# --- orphans: router pods and stand-in Services of no mesh ----------------------------------


def _created(meta: Mapping[str, Any]) -> datetime | None:
    text = meta.get("creationTimestamp")
    if not isinstance(text, str):
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _orphan(
    meta: Mapping[str, Any], meshed: Mapping[tuple[str, str], bool], service: str, now: datetime
) -> str | None:
    """Why a router pod or stand-in of ``service`` is an orphan, or None (keep it)."""
    if meta.get("deletionTimestamp"):
        return None
    namespace = str(meta.get("namespace") or "")
    recorded = meshed.get((namespace, service))
    if recorded:
        return None
    created = _created(meta)
    if created is None or now - created < ORPHAN_GRACE:
        return None  # maybe a mesh being created right now (or an unreadable age): keep
    if recorded is None:
        return f"service {namespace}/{service} does not exist"
    return f"service {namespace}/{service} records no mesh ({MESH_ANNOTATION})"


def _meshed(services: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], bool]:
    """(namespace, name) -> whether the Service carries ``kvpn.dev/mesh`` (any value)."""
    found = {}
    for service in services:
        meta = _meta_of(service)
        key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        found[key] = MESH_ANNOTATION in _str_map(meta.get("annotations"))
    return found


def orphan_router_pods(
    services: Sequence[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]], *, now: datetime
) -> list[OrphanRouterPod]:
    """kvpn's router pods whose Service (listed in ``services``) records no mesh."""
    meshed = _meshed(services)
    found = []
    for pod in pods:
        meta = _meta_of(pod)
        labels = _str_map(meta.get("labels"))
        service, name = labels.get(ROUTER_LABEL), str(meta.get("name") or "")
        if labels.get(MANAGED_BY_LABEL) != "kvpn" or not service or not name:
            continue
        reason = _orphan(meta, meshed, service, now)
        if reason is not None:
            found.append(
                OrphanRouterPod(str(meta.get("namespace") or ""), str(meta["name"]), reason)
            )
    return found


def orphan_standin_services(
    services: Sequence[Mapping[str, Any]], *, now: datetime
) -> list[DeleteMeshService]:
    """kvpn's stand-in Services whose Service records no mesh. A stand-in is labelled with
    its Service (``kvpn.dev/mesh-service``), has no session label (member Services do) and
    is named after its Service."""
    meshed = _meshed(services)
    found = []
    for standin in services:
        meta = _meta_of(standin)
        labels = _str_map(meta.get("labels"))
        service = labels.get(MESH_SERVICE_LABEL)
        if labels.get(MANAGED_BY_LABEL) != "kvpn" or not service or SESSION_LABEL in labels:
            continue
        if meta.get("name") != standin_service_name(service):
            continue
        reason = _orphan(meta, meshed, service, now)
        if reason is not None:
            namespace = str(meta.get("namespace") or "")
            found.append(
                DeleteMeshService(namespace, str(meta["name"]), reason, "stand-in service")
            )
    return found
