"""What controller planners produce (actions) and the object helpers they share.

An action is a plain, frozen description of one API write. Planners return lists of them; the
controller loop (:mod:`sandbox.controllers`) applies them; tests compare them.
"""

from __future__ import annotations

import datetime as _dt
import enum
from dataclasses import dataclass, field
from typing import Any

from sandbox.apiserver.resources import ResourceType
from sandbox.apiserver.store import Obj


class DeleteMode(enum.Enum):
    GRACEFUL = "graceful"  # through the Api: pods get a deletionTimestamp and terminate
    REMOVE = "remove"  # straight out of the store (a namespace whose contents are gone)


@dataclass(frozen=True, slots=True)
class CreateObject:
    resource: ResourceType
    namespace: str | None
    obj: Obj = field(hash=False)

    def describe(self) -> str:
        m = self.obj.get("metadata", {})
        name = m.get("name") or f"{m.get('generateName', '')}*"
        return f"create {self.resource.key} {self.namespace or ''}/{name}"


@dataclass(frozen=True, slots=True)
class UpdateObject:
    resource: ResourceType
    namespace: str | None
    name: str
    obj: Obj = field(hash=False)
    subresource: str | None = None

    def describe(self) -> str:
        sub = f"/{self.subresource}" if self.subresource else ""
        return f"update {self.resource.key}{sub} {self.namespace or ''}/{self.name}"


@dataclass(frozen=True, slots=True)
class DeleteObject:
    resource: ResourceType
    namespace: str | None
    name: str
    mode: DeleteMode = DeleteMode.GRACEFUL

    def describe(self) -> str:
        return f"delete ({self.mode.value}) {self.resource.key} {self.namespace or ''}/{self.name}"


Action = CreateObject | UpdateObject | DeleteObject


# -- object helpers (read-only) -----------------------------------------------------------


def meta(obj: Obj) -> dict[str, Any]:
    m: dict[str, Any] = obj.get("metadata") or {}
    return m


def labels_of(obj: Obj) -> dict[str, str]:
    labels: dict[str, str] = meta(obj).get("labels") or {}
    return labels


def is_deleting(obj: Obj) -> bool:
    return bool(meta(obj).get("deletionTimestamp"))


def controller_uid(obj: Obj) -> str | None:
    """The uid of the object's managing controller (the ownerReference with controller=true)."""
    for ref in meta(obj).get("ownerReferences") or []:
        if ref.get("controller"):
            uid = ref.get("uid")
            return str(uid) if uid else None
    return None


def owner_reference(owner: Obj, api_version: str, kind: str) -> Obj:
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": meta(owner)["name"],
        "uid": meta(owner)["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def pod_condition(pod: Obj, type_: str) -> Obj | None:
    for cond in pod.get("status", {}).get("conditions") or []:
        if cond.get("type") == type_:
            c: Obj = cond
            return c
    return None


def pod_is_ready(pod: Obj) -> bool:
    cond = pod_condition(pod, "Ready")
    return cond is not None and cond.get("status") == "True"


def parse_time(text: object) -> _dt.datetime | None:
    if not isinstance(text, str):
        return None
    try:
        parsed = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=_dt.UTC)


def format_time(when: _dt.datetime) -> str:
    return when.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_is_available(pod: Obj, min_ready_seconds: int, now: _dt.datetime) -> bool:
    """Ready for at least ``min_ready_seconds`` (by the Ready condition's transition time)."""
    if not pod_is_ready(pod):
        return False
    if min_ready_seconds <= 0:
        return True
    cond = pod_condition(pod, "Ready") or {}
    since = parse_time(cond.get("lastTransitionTime"))
    return since is not None and (now - since).total_seconds() >= min_ready_seconds


def set_condition(
    conditions: list[Obj], type_: str, status: str, reason: str, message: str, now: _dt.datetime
) -> list[Obj]:
    """Conditions with ``type_`` set, keeping timestamps when nothing about it changed."""
    stamp = format_time(now)
    out = []
    found = False
    for cond in conditions:
        if cond.get("type") != type_:
            out.append(cond)
            continue
        found = True
        new = dict(cond)
        if cond.get("status") != status:
            new["lastTransitionTime"] = stamp
        if (cond.get("status"), cond.get("reason"), cond.get("message")) != (
            status,
            reason,
            message,
        ):
            new["lastUpdateTime"] = stamp
        new.update(status=status, reason=reason, message=message)
        out.append(new)
    if not found:
        out.append(
            {
                "type": type_,
                "status": status,
                "reason": reason,
                "message": message,
                "lastUpdateTime": stamp,
                "lastTransitionTime": stamp,
            }
        )
    return out
