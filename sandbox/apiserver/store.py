"""The sandbox API server's object store: objects, one resourceVersion counter and a watch log.

Theory of operation
-------------------
Like etcd behind a real API server, the store keeps every object under one global, strictly
increasing revision. Each write (create, update, delete) bumps the revision, stamps it into
``metadata.resourceVersion`` (as a string, as Kubernetes does) and appends a ``WatchEvent`` to a
bounded log. A watcher that asks to resume from revision R gets every logged event after R; if R
has already fallen out of the log the store raises ``Gone`` (HTTP 410), which tells clients to
re-list. In-process subscribers (controllers, the kubelet, kube-proxy) get the same events
through an ``asyncio.Queue``.

The store knows nothing of HTTP, defaults or validation: the API layer does those and calls the
store with complete objects. All objects going in and out are deep copies, so no caller can
mutate stored state by accident. There is no module-level state; a control plane owns one
``Store``.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import copy
import datetime as _dt
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sandbox.apiserver.resources import ResourceType

Obj = dict[str, Any]


class StoreError(Exception):
    """An error that becomes a ``kind: Status`` response with ``code`` and ``reason``."""

    code = 500
    reason = "InternalError"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def status(self) -> Obj:
        body: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


class BadRequest(StoreError):
    code = 400
    reason = "BadRequest"


class Unauthorized(StoreError):
    code = 401
    reason = "Unauthorized"


class Forbidden(StoreError):
    code = 403
    reason = "Forbidden"


class NotFound(StoreError):
    code = 404
    reason = "NotFound"


class MethodNotAllowed(StoreError):
    code = 405
    reason = "MethodNotAllowed"


class AlreadyExists(StoreError):
    code = 409
    reason = "AlreadyExists"


class Conflict(StoreError):
    code = 409
    reason = "Conflict"


class Gone(StoreError):
    code = 410
    reason = "Expired"


class UnsupportedMediaType(StoreError):
    code = 415
    reason = "UnsupportedMediaType"


class Invalid(StoreError):
    code = 422
    reason = "Invalid"


def now_rfc3339() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _details(rt: ResourceType, name: str) -> dict[str, Any]:
    details: dict[str, Any] = {"name": name, "kind": rt.plural}
    if rt.group:
        details["group"] = rt.group
    return details


def not_found(rt: ResourceType, name: str) -> NotFound:
    what = f"{rt.plural}.{rt.group}" if rt.group else rt.plural
    return NotFound(f'{what} "{name}" not found', details=_details(rt, name))


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: str  # ADDED | MODIFIED | DELETED
    resource: ResourceType
    object: Obj
    revision: int

    @property
    def namespace(self) -> str | None:
        ns: str | None = self.object.get("metadata", {}).get("namespace")
        return ns

    @property
    def name(self) -> str:
        name: str = self.object["metadata"]["name"]
        return name


@dataclass(eq=False)
class Subscription:
    """An in-process stream of watch events; iterate it with ``async for``."""

    queue: asyncio.Queue[WatchEvent] = field(default_factory=asyncio.Queue)
    _store: Store | None = None

    def close(self) -> None:
        if self._store is not None:
            self._store._subscribers.discard(self)
            self._store = None

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> WatchEvent:
        return await self.queue.get()


Key = tuple[str, str, str]  # (resource key, namespace or "", name)


class Store:
    def __init__(self, *, history: int = 20000) -> None:
        self.revision = 1
        self._objects: dict[Key, Obj] = {}
        self._log: collections.deque[WatchEvent] = collections.deque(maxlen=history)
        # Events up to and including this revision may have been dropped from the log.
        self._compacted = 0
        self._subscribers: set[Subscription] = set()

    # -- reads -----------------------------------------------------------------------------

    @staticmethod
    def _key(rt: ResourceType, namespace: str | None, name: str) -> Key:
        return (rt.key, namespace or "" if rt.namespaced else "", name)

    def get(self, rt: ResourceType, namespace: str | None, name: str) -> Obj:
        obj = self._objects.get(self._key(rt, namespace, name))
        if obj is None:
            raise not_found(rt, name)
        return copy.deepcopy(obj)

    def find(self, rt: ResourceType, namespace: str | None, name: str) -> Obj | None:
        obj = self._objects.get(self._key(rt, namespace, name))
        return None if obj is None else copy.deepcopy(obj)

    def iter_objects(self, rt: ResourceType, namespace: str | None = None) -> Iterator[Obj]:
        """Stored objects of a type (not copies: callers must not mutate), sorted by ns/name."""
        keys = sorted(
            k for k in self._objects if k[0] == rt.key and (namespace is None or k[1] == namespace)
        )
        for k in keys:
            yield self._objects[k]

    def list(
        self,
        rt: ResourceType,
        namespace: str | None = None,
        predicate: Callable[[Obj], bool] | None = None,
    ) -> tuple[list[Obj], int]:
        """Deep copies of matching objects, sorted by namespace and name, and the revision."""
        items = [
            copy.deepcopy(o)
            for o in self.iter_objects(rt, namespace)
            if predicate is None or predicate(o)
        ]
        return items, self.revision

    # -- writes ----------------------------------------------------------------------------

    def _record(self, type_: str, rt: ResourceType, obj: Obj) -> None:
        event = WatchEvent(type_, rt, copy.deepcopy(obj), self.revision)
        if len(self._log) == self._log.maxlen:
            self._compacted = self._log[0].revision
        self._log.append(event)
        for sub in list(self._subscribers):
            sub.queue.put_nowait(event)

    def create(self, rt: ResourceType, obj: Obj) -> Obj:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            prefix = meta.get("generateName")
            if not prefix:
                raise Invalid(
                    f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: '
                    "name or generateName is required"
                )
            for _ in range(100):
                candidate = prefix + uuid.uuid4().hex[:5]
                if self._key(rt, meta.get("namespace"), candidate) not in self._objects:
                    meta["name"] = candidate
                    break
        if not rt.namespaced:
            meta.pop("namespace", None)
        key = self._key(rt, meta.get("namespace"), meta["name"])
        if key in self._objects:
            what = f"{rt.plural}.{rt.group}" if rt.group else rt.plural
            raise AlreadyExists(
                f'{what} "{meta["name"]}" already exists', details=_details(rt, meta["name"])
            )
        self.revision += 1
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = str(self.revision)
        meta["creationTimestamp"] = now_rfc3339()
        meta.setdefault("generation", 1)
        obj["apiVersion"] = rt.api_version
        obj["kind"] = rt.kind
        self._objects[key] = obj
        self._record("ADDED", rt, obj)
        return copy.deepcopy(obj)

    def update(self, rt: ResourceType, obj: Obj, *, check_version: bool = True) -> Obj:
        """Replace an object. A ``metadata.resourceVersion`` that is set and stale -> Conflict.

        Identity fields (uid, creationTimestamp) are kept from the stored object; ``generation``
        is bumped when ``spec`` changed.
        """
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        name = meta.get("name", "")
        key = self._key(rt, meta.get("namespace"), name)
        old = self._objects.get(key)
        if old is None:
            raise not_found(rt, name)
        given = meta.get("resourceVersion")
        if check_version and given and given != old["metadata"]["resourceVersion"]:
            what = f"{rt.plural}.{rt.group}" if rt.group else rt.plural
            raise Conflict(
                f'Operation cannot be fulfilled on {what} "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again",
                details=_details(rt, name),
            )
        if obj == old:
            return copy.deepcopy(old)
        for kept in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds"):
            if kept in old["metadata"]:
                meta.setdefault(kept, old["metadata"][kept])
        generation = old["metadata"].get("generation", 1)
        if obj.get("spec") != old.get("spec"):
            generation += 1
        meta["generation"] = generation
        if not rt.namespaced:
            meta.pop("namespace", None)
        obj["apiVersion"] = rt.api_version
        obj["kind"] = rt.kind
        # A write that changes nothing but the version stamp is not a change.
        probe = copy.deepcopy(obj)
        probe["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if probe == old:
            return copy.deepcopy(old)
        self.revision += 1
        meta["resourceVersion"] = str(self.revision)
        self._objects[key] = obj
        self._record("MODIFIED", rt, obj)
        return copy.deepcopy(obj)

    def delete(self, rt: ResourceType, namespace: str | None, name: str) -> Obj:
        key = self._key(rt, namespace, name)
        old = self._objects.pop(key, None)
        if old is None:
            raise not_found(rt, name)
        self.revision += 1
        old["metadata"]["resourceVersion"] = str(self.revision)
        self._record("DELETED", rt, old)
        return copy.deepcopy(old)

    # -- watch -----------------------------------------------------------------------------

    def events_since(self, revision: int) -> builtins.list[WatchEvent]:
        """Logged events with a revision greater than ``revision``; Gone if compacted away."""
        if revision < self._compacted:
            raise Gone(f"too old resource version: {revision} ({self._compacted})")
        return [e for e in self._log if e.revision > revision]

    def subscribe(self) -> Subscription:
        sub = Subscription(_store=self)
        self._subscribers.add(sub)
        return sub
