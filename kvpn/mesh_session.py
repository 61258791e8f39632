"""``kvpn mesh``: only the requests carrying your header reach your laptop; the others keep
going to the Service's pods. Several developers share one Service, each with a mark.

Theory of operation (the Service's annotations and patches are in
:mod:`kvpn.cluster.mesh_plan`, the objects a mesh creates in :mod:`kvpn.cluster.mesh_objects`).
Everything is planned from what was read and refused, in one line, before any write (an
exchanged Service, a header that differs from the router's, a mark already used, ports that do
not match, nothing listening locally). Then, each step registering its undo before it runs:

1. join: add this member's annotation to the Service (the first member also writes
   ``kvpn.dev/mesh``), in a JSON patch that tests ``resourceVersion`` and is retried on a fresh
   read; keep its heartbeat (:class:`MemberKeeper`). Its undo is *leave*: remove the member;
   the last live member out restores the selector, then deletes the router pod, the stand-in
   and the member Services, then removes ``kvpn.dev/mesh``;
2. auto mode: make sure the stand-in Service and the router pod exist (whoever is first creates
   them; a member joining a mesh whose creator died re-creates them), wait until the router
   is Ready, and only then point the Service's selector at it;
3. the shadow pod with its remote forwards (:func:`kvpn.intercept_session.start_shadow`);
   manual mode labels it with the selector and the mark once it serves;
4. auto mode: the member Service ``kvpn-mesh-<hash>`` that the router dials for this mark.

Ctrl-C, SIGTERM or a lost member annotation run the undo newest first; a lost tunnel is
reconnected (the shadow pod recreated if it is gone: :func:`kvpn.intercept_session.supervise`),
the member Service and the manual labels keep selecting it. Each
change is first written to the session's change journal (:mod:`kvpn.change_journal`) with an
undo another process can run, so ``kvpn clean`` undoes a killed session at once: steps 1 and
2 with ``leave_mesh`` (:func:`kvpn.mesh_steps.leave_dead_session`), the shadow pod and the
member Service by deleting them. Steps 1, 2 and the leave are in :mod:`kvpn.mesh_steps`; this
module plans, checks and runs them.
"""

from __future__ import annotations

import asyncio
import secrets
import shlex
from datetime import datetime
from typing import Any

import asyncssh

from kvpn.cli.errors import UserError
from kvpn.cluster.exchange_plan import InterceptPodPlan, selects
from kvpn.cluster.intercept_api import InterceptApiError, KubeClients
from kvpn.cluster.locks import Identity, Lock
from kvpn.cluster.mesh_objects import (
    MeshPlan,
    manual_example,
    member_service_manifest,
    new_mesh_state,
    routed_ports,
)
from kvpn.cluster.mesh_plan import (
    MEMBER_LABEL,
    MESH_KIND,
    Mark,
    Member,
    MeshMode,
    MeshPlanError,
    MeshState,
    MeshView,
    parse_mark,
    read_mesh,
)
from kvpn.cluster.permissions import (
    Permission,
    require_permissions,
    service_lock_permissions,
    shadow_pod_permissions,
)
from kvpn.cluster.service_ports import (
    PortForward,
    PortKey,
    PortMatchError,
    ServicePort,
    container_ports_of,
    match_exposures,
    parse_expose,
)
from kvpn.cluster.shadow_pod import (
    DEFAULT_SHADOW_IMAGE,
    ShadowPodError,
    ShadowPodPlan,
)
from kvpn.intercept_session import (
    LOCAL_HOST,
    InterceptLink,
    InterceptOptions,
    LockLost,
    Out,
    SessionFacts,
    StoppedWhileStarting,
    agent_port,
    annotations_of,
    check_local_ports,
    finish_undo,
    now_utc,
    open_cluster,
    start_shadow,
    supervise,
    until_stopped,
)
from kvpn.journal_replay import (
    cluster_ref,
    open_session_journal,
    undo_delete_member_service,
    undo_delete_pod,
    undo_leave_mesh,
)
from kvpn.mesh_steps import (
    MemberKeeper,
    check_joinable,
    ensure_router,
    join,
    leave_mesh,
    read_settled,
    selector_of_service,
)
from kvpn.tunnel.errors import TunnelError
from kvpn.tunnel.keys import new_session_key, public_key_text
from kvpn.undo_stack import UndoStack


def _service_name(target: str) -> str:
    kind, slash, rest = target.partition("/")
    if not slash:
        return target
    if kind.lower() in ("svc", "service", "services"):
        return rest
    raise UserError(f"{target!r}: kvpn mesh takes a service name (or svc/NAME)")


def mesh_permissions(namespace: str, mode: MeshMode) -> tuple[Permission, ...]:
    """The Service and its annotations, the shadow pod, the pods behind the Service (named
    ports); auto: the stand-in, router pod and member Services; manual: labels on the pod."""
    needed = [*service_lock_permissions(namespace), *shadow_pod_permissions(namespace)]
    needed.append(Permission("list", "pods", namespace))
    if mode == MeshMode.AUTO:
        needed += [Permission(v, "services", namespace) for v in ("create", "delete")]
    else:
        needed.append(Permission("patch", "pods", namespace))
    return tuple(dict.fromkeys(needed))


def _original_selector(service: dict[str, Any], view: MeshView) -> dict[str, str]:
    if view.state is not None:
        return dict(view.state.original_selector)
    return selector_of_service(service)


async def _container_ports(
    kube: KubeClients, namespace: str, selector: dict[str, str]
) -> dict[PortKey, int]:
    text = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
    for pod in await kube.list_pods(namespace, text):
        ports = container_ports_of(pod.get("spec"))
        if ports:
            return ports
    try:
        deployments = await kube.list_deployments(namespace)
    except InterceptApiError:
        return {}
    for deployment in deployments:
        template = (deployment.get("spec") or {}).get("template") or {}
        if selects(selector, (template.get("metadata") or {}).get("labels")):
            return container_ports_of(template.get("spec"))
    return {}


def plan_mesh(
    service: dict[str, Any],
    view: MeshView,
    forwards: tuple[PortForward, ...],
    routed: tuple[Any, ...],
    *,
    mode: MeshMode,
    mark: Mark,
    me: Identity,
    key_text: str,
    options: InterceptOptions,
    session: str | None = None,
    now: datetime | None = None,
) -> MeshPlan:
    session = session or secrets.token_hex(4)
    now = now or now_utc()
    namespace = str(service["metadata"]["namespace"])
    name = str(service["metadata"]["name"])
    shadow = ShadowPodPlan.new(
        namespace,
        key_text,
        user=me.user,
        image=options.image or DEFAULT_SHADOW_IMAGE,
        session_id=session,
        now=now,
        port=agent_port(forwards),
    )
    lock = Lock.new(
        MESH_KIND,
        mode=mode.value,
        identity=me,
        session=session,
        now=now,
        heartbeat_seconds=options.heartbeat_seconds,
    )
    member = Member(lock, mark.value)
    original = _original_selector(service, view)
    serving: tuple[tuple[str, str], ...] = ()
    state: MeshState | None = None
    creates = False
    if mode == MeshMode.MANUAL:
        own = set(shadow.labels) | {MEMBER_LABEL}
        clash = sorted((set(original) | {mark.key}) & (own - {"app.kubernetes.io/name"}))
        if clash:
            raise UserError(
                f"--mode manual: the selector or mark of service {name} uses the label "
                f"{clash[0]}, which kvpn sets on its own pods"
            )
        serving = tuple(sorted({**original, mark.key: mark.value}.items()))
    else:
        creates = view.state is None
        state = view.state or new_mesh_state(name, mark.key, original, routed, now=now)
    pod = InterceptPodPlan(
        shadow, MESH_KIND, name, me.host, ((MEMBER_LABEL, session),), forwards, serving
    )
    return MeshPlan(namespace, name, mode, mark, member, pod, state, creates, tuple(routed))


async def run_mesh(
    options: InterceptOptions,
    target_name: str,
    expose: str,
    version_mark: str | None,
    mode_name: str,
    out: Out,
    stop: asyncio.Event,
) -> int:
    """Mesh a Service until ``stop``; leave (the last one restores); return the exit code."""
    try:
        mode = MeshMode(mode_name)
    except ValueError:
        raise UserError(f"--mode must be auto or manual, not {mode_name!r}") from None
    try:
        exposures = parse_expose(expose)
        mark = parse_mark(version_mark, mode)
    except (PortMatchError, MeshPlanError) as exc:
        raise UserError(str(exc)) from None
    name = _service_name(target_name)
    me = Identity.of_this_process()
    async with open_cluster(options, out) as (kube, namespace, configuration):
        await require_permissions(kube.api, mesh_permissions(namespace, mode), namespace=namespace)
        try:
            service = await read_settled(kube, namespace, name, out)
            view = read_mesh(name, annotations_of(service))
            checked = check_joinable(service, view, mode, mark, now=now_utc())
            if checked.key != mark.key:
                out(f"note: the router of service {name} routes on header {checked.key!r}")
            mark = checked
            ports = [ServicePort.from_spec(p) for p in service["spec"].get("ports") or []]
            valid = [p for p in ports if p is not None]
            container_ports = await _container_ports(
                kube, namespace, _original_selector(service, view)
            )
            match = match_exposures(f"{namespace}/{name}", valid, exposures, container_ports)
            routed = routed_ports(valid, container_ports)
        except PortMatchError as exc:
            raise UserError(str(exc)) from None
        except InterceptApiError as exc:
            raise UserError(str(exc)) from None
        if mode == MeshMode.AUTO and not any(p.protocol == "TCP" for p in routed):
            raise UserError(f"service {namespace}/{name}: no TCP port to route")
        await check_local_ports(exposures, options)
        key = new_session_key()
        plan = plan_mesh(
            service,
            view,
            match.forwards,
            routed,
            mode=mode,
            mark=mark,
            me=me,
            key_text=public_key_text(key),
            options=options,
        )
        for line in plan.describe():
            out(f"plan: {line}")
        urls = _curl_lines(plan, valid, container_ports)
        return await _mesh(kube, configuration, plan, key, options, out, stop, urls)


def _curl_lines(
    plan: MeshPlan, ports: list[ServicePort], container_ports: dict[PortKey, int]
) -> list[str]:
    header = shlex.quote(plan.mark.header_line())
    lines = []
    for forward in plan.forwards:
        port = next(
            (
                p.port
                for p in ports
                if p.protocol == "TCP" and p.resolve_target(container_ports) == forward.target_port
            ),
            forward.target_port,
        )
        lines.append(f"mesh: curl -H {header} http://{plan.service}.{plan.namespace}:{port}/")
    return lines


# --- the session -------------------------------------------------------------------------


async def _mesh(
    kube: KubeClients,
    configuration: Any,
    plan: MeshPlan,
    key: asyncssh.SSHKey,
    options: InterceptOptions,
    out: Out,
    stop: asyncio.Event,
    curl_lines: list[str],
) -> int:
    ns, name = plan.namespace, plan.service
    session = plan.member.session
    image = options.image or DEFAULT_SHADOW_IMAGE
    cluster = cluster_ref(options.kubeconfig, options.context)
    # Journaled (kvpn.change_journal) before each change, so kvpn clean can undo it after a
    # crash. Joining, the stand-in, the router pod and the selector switch share one undo:
    # leave the mesh (the last member out restores the Service and deletes the router).
    leave_undo = undo_leave_mesh(cluster, ns, name, session)
    undo = UndoStack(journal=open_session_journal(None, session, "mesh"))
    keeper = MemberKeeper(kube, ns, name, plan.member, out)

    async def leave_step() -> None:
        await keeper.stop()
        if not keeper.lost.is_set():
            await leave_mesh(kube, ns, name, keeper.member, out)

    exit_code = 0
    try:
        undo.push(f"join the mesh of service {ns}/{name}", leave_step, leave_undo)
        joined = await until_stopped(join(kube, plan, out), stop)
        if joined.mark != plan.mark:
            out(f"note: the router routes on header {joined.mark.key!r}; your mark uses it")
        plan = joined
        keeper.start(options.heartbeat_seconds)

        async def setup() -> InterceptLink:
            if plan.mode == MeshMode.AUTO:
                await ensure_router(
                    kube,
                    plan,
                    image,
                    out,
                    timeout=options.ready_timeout,
                    before_change=lambda what: undo.record(what, leave_undo),
                )
            pod = plan.pod.name
            undo.push(  # start_shadow pushes its own delete too; deleting twice is harmless
                f"create shadow pod {ns}/{pod}",
                lambda: kube.delete_pod(ns, pod),
                undo_delete_pod(cluster, ns, pod, session),
            )
            link = await start_shadow(kube, configuration, plan.pod, key, undo, out)
            if plan.mode == MeshMode.AUTO:
                manifest = member_service_manifest(ns, name, plan.member, plan.forwards)
                member_service = plan.member_service
                undo.push(
                    f"create member service {ns}/{member_service}",
                    lambda: kube.delete_service(ns, member_service),
                    undo_delete_member_service(cluster, ns, member_service, session),
                )
                await kube.create_service(ns, manifest)
            return link

        link = await until_stopped(setup(), stop)
        _announce(plan, out, curl_lines)
        facts = SessionFacts(
            "mesh",
            session,
            ns,
            name,
            mode=plan.mode.value,
            mark=plan.mark.header_line(),
            ports=tuple(f"{f.target_port} -> {LOCAL_HOST}:{f.local_port}" for f in plan.forwards),
        )
        exit_code = await supervise(
            link,
            keeper,
            stop,
            out,
            undo=undo,
            facts=facts,
            lost="this session's mesh membership was removed",
            verb="leaving",
        )
    except StoppedWhileStarting:
        out("stopped while starting")
    except (ShadowPodError, TunnelError, InterceptApiError, LockLost) as exc:
        out(f"kvpn: {exc}")
        exit_code = 1
    finally:
        out(f"leaving the mesh of service {ns}/{name}")
        exit_code = await finish_undo(undo, out, exit_code)
        if exit_code == 0:
            out(f"left the mesh of service {ns}/{name}")
    return exit_code


def _announce(plan: MeshPlan, out: Out, curl_lines: list[str]) -> None:
    ns, name = plan.namespace, plan.service
    ports = ", ".join(f"{f.target_port} -> {LOCAL_HOST}:{f.local_port}" for f in plan.forwards)
    header = plan.mark.header_line()
    if plan.mode == MeshMode.AUTO and plan.state is not None:
        out(
            f"meshed: requests to service {ns}/{name} with header {header!r} reach this machine "
            f"(port {ports}; router {ns}/{plan.state.router}, shadow {ns}/{plan.pod.name}); "
            "all others reach its pods; Ctrl-C leaves"
        )
    else:
        labels = ",".join(f"{k}={v}" for k, v in plan.pod.serving_labels)
        out(
            f"meshed (manual): shadow pod {ns}/{plan.pod.name} serves port {ports} with labels "
            f"{labels}; route {header!r} to it with your mesh, for example:"
        )
        port = plan.forwards[0].target_port if plan.forwards else 80
        for line in manual_example(ns, name, plan.mark, port).splitlines():
            out(f"  {line}")
    for line in curl_lines:
        out(line)


__all__ = ["mesh_permissions", "plan_mesh", "run_mesh"]
