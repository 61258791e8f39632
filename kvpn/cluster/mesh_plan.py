"""Plans for ``kvpn mesh``: what a member writes on the Service, and the patches that undo it.

Pure: built from what was read, no I/O. The contract is ``docs/mesh-design.md``. This module
holds the mark, the annotations (:class:`Member`, :class:`MeshState`, :class:`MeshView`) and
the JSON patches that join, leave and restore; the manifests of the objects a mesh creates
and a session's :class:`~kvpn.cluster.mesh_objects.MeshPlan` are in
:mod:`kvpn.cluster.mesh_objects`.

What the cluster holds while Service ``S`` is meshed (auto mode):

- on ``S``: ``kvpn.dev/mesh`` = :class:`MeshState` (router, stand-in, header, the original
  selector, the routed ports), written by the first member with its own member annotation in
  one JSON patch; ``kvpn.dev/mesh-member.<session>`` = :class:`Member` (a lock of kind
  ``mesh`` plus the mark), one per developer, each refreshed by its own session; the selector
  is ``{"kvpn.dev/mesh-router": S}`` once the router pod is Ready;
- the router pod, the stand-in Service (the original selector), and one member Service per
  developer (``kvpn-mesh-<hash>``, selecting that developer's shadow pod).

Manual mode writes only its member annotation on ``S`` (so ``kvpn clean`` can tell a live
shadow pod from a dead one) and a shadow pod that carries the selector labels plus the mark.

Joining and leaving race each other, so every patch that decides *who is last* starts with a
``test`` of ``/metadata/resourceVersion`` and is retried on a fresh read. The last member out
restores in two steps: (1) selector back, every member annotation removed, and ``kvpn.dev/mesh``
marked ``closing`` (a joiner waits for it to go); (2) router pod, stand-in and member Services
deleted, then ``kvpn.dev/mesh`` removed. :func:`restore_mesh` computes the same undo from the
annotations alone, for ``kvpn clean`` and ``kvpn recover`` after a crash.
"""

from __future__ import annotations

import enum
import json
import re
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from kvpn.cluster.exchange_plan import (
    Selector,
    parse_selector_json,
    selector_of,
)
from kvpn.cluster.locks import Lock, annotation_path, format_time
from kvpn.shadow.mesh_names import (
    DEFAULT_HEADER,
    MEMBER_ANNOTATION_PREFIX,
    MESH_ANNOTATION,
    ROUTER_LABEL,
    MeshNameError,
    is_header_name,
    mesh_service_name,
    parse_port_spec,
    router_pod_name,
    standin_service_name,
)

MESH_KIND = "mesh"
MEMBER_LABEL = "kvpn.dev/mesh-member"  # on a member's shadow pod: its session
MESH_SERVICE_LABEL = "kvpn.dev/mesh-service"  # on router, stand-in and member Services: S
MARK_ALPHABET = string.ascii_lowercase + string.digits
MARK_LENGTH = 5

_LABEL_VALUE = re.compile(r"^(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?$")
_VISIBLE = re.compile(r"^[\x21-\x7e]+$")


class MeshMode(enum.Enum):
    AUTO = "auto"
    MANUAL = "manual"


class MeshPlanError(ValueError):
    """Input (a mark, a mode) or cluster state that a mesh cannot use; one line."""


# --- the mark -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mark:
    """The header ``key: value`` that selects this developer's shadow."""

    key: str
    value: str
    explicit_key: bool = False  # given as KEY:VALUE (else the default, or the router's)

    def header_line(self) -> str:
        return f"{self.key}: {self.value}"


def random_mark_value() -> str:
    return "".join(secrets.choice(MARK_ALPHABET) for _ in range(MARK_LENGTH))


def is_label_key(key: str) -> bool:
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return len(name) <= 63 and bool(_LABEL_VALUE.match(name))


def is_label_value(value: str) -> bool:
    return len(value) <= 63 and bool(_LABEL_VALUE.match(value))


def parse_mark(text: str | None, mode: MeshMode, *, random_value: str | None = None) -> Mark:
    """``KEY:VALUE`` or ``VALUE`` (key ``version``); a random value when ``text`` is None."""
    if text is None or text == "":
        key, value, explicit = DEFAULT_HEADER, random_value or random_mark_value(), False
    elif ":" in text:
        key, _, value = text.partition(":")
        explicit = True
    else:
        key, value, explicit = DEFAULT_HEADER, text, False
    if not is_header_name(key):
        raise MeshPlanError(f"--version-mark: {key!r} is not a valid HTTP header name")
    if not _VISIBLE.match(value):
        raise MeshPlanError(
            f"--version-mark: value {value!r} must be visible ASCII characters without spaces"
        )
    if mode == MeshMode.MANUAL:
        if not is_label_key(key):
            raise MeshPlanError(f"--version-mark: {key!r} is not a valid Kubernetes label key")
        if not is_label_value(value):
            raise MeshPlanError(
                f"--version-mark: {value!r} is not a valid Kubernetes label value (--mode "
                "manual puts it on the pod: up to 63 letters, digits, '-', '_', '.')"
            )
    return Mark(key, value, explicit)


# --- what the Service carries ---------------------------------------------------------------


def member_annotation(session: str) -> str:
    return MEMBER_ANNOTATION_PREFIX + session


@dataclass(frozen=True, slots=True)
class Member:
    """One developer in the mesh: a lock of kind ``mesh`` (mode auto/manual) plus the mark."""

    lock: Lock
    mark: str

    @property
    def session(self) -> str:
        return self.lock.session

    @property
    def mode(self) -> str:
        return self.lock.mode

    @property
    def annotation(self) -> str:
        return member_annotation(self.lock.session)

    def to_json(self) -> str:
        data = json.loads(self.lock.to_json())
        data["mark"] = self.mark
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Member | None:
        lock = Lock.from_json(text)
        if lock is None or lock.kind != MESH_KIND:
            return None
        mark = json.loads(text).get("mark")
        if not isinstance(mark, str) or not mark:
            return None
        return cls(lock, mark)

    def refreshed(self, now: datetime) -> Member:
        return replace(self, lock=self.lock.refreshed(now))

    def expired(self, now: datetime) -> bool:
        return self.lock.expired(now)

    def describe(self, now: datetime) -> str:
        return f"mark {self.mark!r}, " + self.lock.describe(now)


def _port_spec_ok(text: str) -> bool:
    """``text`` is exactly a canonical ``PORT/PROTO`` (what the manifests parse again)."""
    try:
        return parse_port_spec(text).spec == text
    except MeshNameError:
        return False


@dataclass(frozen=True, slots=True)
class MeshState:
    """The ``kvpn.dev/mesh`` annotation."""

    router: str
    standin: str
    header: str
    original_selector: Selector
    ports: tuple[str, ...]  # "8080/TCP", ...
    since: str
    closing: str = ""  # set by the last member out while it deletes the router

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "router": self.router,
            "standin": self.standin,
            "header": self.header,
            "originalSelector": dict(self.original_selector),
            "ports": list(self.ports),
            "since": self.since,
        }
        if self.closing:
            data["closing"] = self.closing
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> MeshState | None:
        try:
            data = json.loads(text)
        except (TypeError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        strings = ("router", "standin", "header", "since")
        if not all(isinstance(data.get(k), str) and data[k] for k in strings):
            return None
        selector = parse_selector_json(json.dumps(data.get("originalSelector")))
        ports = data.get("ports")
        if selector is None or not isinstance(ports, list):
            return None
        if not ports or not all(isinstance(p, str) and _port_spec_ok(p) for p in ports):
            return None
        if not is_header_name(data["header"]):
            return None
        closing = data.get("closing", "")
        return cls(
            data["router"],
            data["standin"],
            data["header"],
            selector_of(selector),
            tuple(ports),
            data["since"],
            closing if isinstance(closing, str) else "closing",
        )


@dataclass(frozen=True, slots=True)
class MeshView:
    """What a Service's annotations say about its mesh (malformed values kept raw)."""

    service: str
    raw_state: str | None
    state: MeshState | None
    members: tuple[tuple[str, str, Member | None], ...]  # (annotation key, raw, parsed)

    @property
    def meshed(self) -> bool:
        return self.raw_state is not None or bool(self.members)

    def parsed_members(self) -> list[Member]:
        return [m for _, _, m in self.members if m is not None]

    def live(self, now: datetime, *, except_session: str = "") -> list[Member]:
        return [
            m for m in self.parsed_members() if not m.expired(now) and m.session != except_session
        ]

    def member_service(self, member: Member) -> str:
        return mesh_service_name(self.service, member.mark)

    def find(self, session: str) -> tuple[str, Member | None] | None:
        key = member_annotation(session)
        return next(((raw, m) for k, raw, m in self.members if k == key), None)


def read_mesh(service: str, annotations: Mapping[str, str] | None) -> MeshView:
    annotations = annotations or {}
    raw_state = annotations.get(MESH_ANNOTATION)
    state = MeshState.from_json(raw_state) if raw_state is not None else None
    if state is not None and (
        state.router != router_pod_name(service) or state.standin != standin_service_name(service)
    ):
        # Annotations are writable by anyone who may patch the Service: a state naming other
        # objects would make kvpn wait on, and then delete, a pod or Service not its own.
        state = None
    members = tuple(
        (key, raw, Member.from_json(raw))
        for key, raw in sorted(annotations.items())
        if key.startswith(MEMBER_ANNOTATION_PREFIX)
    )
    return MeshView(service, raw_state, state, members)


def describe_mesh(view: MeshView, now: datetime) -> str:
    """One line naming who meshes a Service (for exchange's refusal)."""
    live = view.live(now)
    if live:
        return "meshed by " + "; ".join(m.describe(now) for m in live)
    return "meshed by a kvpn session that stopped"


def mesh_refusal(service: Mapping[str, Any], now: datetime) -> str | None:
    """Why ``kvpn exchange`` must not take a meshed Service (one line), or None."""
    meta = service.get("metadata") or {}
    name = str(meta.get("name") or "")
    annotations = meta.get("annotations")
    view = read_mesh(name, annotations if isinstance(annotations, Mapping) else None)
    if not view.meshed:
        return None
    return (
        f"service {meta.get('namespace')}/{name} is {describe_mesh(view, now)}: stop those "
        f"`kvpn mesh` sessions first (or `kvpn recover {name}` once they are dead)"
    )


# --- JSON patches ------------------------------------------------------------------------


def _test_rv(resource_version: str) -> dict[str, Any]:
    return {"op": "test", "path": "/metadata/resourceVersion", "value": resource_version}


def _test(key: str, value: str) -> dict[str, Any]:
    return {"op": "test", "path": annotation_path(key), "value": value}


def _remove(key: str) -> dict[str, Any]:
    return {"op": "remove", "path": annotation_path(key)}


def join_ops(
    resource_version: str,
    annotations: Mapping[str, str] | None,
    member: Member,
    new_state: MeshState | None,
) -> list[dict[str, Any]]:
    """Add this member (and, for the first one, ``kvpn.dev/mesh``) if nothing changed."""
    ops = [_test_rv(resource_version)]
    if annotations is None:
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
    if new_state is not None:
        ops.append(
            {"op": "add", "path": annotation_path(MESH_ANNOTATION), "value": new_state.to_json()}
        )
    ops.append({"op": "add", "path": annotation_path(member.annotation), "value": member.to_json()})
    return ops


def router_selector(service: str) -> dict[str, str]:
    return {ROUTER_LABEL: service}


def switch_selector_ops(resource_version: str, raw_state: str, service: str) -> list[Any]:
    """Point ``S`` at the router (only while the mesh it read is still there, unchanged)."""
    return [
        _test_rv(resource_version),
        _test(MESH_ANNOTATION, raw_state),
        {"op": "replace", "path": "/spec/selector", "value": router_selector(service)},
    ]


def refresh_member_ops(old: Member, new: Member) -> list[dict[str, Any]]:
    return [
        _test(old.annotation, old.to_json()),
        {"op": "replace", "path": annotation_path(new.annotation), "value": new.to_json()},
    ]


@dataclass(frozen=True, slots=True)
class MeshRestore:
    """Undo a whole mesh: the Service patch, then the objects to delete (in this order)."""

    ops: tuple[dict[str, Any], ...]
    selector: Selector
    router: str
    standin: str
    member_services: tuple[str, ...]
    closing_state: str | None  # the ``kvpn.dev/mesh`` value the patch leaves (None: removed)
    # False when finishing a close: the patch that marked it closing put the selector back,
    # and the selector may have been changed since (by its owner): it is left as it is
    puts_selector_back: bool = True


@dataclass(frozen=True, slots=True)
class Leave:
    """How one member leaves: its patch, and what it deletes afterwards."""

    ops: tuple[dict[str, Any], ...]
    restore: MeshRestore | None  # set when this member is the last one (auto mode)


def _member_removals(view: MeshView) -> list[dict[str, Any]]:
    ops: list[dict[str, Any]] = []
    for key, raw, _ in view.members:
        ops += [_test(key, raw), _remove(key)]
    return ops


def restore_mesh(
    view: MeshView, resource_version: str | None, *, now: datetime, two_step: bool
) -> MeshRestore | None:
    """Undo the mesh recorded in the annotations (None when ``kvpn.dev/mesh`` is unreadable
    or absent: then only member annotations are removed, see :func:`drop_members_ops`).

    ``two_step`` (a leaving session): ``kvpn.dev/mesh`` stays, marked closing, until the router
    is deleted; clean and recover remove it at once (they delete right after)."""
    if view.state is None or view.raw_state is None:
        return None
    state = view.state
    ops: list[dict[str, Any]] = []
    if resource_version is not None:
        ops.append(_test_rv(resource_version))
    ops.append(_test(MESH_ANNOTATION, view.raw_state))
    puts_selector_back = not state.closing  # closing: that patch already put it back
    if puts_selector_back:
        ops.append(
            {"op": "replace", "path": "/spec/selector", "value": dict(state.original_selector)}
        )
    ops += _member_removals(view)
    closing: str | None = None
    if two_step:
        closing = replace(state, closing=format_time(now)).to_json()
        ops.append({"op": "replace", "path": annotation_path(MESH_ANNOTATION), "value": closing})
    else:
        ops.append(_remove(MESH_ANNOTATION))
    services = tuple(sorted({view.member_service(m) for m in view.parsed_members()}))
    return MeshRestore(
        tuple(ops),
        state.original_selector,
        state.router,
        state.standin,
        services,
        closing,
        puts_selector_back,
    )


def finish_close_ops(closing_state: str) -> list[dict[str, Any]]:
    return [_test(MESH_ANNOTATION, closing_state), _remove(MESH_ANNOTATION)]


def drop_members_ops(
    resource_version: str | None, members: Sequence[tuple[str, str]]
) -> list[dict[str, Any]]:
    """Remove the given member annotations (key, exact raw value)."""
    ops: list[dict[str, Any]] = [] if resource_version is None else [_test_rv(resource_version)]
    for key, raw in members:
        ops += [_test(key, raw), _remove(key)]
    return ops


def leave(view: MeshView, resource_version: str, me: Member, *, now: datetime) -> Leave | None:
    """This member's way out, from a fresh read; None when its annotation is already gone.

    The last live auto member restores the whole mesh (dead members included)."""
    found = view.find(me.session)
    if found is None:
        return None
    raw = found[0]
    others = view.live(now, except_session=me.session)
    if me.mode == MeshMode.AUTO.value and not others and view.state is not None:
        restore = restore_mesh(view, resource_version, now=now, two_step=True)
        if restore is not None:
            return Leave(restore.ops, restore)
    return Leave(tuple(drop_members_ops(resource_version, [(me.annotation, raw)])), None)


def leave_of_session(
    view: MeshView, resource_version: str, session: str, *, now: datetime
) -> Leave | None:
    """How a *dead* session's member leaves, for the replay of its change journal: as
    :func:`leave`, with the member read from its annotation. None when that annotation is
    gone and nothing is left half done; a close that the last member out started and did not
    finish (``closing``, no member left) is finished - twice is harmless, and no one can
    join a closing mesh meanwhile."""
    found = view.find(session)
    if found is None:
        if view.state is None or not view.state.closing or view.members:
            return None
        restore = restore_mesh(view, resource_version, now=now, two_step=False)
        return Leave(restore.ops, restore) if restore is not None else None
    raw, member = found
    if member is None:  # unreadable, but under this session's key: only it goes
        ops = drop_members_ops(resource_version, [(member_annotation(session), raw)])
        return Leave(tuple(ops), None)
    return leave(view, resource_version, member, now=now)


def labels_text(labels: Selector) -> str:
    return ",".join(f"{k}={v}" for k, v in labels) or "(none)"
