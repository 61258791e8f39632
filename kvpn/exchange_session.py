"""``kvpn exchange``: all of a Service's traffic to a local port, always restored.

Theory of operation. Everything the session will change is planned first
(:mod:`kvpn.cluster.exchange_plan`) from what was read, and refused before any write if the
Service is held by someone else, the ports do not match, or nothing listens locally. Then,
each step registering its undo before it runs (undone newest first on Ctrl-C, SIGTERM, a
lost lock or any failure):

1. take the Service's lock (``kvpn.dev/lock``) and keep its heartbeat
   (:class:`kvpn.intercept_session.LockKeeper`);
2. create the shadow pod, wait for its agent, open the SSH tunnel and the remote forwards
   (:func:`kvpn.intercept_session.start_shadow`);
3. selector mode: replace the Service's selector with the shadow pod's unique label;
   scale mode: scale the Deployment to zero (the shadow pod carries the workload's labels);
   on undo the Deployment is scaled back and kvpn waits, bounded, until it is ready again.

A lost tunnel is not an end: the session reconnects, recreating the shadow pod if it is gone
(:func:`kvpn.intercept_session.supervise`); the Service keeps pointing at the pod's labels.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncssh

from kvpn.cli.errors import UserError
from kvpn.cluster.exchange_plan import (
    EXCHANGE_LABEL,
    ORIGINAL_REPLICAS_ANNOTATION,
    ExchangeMode,
    ExchangePlan,
    InterceptPodPlan,
    ScaleChange,
    SelectorChange,
    restore_service_ops,
    selector_of,
    selects,
    workload_labels,
)
from kvpn.cluster.intercept_api import (
    InterceptApiError,
    KubeClients,
    PatchRejected,
    wait_deployment_ready,
)
from kvpn.cluster.locks import Identity, Lock, LockVerdict, acquire_ops, judge_lock, read_lock
from kvpn.cluster.mesh_plan import mesh_refusal
from kvpn.cluster.permissions import exchange_permissions, require_permissions
from kvpn.cluster.service_ports import (
    PortForward,
    PortMatchError,
    ServicePort,
    container_ports_of,
    match_exposures,
    parse_expose,
)
from kvpn.cluster.shadow_pod import DEFAULT_SHADOW_IMAGE, ShadowPodError, ShadowPodPlan
from kvpn.intercept_session import (
    LOCAL_HOST,
    InterceptLink,
    InterceptOptions,
    LockKeeper,
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
    undo_delete_pod,
    undo_release_lock,
    undo_restore_service,
    undo_scale_back,
)
from kvpn.tunnel.errors import TunnelError
from kvpn.tunnel.keys import new_session_key, public_key_text
from kvpn.undo_stack import UndoStack

DEPLOYMENT_PREFIXES = ("deployment/", "deployments/", "deploy/", "deployment.apps/")
SERVICE_PREFIXES = ("service/", "services/", "svc/")


def _split_target(target: str) -> tuple[str, str]:
    lowered = target.lower()
    for prefix in DEPLOYMENT_PREFIXES:
        if lowered.startswith(prefix):
            return "deployment", target[len(prefix) :]
    for prefix in SERVICE_PREFIXES:
        if lowered.startswith(prefix):
            return "service", target[len(prefix) :]
    if "/" in target:
        raise UserError(f"{target!r}: name a service, svc/NAME or deployment/NAME")
    return "service", target


def _selector(obj: dict[str, Any]) -> dict[str, str]:
    return dict((obj.get("spec") or {}).get("selector") or {})


def _template(deployment: dict[str, Any]) -> dict[str, Any]:
    return ((deployment.get("spec") or {}).get("template")) or {}


def _template_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return dict((_template(deployment).get("metadata") or {}).get("labels") or {})


@dataclass(frozen=True)
class ExchangeTarget:
    service: dict[str, Any]
    deployment: dict[str, Any] | None

    @property
    def name(self) -> str:
        return str(self.service["metadata"]["name"])


async def find_target(
    kube: KubeClients, namespace: str, target: str, mode: ExchangeMode
) -> ExchangeTarget:
    """The Service (and the Deployment behind it, if any) that ``target`` names."""
    kind, name = _split_target(target)
    try:
        deployments = await kube.list_deployments(namespace)
    except InterceptApiError:
        if kind == "deployment" or mode == ExchangeMode.SCALE:
            raise
        deployments = []  # selector mode needs no deployment (named ports come from pods)
    if kind == "deployment":
        deployment = next((d for d in deployments if d["metadata"]["name"] == name), None)
        if deployment is None:
            raise UserError(f"deployment {namespace}/{name} not found")
        labels = _template_labels(deployment)
        services = [s for s in await kube.list_services(namespace) if selects(_selector(s), labels)]
        if not services:
            raise UserError(f"no service in {namespace} selects the pods of deployment {name}")
        if len(services) > 1:
            names = ", ".join(s["metadata"]["name"] for s in services)
            raise UserError(f"deployment {name} is behind several services ({names}): name one")
        return ExchangeTarget(services[0], deployment)
    service = await kube.read_service(namespace, name)
    if service is None:
        raise UserError(f"service {namespace}/{name} not found")
    selector = _selector(service)
    if not selector:
        raise UserError(
            f"service {namespace}/{name} has no selector (its endpoints are managed by hand): "
            "kvpn cannot redirect it"
        )
    behind = [d for d in deployments if selects(selector, _template_labels(d))]
    if mode == ExchangeMode.SCALE and len(behind) != 1:
        found = ", ".join(d["metadata"]["name"] for d in behind) or "none"
        raise UserError(
            f"--mode scale needs exactly one deployment behind service {name} (found: {found}); "
            "use --mode selector"
        )
    return ExchangeTarget(service, behind[0] if len(behind) == 1 else None)


async def _container_ports(
    kube: KubeClients, namespace: str, target: ExchangeTarget
) -> dict[tuple[str, str], int]:
    if target.deployment is not None:
        return container_ports_of(_template(target.deployment).get("spec"))
    selector = ",".join(f"{k}={v}" for k, v in _selector(target.service).items())
    for pod in await kube.list_pods(namespace, selector):
        ports = container_ports_of(pod.get("spec"))
        if ports:
            return ports
    return {}


def refuse_if_held(service: dict[str, Any], me: Identity, *, what: str = "service") -> None:
    """Refuse a Service someone holds, or that a dead session left changed."""
    meta = service.get("metadata") or {}
    label = f"{what} {meta.get('namespace')}/{meta.get('name')}"
    meshed = mesh_refusal(service, now_utc())  # kvpn mesh (issue 7)
    if meshed is not None:
        raise UserError(meshed)
    annotations = annotations_of(service)
    raw, lock = read_lock(annotations)
    now = now_utc()
    verdict = judge_lock(raw, lock, me=me, now=now)
    if verdict in (LockVerdict.OTHERS_LIVE, LockVerdict.MINE_LIVE) and lock is not None:
        raise UserError(f"{label} is already taken: {lock.describe(now)}")
    if verdict != LockVerdict.FREE or restore_service_ops(annotations).ops:
        held = lock.describe(now) if lock is not None else "unreadable or missing lock"
        raise UserError(
            f"{label} still carries the changes of a dead kvpn session ({held}): run "
            f"`kvpn clean` (your sessions) or `kvpn recover {meta.get('name')}` first"
        )


def plan_exchange(
    target: ExchangeTarget,
    forwards: tuple[PortForward, ...],
    *,
    namespace: str,
    mode: ExchangeMode,
    me: Identity,
    key_text: str,
    options: InterceptOptions,
    notes: tuple[str, ...] = (),
    session: str | None = None,
    now: datetime | None = None,
) -> ExchangePlan:
    session = session or secrets.token_hex(4)
    now = now or now_utc()
    shadow = ShadowPodPlan.new(
        namespace,
        key_text,
        user=me.user,
        image=options.image or DEFAULT_SHADOW_IMAGE,
        session_id=session,
        now=now,
        port=agent_port(forwards),
    )
    unique: tuple[tuple[str, str], ...] = ((EXCHANGE_LABEL, session),)
    lock = Lock.new(
        "exchange",
        mode=mode.value,
        identity=me,
        session=session,
        now=now,
        heartbeat_seconds=options.heartbeat_seconds,
    )
    selector_change = None
    scale = None
    serving: tuple[tuple[str, str], ...] = ()
    if mode == ExchangeMode.SELECTOR:
        selector_change = SelectorChange(selector_of(_selector(target.service)), unique)
    else:
        if target.deployment is None:  # find_target guarantees one in scale mode
            raise UserError("--mode scale needs a deployment behind the service")
        own = shadow.labels
        serving = tuple(
            (k, v) for k, v in workload_labels(_template_labels(target.deployment)) if k not in own
        )
        if not selects(_selector(target.service), {**dict(serving), **own}):
            raise UserError(
                f"--mode scale: the selector of service {target.name} uses a label kvpn sets on "
                "its own pods; use --mode selector"
            )
        replicas = (target.deployment.get("spec") or {}).get("replicas")
        scale = ScaleChange(
            target.deployment["metadata"]["name"],
            int(replicas) if isinstance(replicas, int) else 1,
            session,
        )
    pod = InterceptPodPlan(shadow, "exchange", target.name, me.host, unique, forwards, serving)
    return ExchangePlan(namespace, target.name, mode, lock, pod, selector_change, scale, notes)


async def run_exchange(
    options: InterceptOptions,
    target_name: str,
    expose: str,
    mode_name: str,
    out: Out,
    stop: asyncio.Event,
) -> int:
    """Exchange a Service until ``stop``; restore everything; return the exit code."""
    try:
        mode = ExchangeMode(mode_name)
        exposures = parse_expose(expose)
    except ValueError as exc:
        if isinstance(exc, PortMatchError):
            raise UserError(str(exc)) from None
        raise UserError(f"--mode must be selector or scale, not {mode_name!r}") from None
    me = Identity.of_this_process()
    async with open_cluster(options, out) as (kube, namespace, configuration):
        by_deployment = _split_target(target_name)[0] == "deployment"
        await require_permissions(
            kube.api,
            exchange_permissions(
                namespace, scale=mode == ExchangeMode.SCALE, by_deployment=by_deployment
            ),
            namespace=namespace,
        )
        try:
            target = await find_target(kube, namespace, target_name, mode)
            refuse_if_held(target.service, me)
            if mode == ExchangeMode.SCALE and target.deployment is not None:
                if ORIGINAL_REPLICAS_ANNOTATION in (annotations_of(target.deployment) or {}):
                    raise UserError(
                        f"deployment {target.deployment['metadata']['name']} is still scaled "
                        "down by a kvpn session: run `kvpn clean` or `kvpn recover` first"
                    )
            ports = [ServicePort.from_spec(p) for p in target.service["spec"].get("ports") or []]
            match = match_exposures(
                f"{namespace}/{target.name}",
                [p for p in ports if p is not None],
                exposures,
                await _container_ports(kube, namespace, target),
            )
        except PortMatchError as exc:
            raise UserError(str(exc)) from None
        except InterceptApiError as exc:
            raise UserError(str(exc)) from None
        await check_local_ports(exposures, options)
        key = new_session_key()
        plan = plan_exchange(
            target,
            match.forwards,
            namespace=namespace,
            mode=mode,
            me=me,
            key_text=public_key_text(key),
            options=options,
            notes=match.notes,
        )
        for line in plan.describe():
            out(f"plan: {line}")
        for note in plan.notes:
            out(f"note: {note}")
        return await _exchange(kube, configuration, plan, target, key, options, out, stop)


async def _exchange(
    kube: KubeClients,
    configuration: Any,
    plan: ExchangePlan,
    target: ExchangeTarget,
    key: asyncssh.SSHKey,
    options: InterceptOptions,
    out: Out,
    stop: asyncio.Event,
) -> int:
    ns, name = plan.namespace, plan.service
    session = plan.lock.session
    cluster = cluster_ref(options.kubeconfig, options.context)
    keeper = LockKeeper(kube, ns, name, plan.lock, out)
    # Journaled (kvpn.change_journal) before each change, so kvpn clean can undo it after
    # a crash.
    undo = UndoStack(journal=open_session_journal(None, session, "exchange"))
    undo.push(
        f"unlock service {name}", keeper.release, undo_release_lock(cluster, ns, name, session)
    )
    try:
        await kube.patch_service(
            ns,
            name,
            acquire_ops(
                annotations_of(target.service),
                target.service["metadata"]["resourceVersion"],
                plan.lock,
            ),
        )
    except BaseException as exc:
        undo.discard()
        await undo.run()
        if not isinstance(exc, PatchRejected):
            raise
        latest = await kube.read_service(ns, name)
        if latest is not None:
            refuse_if_held(latest, Identity(plan.lock.user, plan.lock.host))
        raise UserError(f"service {ns}/{name} changed while kvpn read it; try again") from None
    keeper.start(options.heartbeat_seconds)
    exit_code = 0

    async def setup() -> InterceptLink:
        pod = plan.pod.name
        undo.push(  # start_shadow pushes its own delete too; deleting twice is harmless
            f"delete shadow pod {pod}",
            lambda: kube.delete_pod(ns, pod),
            undo_delete_pod(cluster, ns, pod, session),
        )
        link = await start_shadow(kube, configuration, plan.pod, key, undo, out)
        if plan.selector is not None:
            selector = plan.selector
            undo.push(
                f"restore the selector of service {name}",
                lambda: keeper.patch(selector.undo_ops),
                undo_restore_service(cluster, ns, name, session),
            )
            await keeper.patch(selector.apply_ops)
        if plan.scale is not None:
            await _scale_down(kube, keeper, plan.scale, ns, undo, options, out, cluster, name)
        return link

    try:
        link = await until_stopped(setup(), stop)
        ports = ", ".join(f"{f.target_port} -> {LOCAL_HOST}:{f.local_port}" for f in plan.forwards)
        out(
            f"exchanged: service {ns}/{name} now reaches this machine (port {ports}; "
            f"mode {plan.mode.value}, shadow {ns}/{plan.pod.name}); Ctrl-C restores it"
        )
        facts = SessionFacts(
            "exchange",
            session,
            ns,
            name,
            mode=plan.mode.value,
            ports=tuple(f"{f.target_port} -> {LOCAL_HOST}:{f.local_port}" for f in plan.forwards),
        )
        exit_code = await supervise(link, keeper, stop, out, undo=undo, facts=facts)
    except StoppedWhileStarting:
        out("stopped while starting")
    except (ShadowPodError, TunnelError, InterceptApiError, LockLost) as exc:
        out(f"kvpn: {exc}")
        exit_code = 1
    finally:
        out(f"restoring service {ns}/{name}")
        exit_code = await finish_undo(undo, out, exit_code)
        if exit_code == 0:
            out(f"restored service {ns}/{name}")
    return exit_code


async def _scale_down(
    kube: KubeClients,
    keeper: LockKeeper,
    scale: ScaleChange,
    namespace: str,
    undo: UndoStack,
    options: InterceptOptions,
    out: Out,
    cluster: dict[str, str],
    service: str,
) -> None:
    undo.push(
        f"forget the scaled deployment on service {keeper.lock.session}",
        lambda: keeper.patch(scale.service_undo_ops),
        undo_restore_service(cluster, namespace, service, scale.session),
    )
    await keeper.patch(scale.service_apply_ops)
    deployment = await kube.read_deployment(namespace, scale.deployment)
    if deployment is None:
        raise InterceptApiError(f"deployment {namespace}/{scale.deployment} disappeared")

    async def scale_back() -> None:
        out(f"scaling deployment {scale.deployment} back to {scale.original_replicas}")
        await kube.patch_deployment(namespace, scale.deployment, scale.deployment_undo_ops())
        await wait_deployment_ready(
            kube,
            namespace,
            scale.deployment,
            scale.original_replicas,
            out,
            timeout=options.ready_timeout,
        )

    undo.push(
        f"scale deployment {scale.deployment} back",
        scale_back,
        undo_scale_back(
            cluster, namespace, scale.deployment, scale.session, scale.original_replicas
        ),
    )
    await kube.patch_deployment(
        namespace,
        scale.deployment,
        scale.deployment_apply_ops(
            deployment["metadata"]["resourceVersion"], annotations_of(deployment)
        ),
    )
    out(f"deployment {scale.deployment} scaled to 0 (was {scale.original_replicas})")
