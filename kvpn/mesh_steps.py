"""The cluster steps of a ``kvpn mesh`` session, each testable with an in-memory API.

- :func:`check_joinable`: the one-line refusals (an exchanged Service, a header other than the
  router's, a mark already in use, auto vs manual);
- :func:`join`: add this member (the first also writes ``kvpn.dev/mesh``), testing
  ``resourceVersion`` and retrying on a fresh read; :class:`MemberKeeper` keeps its heartbeat;
- :func:`ensure_router`: stand-in Service and router pod exist (whoever comes first creates
  them), the router is Ready, and only then the selector points at it;
- :func:`leave_mesh`: remove this member; the last live one restores the selector, then
  deletes the router pod, the stand-in and the member Services
  (:func:`remove_mesh_objects`), then removes ``kvpn.dev/mesh``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

from kvpn.cli.errors import UserError
from kvpn.cluster.exchange_plan import restore_service_ops, selector_of
from kvpn.cluster.intercept_api import InterceptApiError, KubeClients, PatchRejected
from kvpn.cluster.locks import LOCK_ANNOTATION, read_lock
from kvpn.cluster.mesh_objects import (
    MeshPlan,
    router_manifest,
    standin_manifest,
)
from kvpn.cluster.mesh_plan import (
    Leave,
    Mark,
    Member,
    MeshMode,
    MeshRestore,
    MeshView,
    finish_close_ops,
    join_ops,
    leave,
    leave_of_session,
    read_mesh,
    refresh_member_ops,
    router_selector,
    switch_selector_ops,
)
from kvpn.cluster.shadow_pod import FATAL_WAITING_REASONS
from kvpn.intercept_session import (
    HEARTBEAT_RETRIED,
    Heartbeating,
    LockLost,
    Out,
    annotations_of,
    now_utc,
)

PATCH_ATTEMPTS = 20
CLOSING_WAIT_SECONDS = 30.0
POLL_SECONDS = 0.5


def _nothing(what: str) -> None:
    return None


def selector_of_service(obj: dict[str, Any]) -> dict[str, str]:
    return dict((obj.get("spec") or {}).get("selector") or {})


def service_label(service: dict[str, Any]) -> str:
    meta = service.get("metadata") or {}
    return f"service {meta.get('namespace')}/{meta.get('name')}"


def exchange_refusal(service: dict[str, Any], now: datetime) -> str | None:
    """Why ``kvpn mesh`` must not touch a Service an exchange (or preview) holds, or None."""
    annotations = annotations_of(service)
    raw, lock = read_lock(annotations)
    if raw is None and not restore_service_ops(annotations).ops:
        return None
    held = lock.describe(now) if lock is not None else f"an unreadable {LOCK_ANNOTATION}"
    return (
        f"{service_label(service)} is held by kvpn {lock.kind if lock else 'exchange'} ({held}): "
        "kvpn mesh cannot share it until that session ends (or `kvpn clean` / `kvpn recover`)"
    )


def check_joinable(
    service: dict[str, Any], view: MeshView, mode: MeshMode, mark: Mark, *, now: datetime
) -> Mark:
    """Refuse what cannot be joined (one line each); the mark, with the router's header."""
    refusal = exchange_refusal(service, now)
    if refusal is not None:
        raise UserError(refusal)
    label = service_label(service)
    if mode == MeshMode.MANUAL and view.raw_state is not None:
        raise UserError(f"{label} is meshed in auto mode (a router routes it): use --mode auto")
    if mode == MeshMode.AUTO:
        if view.raw_state is not None and view.state is None:
            raise UserError(
                f"{label} has an unreadable kvpn.dev/mesh annotation: "
                f"`kvpn recover {view.service}` restores it"
            )
        manual = [m for m in view.live(now) if m.mode == MeshMode.MANUAL.value]
        if manual and view.state is None:
            raise UserError(
                f"{label} is meshed in manual mode by {manual[0].lock.holder}: use --mode manual"
            )
    if view.state is not None:
        header = view.state.header
        if mark.explicit_key and mark.key.lower() != header.lower():
            raise UserError(
                f"the router of {label} routes on header {header!r}, not {mark.key!r}: "
                f"use --version-mark {header}:{mark.value}"
            )
        mark = replace(mark, key=header)
    for member in view.parsed_members():
        if member.mark == mark.value:
            state = "" if not member.expired(now) else " (dead: `kvpn clean` removes it)"
            raise UserError(
                f"mark {mark.value!r} on {label} is already used by "
                f"{member.lock.holder}{state}: choose another --version-mark"
            )
    if not view.state and not selector_of_service(service):
        raise UserError(f"{label} has no selector (its endpoints are managed by hand)")
    if not view.state and selector_of_service(service) == router_selector(view.service):
        # kept as the "original" selector, it would make the stand-in select the router
        raise UserError(
            f"{label} selects a kvpn mesh router but records no mesh: put its own selector "
            "back first (kubectl edit)"
        )
    return mark


async def read_settled(kube: KubeClients, namespace: str, name: str, out: Out) -> dict[str, Any]:
    """The Service, once no leaving member is still tearing its mesh down."""
    waited = 0.0
    while True:
        service = await kube.read_service(namespace, name)
        if service is None:
            raise UserError(f"service {namespace}/{name} not found")
        state = read_mesh(name, annotations_of(service)).state
        if state is None or not state.closing:
            return service
        if waited == 0.0:
            out(f"the mesh of service {namespace}/{name} is being removed; waiting")
        if waited >= CLOSING_WAIT_SECONDS:
            raise UserError(
                f"service {namespace}/{name} is still being restored by a mesh session that "
                f"stopped: run `kvpn recover {name}`"
            )
        await asyncio.sleep(POLL_SECONDS)
        waited += POLL_SECONDS


# --- the member's annotation and its heartbeat -------------------------------------------


class MemberKeeper(Heartbeating):
    """Refreshes this member's annotation; every write tests the value last written."""

    def __init__(
        self, kube: KubeClients, namespace: str, service: str, member: Member, out: Out
    ) -> None:
        self._kube = kube
        self._namespace = namespace
        self._service = service
        self._out = out
        self.member = member
        self._unsure: Member | None = None  # written by a refresh cancelled in flight?
        self._mutex = asyncio.Lock()
        self.lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _lost_message(self) -> str:
        return (
            f"service {self._namespace}/{self._service} no longer lists this session as a mesh "
            "member; left as it is"
        )

    async def refresh(self) -> None:
        async with self._mutex:
            if self.lost.is_set():
                raise LockLost(self._lost_message())
            new = self.member.refreshed(now_utc())
            try:
                await self._write(new)
            except (asyncio.CancelledError, *HEARTBEAT_RETRIED):
                self._unsure = new  # the patch may have landed all the same
                raise
            self.member = new
            self._unsure = None

    async def _write(self, new: Member) -> None:
        ns, name = self._namespace, self._service
        try:
            await self._kube.patch_service(ns, name, refresh_member_ops(self.member, new))
            return
        except PatchRejected:
            unsure, self._unsure = self._unsure, None
        if unsure is not None:
            with contextlib.suppress(PatchRejected):
                await self._kube.patch_service(ns, name, refresh_member_ops(unsure, new))
                return
        self.lost.set()
        raise LockLost(self._lost_message())


# --- join, router, leave (each testable with an in-memory API) ----------------------------


async def join(
    kube: KubeClients, plan: MeshPlan, out: Out, *, now: Callable[[], datetime] = now_utc
) -> MeshPlan:
    """Add this member; the first one also writes ``kvpn.dev/mesh``. Returns the plan as
    joined (the mesh may have been created by someone else since it was read)."""
    ns, name = plan.namespace, plan.service
    for attempt in range(PATCH_ATTEMPTS):
        service = await read_settled(kube, ns, name, out)
        view = read_mesh(name, annotations_of(service))
        mark = check_joinable(service, view, plan.mode, plan.mark, now=now())
        if mark != plan.mark:  # someone else created the mesh with another header meanwhile
            plan = replace(plan, mark=mark)
        new_state = None
        if plan.mode == MeshMode.AUTO:
            if view.state is None and plan.state is not None:
                # The selector to restore is the one of this read (whose resourceVersion the
                # patch tests), not the one the plan was made from.
                new_state = replace(
                    plan.state, original_selector=selector_of(selector_of_service(service))
                )
            plan = replace(plan, state=view.state or new_state, creates_mesh=view.state is None)
        ops = join_ops(
            str(service["metadata"].get("resourceVersion") or ""),
            annotations_of(service),
            plan.member,
            new_state,
        )
        try:
            await kube.patch_service(ns, name, ops)
        except PatchRejected:
            await asyncio.sleep(0.05 * (attempt + 1))
            continue
        return plan
    raise InterceptApiError(f"service {ns}/{name} kept changing; could not join its mesh")


async def ensure_router(
    kube: KubeClients,
    plan: MeshPlan,
    image: str,
    out: Out,
    *,
    timeout: float,
    poll: float = POLL_SECONDS,
    before_change: Callable[[str], None] = _nothing,
) -> None:
    """Stand-in Service and router pod exist, the router is Ready, the selector points at it.

    ``before_change`` is told what is about to change, before each change (the session
    journals it)."""
    ns, name, state = plan.namespace, plan.service, plan.state
    if state is None:
        return
    if await kube.read_service(ns, state.standin) is None:
        before_change(f"create stand-in service {ns}/{state.standin}")
        try:
            await kube.create_service(ns, standin_manifest(ns, name, state))
            out(f"stand-in service {ns}/{state.standin} created")
        except InterceptApiError:
            if await kube.read_service(ns, state.standin) is None:  # not a lost race
                raise
    pod = await _router_pod(kube, ns, state.router, timeout=timeout, poll=poll)
    if pod is None:
        before_change(f"create router pod {ns}/{state.router}")
        try:
            await kube.create_pod(ns, router_manifest(ns, name, state, plan.routed, image))
            out(f"router pod {ns}/{state.router} created")
        except InterceptApiError:
            if await kube.read_pod(ns, state.router) is None:
                raise
    await wait_pod_ready(kube, ns, state.router, out, timeout=timeout, poll=poll)
    await switch_selector(kube, ns, name, before_change)


async def _router_pod(
    kube: KubeClients, namespace: str, name: str, *, timeout: float, poll: float
) -> dict[str, Any] | None:
    """The router pod, or None; waits for one still being deleted to be gone."""
    waited = 0.0
    while True:
        pod = await kube.read_pod(namespace, name)
        if pod is None or not (pod.get("metadata") or {}).get("deletionTimestamp"):
            return pod
        if waited >= timeout:
            raise InterceptApiError(f"router pod {namespace}/{name} is still being deleted")
        await asyncio.sleep(poll)
        waited += poll


def _pod_ready(pod: dict[str, Any]) -> tuple[bool, str | None, str]:
    """(ready, fatal problem or None, a short state for progress lines)."""
    status = pod.get("status") or {}
    phase = str(status.get("phase") or "Pending")
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason in FATAL_WAITING_REASONS:
            return False, f"{reason}: {waiting.get('message') or ''}".strip(": "), phase
        if reason:
            phase = f"{phase} ({reason})"
    if phase in ("Failed", "Succeeded"):
        return False, f"the pod stopped ({phase})", phase
    return ready, None, phase + (", Ready" if ready else "")


async def wait_pod_ready(
    kube: KubeClients,
    namespace: str,
    name: str,
    out: Out,
    *,
    timeout: float,
    poll: float = POLL_SECONDS,
) -> None:
    waited = 0.0
    last = ""
    while True:
        pod = await kube.read_pod(namespace, name)
        if pod is None:
            raise InterceptApiError(f"router pod {namespace}/{name} disappeared while starting")
        ready, problem, state = _pod_ready(pod)
        if state != last:
            out(f"router pod: {state}")
            last = state
        if ready:
            return
        if problem is not None:
            tail = await kube.read_pod_log(namespace, name)
            raise InterceptApiError(
                f"router pod {namespace}/{name} cannot start: {problem}"
                + (f"\n--- pod log ---\n{tail}" if tail else "")
            )
        if waited >= timeout:
            raise InterceptApiError(
                f"router pod {namespace}/{name} not Ready after {timeout:g}s ({state})"
            )
        await asyncio.sleep(poll)
        waited += poll


async def switch_selector(
    kube: KubeClients,
    namespace: str,
    name: str,
    before_change: Callable[[str], None] = _nothing,
) -> None:
    for attempt in range(PATCH_ATTEMPTS):
        service = await kube.read_service(namespace, name)
        if service is None:
            raise InterceptApiError(f"service {namespace}/{name} disappeared")
        view = read_mesh(name, annotations_of(service))
        if view.raw_state is None or view.state is None or view.state.closing:
            raise InterceptApiError(f"the mesh of service {namespace}/{name} was removed")
        if selector_of_service(service) == router_selector(name):
            return
        rv = str(service["metadata"].get("resourceVersion") or "")
        if attempt == 0:
            before_change(f"point the selector of service {namespace}/{name} at its router")
        try:
            await kube.patch_service(namespace, name, switch_selector_ops(rv, view.raw_state, name))
        except PatchRejected:
            await asyncio.sleep(0.05 * (attempt + 1))
            continue
        return
    raise InterceptApiError(f"service {namespace}/{name} kept changing; selector not switched")


async def leave_mesh(
    kube: KubeClients,
    namespace: str,
    name: str,
    member: Member,
    out: Out,
    *,
    now: Callable[[], datetime] = now_utc,
) -> bool:
    """Remove this member; the last one out restores the Service. True if it restored."""
    decided = await _leave(
        kube, namespace, name, lambda view, rv, at: leave(view, rv, member, now=at), out, now
    )
    return decided is not None and decided.restore is not None


async def leave_dead_session(
    kube: KubeClients,
    namespace: str,
    name: str,
    session: str,
    out: Out,
    *,
    now: Callable[[], datetime] = now_utc,
) -> bool:
    """Undo a dead session's membership (``kvpn clean`` replaying its change journal, no
    waiting for its heartbeat to expire): its member annotation goes; if no other member is
    alive, the Service is restored exactly as :func:`leave_mesh` would have. Only this
    session's annotation decides: none (and no close left half done) -> nothing is touched.
    True if anything changed."""
    decided = await _leave(
        kube,
        namespace,
        name,
        lambda view, rv, at: leave_of_session(view, rv, session, now=at),
        out,
        now,
    )
    return decided is not None


async def _leave(
    kube: KubeClients,
    namespace: str,
    name: str,
    decide: Callable[[MeshView, str, datetime], Leave | None],
    out: Out,
    now: Callable[[], datetime],
) -> Leave | None:
    """Apply the decision taken on a fresh read (retried while the Service changes); then,
    when it restores, delete the mesh's objects. The decision applied, or None."""
    for attempt in range(PATCH_ATTEMPTS):
        service = await kube.read_service(namespace, name)
        if service is None:
            return None
        view = read_mesh(name, annotations_of(service))
        rv = str(service["metadata"].get("resourceVersion") or "")
        decision = decide(view, rv, now())
        if decision is None:
            return None
        try:
            await kube.patch_service(namespace, name, list(decision.ops))
        except PatchRejected:
            await asyncio.sleep(0.05 * (attempt + 1))
            continue
        if decision.restore is not None:
            if decision.restore.puts_selector_back:
                selector = ",".join(f"{k}={v}" for k, v in decision.restore.selector)
                out(
                    f"last member out: selector of service {namespace}/{name} restored "
                    f"({selector})"
                )
            else:
                out(f"finishing the close of the mesh of service {namespace}/{name}")
            await remove_mesh_objects(kube, namespace, name, decision.restore, out)
        return decision
    raise InterceptApiError(f"service {namespace}/{name} kept changing; could not leave its mesh")


async def remove_mesh_objects(
    kube: KubeClients, namespace: str, name: str, restore: MeshRestore, out: Out
) -> None:
    """After the selector is restored: router, stand-in, member Services, then the annotation."""
    if await kube.delete_pod(namespace, restore.router):
        out(f"router pod {namespace}/{restore.router} deleted")
    if await kube.delete_service(namespace, restore.standin):
        out(f"stand-in service {namespace}/{restore.standin} deleted")
    for member_service in restore.member_services:
        await kube.delete_service(namespace, member_service)
    if restore.closing_state is not None:
        try:
            await kube.patch_service(namespace, name, finish_close_ops(restore.closing_state))
        except PatchRejected:
            pass  # someone (recover) already removed it
