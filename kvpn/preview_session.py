"""``kvpn preview``: a local process published as a new Service, removed on exit.

The Service is created first and carries this session's lock (``kvpn.dev/lock``, kind
``preview``) with its heartbeat, so ``kvpn clean`` can tell a dead preview from a live one;
then the shadow pod behind it (selected by ``kvpn.dev/preview=<session>``) forwards each
connection to the local port. A lost tunnel is reconnected (the pod recreated if it is gone:
:func:`kvpn.intercept_session.supervise`); only Ctrl-C, SIGTERM or a lost lock remove it.
"""

from __future__ import annotations

import asyncio
import secrets
from datetime import datetime
from typing import Any

import asyncssh

from kvpn.cli.errors import UserError
from kvpn.cluster.exchange_plan import PREVIEW_LABEL, InterceptPodPlan, PreviewPlan
from kvpn.cluster.intercept_api import InterceptApiError, KubeClients
from kvpn.cluster.locks import Identity, Lock, read_lock
from kvpn.cluster.permissions import preview_permissions, require_permissions
from kvpn.cluster.service_ports import Exposure, PortMatchError, parse_expose, preview_forwards
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
    undo_delete_service,
)
from kvpn.tunnel.errors import TunnelError
from kvpn.tunnel.keys import new_session_key, public_key_text
from kvpn.undo_stack import UndoStack


def plan_preview(
    namespace: str,
    name: str,
    exposures: tuple[Exposure, ...],
    *,
    external: bool,
    me: Identity,
    key_text: str,
    options: InterceptOptions,
    session: str | None = None,
    now: datetime | None = None,
) -> PreviewPlan:
    session = session or secrets.token_hex(4)
    now = now or now_utc()
    forwards = preview_forwards(exposures)
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
        "preview",
        mode="",
        identity=me,
        session=session,
        now=now,
        heartbeat_seconds=options.heartbeat_seconds,
    )
    pod = InterceptPodPlan(shadow, "preview", name, me.host, ((PREVIEW_LABEL, session),), forwards)
    return PreviewPlan(namespace, name, lock, pod, external)


async def run_preview(
    options: InterceptOptions, name: str, expose: str, external: bool, out: Out, stop: asyncio.Event
) -> int:
    """Publish local ports as a new Service until ``stop``; then remove it."""
    try:
        exposures = parse_expose(expose)
    except PortMatchError as exc:
        raise UserError(str(exc)) from None
    me = Identity.of_this_process()
    await check_local_ports(exposures, options)
    async with open_cluster(options, out) as (kube, namespace, configuration):
        await require_permissions(kube.api, preview_permissions(namespace), namespace=namespace)
        try:
            existing = await kube.read_service(namespace, name)
        except InterceptApiError as exc:
            raise UserError(str(exc)) from None
        if existing is not None:
            raw, lock = read_lock(annotations_of(existing))
            whose = f" ({lock.describe(now_utc())})" if lock is not None else ""
            raise UserError(f"service {namespace}/{name} already exists{whose}")
        key = new_session_key()
        plan = plan_preview(
            namespace,
            name,
            exposures,
            external=external,
            me=me,
            key_text=public_key_text(key),
            options=options,
        )
        for line in plan.describe():
            out(f"plan: {line}")
        return await _preview(kube, configuration, plan, key, options, out, stop)


async def _preview(
    kube: KubeClients,
    configuration: Any,
    plan: PreviewPlan,
    key: asyncssh.SSHKey,
    options: InterceptOptions,
    out: Out,
    stop: asyncio.Event,
) -> int:
    ns, name = plan.namespace, plan.name
    session = plan.lock.session
    cluster = cluster_ref(options.kubeconfig, options.context)
    keeper = LockKeeper(kube, ns, name, plan.lock, out)
    # Journaled (kvpn.change_journal) before each change, so kvpn clean can undo it after
    # a crash.
    undo = UndoStack(journal=open_session_journal(None, session, "preview"))

    async def delete_service() -> None:
        await keeper.stop()
        if not keeper.lost.is_set():
            await kube.delete_service(ns, name)

    undo.push(
        f"delete service {name}", delete_service, undo_delete_service(cluster, ns, name, session)
    )
    try:
        created = await kube.create_service(ns, plan.service_manifest())
    except BaseException as exc:
        undo.discard()
        await undo.run()
        if isinstance(exc, InterceptApiError):
            raise UserError(str(exc)) from None
        raise
    keeper.start(options.heartbeat_seconds)
    exit_code = 0

    async def setup() -> InterceptLink:
        pod = plan.pod.name
        undo.push(  # start_shadow pushes its own delete too; deleting twice is harmless
            f"delete shadow pod {pod}",
            lambda: kube.delete_pod(ns, pod),
            undo_delete_pod(cluster, ns, pod, session),
        )
        return await start_shadow(kube, configuration, plan.pod, key, undo, out)

    try:
        link = await until_stopped(setup(), stop)
        ip = (created.get("spec") or {}).get("clusterIP") or "?"
        ports = ", ".join(
            f"{f.target_port} -> {LOCAL_HOST}:{f.local_port}" for f in plan.pod.forwards
        )
        kind = "LoadBalancer" if plan.external else "ClusterIP"
        out(f"preview: service {ns}/{name} ({kind} {ip}) port {ports}; Ctrl-C removes it")
        facts = SessionFacts(
            "preview",
            session,
            ns,
            name,
            mode=kind,
            ports=tuple(
                f"{f.target_port} -> {LOCAL_HOST}:{f.local_port}" for f in plan.pod.forwards
            ),
        )
        exit_code = await supervise(link, keeper, stop, out, undo=undo, facts=facts)
    except StoppedWhileStarting:
        out("stopped while starting")
    except (ShadowPodError, TunnelError, InterceptApiError, LockLost) as exc:
        out(f"kvpn: {exc}")
        exit_code = 1
    finally:
        out(f"removing preview {ns}/{name}")
        exit_code = await finish_undo(undo, out, exit_code)
    return exit_code
