"""Carrying out a change journal's undos from any process: the table of undo kinds.

Each kind (the ``kind`` of a :class:`kvpn.change_journal.Undo`) has a builder, used by the
sessions when they journal a change, and an executor, used by ``kvpn clean`` (and by
``kvpn connect --clean-leftovers``) on the journals of dead sessions. Every executor is
idempotent and careful: something already gone is fine ("already gone"); something that now
belongs to another session (a TUN of the same name that is not a TUN, a Service whose lock
names another session, a DNS journal with a live owner) is left alone ("skipped").

============== ===================================================================
kind            what the executor does
============== ===================================================================
delete_tun      delete the journaled routes, then the link, if it is a TUN device
restore_dns     :func:`kvpn.dns.session.recover_leftover_dns` on the DNS journal
remove_file     unlink a session or status file
delete_pod      delete the pod if its ``kvpn.dev/session`` label is the session's
restore_service undo what the Service's annotations record
                (:func:`kvpn.cluster.exchange_plan.restore_service_ops`) unless its lock
                names another session
release_lock    remove the Service's lock if it is the session's
scale_back      restore the Deployment's replica count if ``kvpn.dev/scaled-by`` is the
                session (not waiting for the pods)
delete_service  delete a preview Service whose lock is the session's
leave_mesh      remove the session's ``kvpn.dev/mesh-member.<session>`` from a meshed
                Service; if no other member is alive, restore the Service (selector,
                annotations) and delete the router pod, stand-in and member Services
                (:func:`kvpn.mesh_steps.leave_dead_session`); nothing if the session
                is no member
delete_member   delete a mesh member Service labelled with the session
============== ===================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Set
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from kvpn.change_journal import (
    ChangeJournal,
    JournalHeader,
    JournalVerdict,
    JudgedJournal,
    Place,
    ReplayPlan,
    ReplayStep,
    Undo,
    default_journal_dir,
    judge_journals,
    plan_replay,
    read_journals,
)
from kvpn.cluster.exchange_plan import (
    SCALED_BY_ANNOTATION,
    restore_deployment_ops,
    restore_service_ops,
)
from kvpn.cluster.intercept_api import InterceptApiError, KubeClients
from kvpn.cluster.locks import LOCK_ANNOTATION, annotation_path, read_lock
from kvpn.cluster.shadow_pod import MANAGED_BY_LABEL, SESSION_LABEL

__all__ = [
    "ReplayReport",
    "clean_journals",
    "judge_here",
    "offer_leftover_cleanup",
    "open_session_journal",
    "cluster_ref",
    "describe_leftovers",
    "replay",
    "retire_sessions",
    "undo_delete_pod",
    "undo_delete_service",
    "undo_delete_member_service",
    "undo_delete_tun",
    "undo_leave_mesh",
    "undo_release_lock",
    "undo_remove_file",
    "undo_restore_dns",
    "undo_restore_service",
    "undo_scale_back",
]

Out = Callable[[str], None]
CLUSTER_TIMEOUT = 30.0

UNDONE = "undone"
ALREADY_GONE = "already gone"


class ReplayError(Exception):
    """An undo could not be carried out; the journal entry stays for the next clean."""


class ClusterGone(Exception):
    """The kubeconfig file the journal names no longer exists: that cluster
    cannot be reached from here, now or later; its side is left to the cluster scan of
    ``kvpn clean`` (heartbeats and locks) run against it."""


# -- builders (used by the sessions) -------------------------------------------------------


def cluster_ref(kubeconfig: str | None, context: str | None) -> dict[str, str]:
    """How another process reaches the same cluster: the kubeconfig's absolute path (as
    this process resolved it) and the context's name (None: the file's current context,
    named now, so a later ``kubectl config use-context`` does not change the target)."""
    path = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    path = os.path.abspath(os.path.expanduser(path.split(os.pathsep)[0]))
    if context is None:
        from kubernetes import config as kube_config

        try:
            _, active = kube_config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
                config_file=path
            )
            context = str(active["name"])
        except Exception:  # unreadable here: the replay uses the current context
            context = ""
    return {"kubeconfig": path, "context": context}


def undo_delete_tun(name: str, routes: Iterable[IPv4Network | str]) -> Undo:
    return Undo("delete_tun", {"name": name, "routes": [str(r) for r in routes]})


def undo_restore_dns(dns_dir: Path, *, keep_state: bool = False) -> Undo:
    """Restore the DNS change journaled in *dns_dir*. ``keep_state``: also carry the DNS
    journal's content (the original files, a few KiB), because *dns_dir* is under ``/run``
    and a reboot empties it while an edited ``/etc/resolv.conf`` stays edited."""
    from kvpn.dns.os_config import STATE_FILE

    args: dict[str, Any] = {"dir": str(dns_dir)}
    if keep_state:
        with contextlib.suppress(OSError):
            args["state"] = (dns_dir / STATE_FILE).read_text()
            args["boot"] = Place.here().boot
    return Undo("restore_dns", args)


def undo_remove_file(path: Path) -> Undo:
    return Undo("remove_file", {"path": str(path)})


def _cluster_undo(kind: str, cluster: Mapping[str, str], **args: object) -> Undo:
    return Undo(kind, {"cluster": dict(cluster), **args})


def undo_delete_pod(cluster: Mapping[str, str], namespace: str, name: str, session: str) -> Undo:
    return _cluster_undo("delete_pod", cluster, namespace=namespace, name=name, session=session)


def undo_restore_service(
    cluster: Mapping[str, str], namespace: str, name: str, session: str
) -> Undo:
    return _cluster_undo(
        "restore_service", cluster, namespace=namespace, name=name, session=session
    )


def undo_release_lock(cluster: Mapping[str, str], namespace: str, name: str, session: str) -> Undo:
    return _cluster_undo("release_lock", cluster, namespace=namespace, name=name, session=session)


def undo_scale_back(
    cluster: Mapping[str, str], namespace: str, name: str, session: str, replicas: int
) -> Undo:
    return _cluster_undo(
        "scale_back", cluster, namespace=namespace, name=name, session=session, replicas=replicas
    )


def undo_delete_service(
    cluster: Mapping[str, str], namespace: str, name: str, session: str
) -> Undo:
    return _cluster_undo("delete_service", cluster, namespace=namespace, name=name, session=session)


def undo_leave_mesh(cluster: Mapping[str, str], namespace: str, name: str, session: str) -> Undo:
    """Leave the mesh of Service *name* as :func:`kvpn.mesh_steps.leave_mesh` would (the
    member annotation; the router pod, stand-in Service and selector switch if last)."""
    return _cluster_undo("leave_mesh", cluster, namespace=namespace, name=name, session=session)


def undo_delete_member_service(
    cluster: Mapping[str, str], namespace: str, name: str, session: str
) -> Undo:
    return _cluster_undo("delete_member", cluster, namespace=namespace, name=name, session=session)


# -- executors -----------------------------------------------------------------------------


@dataclass
class ReplayContext:
    """Clients for the clusters the journals name, made once each."""

    clients: dict[tuple[str, str], KubeClients] = field(default_factory=dict)

    async def kube(self, args: Mapping[str, Any]) -> KubeClients:
        ref = args.get("cluster")
        if not isinstance(ref, dict):
            raise ReplayError("the journal names no cluster")
        key = (str(ref.get("kubeconfig") or ""), str(ref.get("context") or ""))
        if key not in self.clients:
            from kvpn.cli.errors import UserError
            from kvpn.connect_session import ConnectOptions, load_cluster

            if key[0] and not os.path.exists(key[0]):
                raise ClusterGone(f"its kubeconfig {key[0]} no longer exists")
            try:
                configuration, _, _ = await asyncio.to_thread(
                    load_cluster,
                    ConnectOptions(kubeconfig=key[0] or None, context=key[1] or None),
                )
            except UserError as exc:
                raise ReplayError(str(exc)) from None
            configuration.retries = False
            self.clients[key] = KubeClients.from_configuration(configuration)
        return self.clients[key]

    def close(self) -> None:
        for clients in self.clients.values():
            clients.close()
        self.clients.clear()


def _text(args: Mapping[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise ReplayError(f"the journal entry has no {key}")
    return value


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _annotations(obj: Mapping[str, Any]) -> dict[str, str]:
    raw = _meta(obj).get("annotations")
    return {k: v for k, v in raw.items() if isinstance(v, str)} if isinstance(raw, dict) else {}


async def _delete_tun(args: Mapping[str, Any], ctx: ReplayContext) -> str:
    from pyroute2 import AsyncIPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    name = _text(args, "name")
    ipr = AsyncIPRoute()
    try:
        found = await ipr.link_lookup(ifname=name)
        if not found:
            return ALREADY_GONE  # a TUN vanishes with its process's descriptor
        links = await ipr.link("get", index=found[0])
        kind = links[0].get(("linkinfo", "kind")) if links else None
        if kind != "tun":
            return f"skipped: {name} is not a TUN device now ({kind or 'no kind'})"
        for text in args.get("routes") or []:
            network = IPv4Network(str(text), strict=False)
            with contextlib.suppress(NetlinkError):
                await ipr.route(
                    "del",
                    dst=str(network.network_address),
                    dst_len=network.prefixlen,
                    oif=found[0],
                )
        await ipr.link("del", index=found[0])
        return UNDONE
    except NetlinkError as exc:
        raise ReplayError(f"cannot delete link {name}: {exc}") from None
    finally:
        ipr.close()


async def _restore_dns(args: Mapping[str, Any], ctx: ReplayContext) -> str:
    from kvpn.dns.os_config import STATE_FILE
    from kvpn.dns.session import LeftoverKind, recover_leftover_dns

    dns_dir = Path(_text(args, "dir"))
    state, boot = args.get("state"), args.get("boot")
    if (
        isinstance(state, str)
        and isinstance(boot, str)
        and boot != Place.here().boot
        and not (dns_dir / STATE_FILE).exists()
    ):
        # After a reboot (only then: in the same boot a missing record means restored) the
        # DNS journal under /run is gone: put it back from the copy and restore from it.
        dns_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(dns_dir / STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(state)
    leftover = await asyncio.to_thread(recover_leftover_dns, dns_dir)
    if leftover.kind == LeftoverKind.NONE:
        return ALREADY_GONE
    if leftover.kind == LeftoverKind.LIVE_OWNER:
        return f"skipped: {leftover.describe()[0]}"
    if leftover.kind == LeftoverKind.RESTORE_FAILED:
        raise ReplayError("; ".join(leftover.describe()))
    return UNDONE


async def _remove_file(args: Mapping[str, Any], ctx: ReplayContext) -> str:
    try:
        Path(_text(args, "path")).unlink()
    except FileNotFoundError:
        return ALREADY_GONE
    except OSError as exc:
        raise ReplayError(str(exc)) from None
    return UNDONE


async def _delete_pod(args: Mapping[str, Any], ctx: ReplayContext) -> str:
    from kubernetes.client.exceptions import ApiException

    kube = await ctx.kube(args)
    namespace, name, session = (_text(args, k) for k in ("namespace", "name", "session"))
    try:
        pod = kube.to_dict(await asyncio.to_thread(kube.core.read_namespaced_pod, name, namespace))
    except ApiException as exc:
        if exc.status == 404:
            return ALREADY_GONE
        raise ReplayError(
            f"cannot read pod {namespace}/{name}: {exc.status} {exc.reason}"
        ) from None
    labels = _meta(pod).get("labels") or {}
    if labels.get(SESSION_LABEL) != session or labels.get(MANAGED_BY_LABEL) != "kvpn":
        return f"skipped: pod {namespace}/{name} is not session {session}'s"
    if _meta(pod).get("deletionTimestamp"):
        return ALREADY_GONE
    deleted = await kube.delete_pod(namespace, name, uid=_meta(pod).get("uid") or None)
    return UNDONE if deleted else ALREADY_GONE


async def _read_service(kube: KubeClients, args: Mapping[str, Any]) -> tuple[Any, str, str, str]:
    namespace, name, session = (_text(args, k) for k in ("namespace", "name", "session"))
    return await kube.read_service(namespace, name), namespace, name, session


async def _restore_service(args: Mapping[str, Any], ctx: ReplayContext) -> str:
    kube = await ctx.kube(args)
    service, namespace, name, session = await _read_service(kube, args)
    if service is None:
        return ALREADY_GONE
    annotations = _annotations(service)
    raw, lock = read_lock(annotations)
    if raw is not None and (lock is None or lock.session != session):
        holder = f"session {lock.session}" if lock else "an unreadable lock"
        return f"skipped: service {namespace}/{name} is now held by {holder}"
    restore = restore_service_ops(annotations)
    if restore.problems:
        raise ReplayError(f"service {namespace}/{name}: " + "; ".join(restore.problems))
    if not restore.ops:
        return ALREADY_GONE
    await kube.patch_service(namespace, name, list(restore.ops))
    return UNDONE


async def _release_lock(args: Mapping[str, Any], ctx: ReplayContext) -> str:
    kube = await ctx.kube(args)
    service, namespace, name, session = await _read_service(kube, args)
    if service is None:
        return ALREADY_GONE
    raw, lock = read_lock(_annotations(service))
    if raw is None or lock is None or lock.session != session:
        return ALREADY_GONE
    path = annotation_path(LOCK_ANNOTATION)
    await kube.patch_service(
        namespace,
        name,
        [{"op": "test", "path": path, "value": raw}, {"op": "remove", "path": path}],
    )
    return UNDONE


async def _scale_back(args: Mapping[str, Any], ctx: ReplayContext) -> str:
    kube = await ctx.kube(args)
    namespace, name, session = (_text(args, k) for k in ("namespace", "name", "session"))
    deployment = await kube.read_deployment(namespace, name)
    if deployment is None:
        return ALREADY_GONE
    annotations = _annotations(deployment)
    by = annotations.get(SCALED_BY_ANNOTATION)
    if by is None:
        return ALREADY_GONE
    if by != session:
        return f"skipped: deployment {namespace}/{name} is scaled down by session {by}"
    ops = restore_deployment_ops(annotations)
    if ops is None:
        raise ReplayError(f"deployment {namespace}/{name} records no replica count")
    await kube.patch_deployment(namespace, name, ops)
    return UNDONE


async def _delete_service(args: Mapping[str, Any], ctx: ReplayContext) -> str:
    kube = await ctx.kube(args)
    service, namespace, name, session = await _read_service(kube, args)
    if service is None:
        return ALREADY_GONE
    _, lock = read_lock(_annotations(service))
    labels = _meta(service).get("labels") or {}
    if lock is None or lock.session != session or labels.get(MANAGED_BY_LABEL) != "kvpn":
        return f"skipped: service {namespace}/{name} is not session {session}'s preview"
    return await _delete_read_service(kube, service, namespace, name)


async def _leave_mesh(args: Mapping[str, Any], ctx: ReplayContext) -> str:
    from kvpn.mesh_steps import leave_dead_session

    kube = await ctx.kube(args)
    namespace, name, session = (_text(args, k) for k in ("namespace", "name", "session"))
    changed = await leave_dead_session(kube, namespace, name, session, lambda line: None)
    return UNDONE if changed else ALREADY_GONE


async def _delete_member(args: Mapping[str, Any], ctx: ReplayContext) -> str:
    from kvpn.cluster.mesh_plan import MESH_SERVICE_LABEL

    kube = await ctx.kube(args)
    service, namespace, name, session = await _read_service(kube, args)
    if service is None:
        return ALREADY_GONE
    labels = _meta(service).get("labels") or {}
    if (
        labels.get(SESSION_LABEL) != session
        or labels.get(MANAGED_BY_LABEL) != "kvpn"
        or MESH_SERVICE_LABEL not in labels
    ):
        return f"skipped: service {namespace}/{name} is not session {session}'s mesh member"
    return await _delete_read_service(kube, service, namespace, name)


async def _delete_read_service(kube: KubeClients, service: Any, namespace: str, name: str) -> str:
    """Delete the Service just read and checked - that one only (uid precondition)."""
    deleted = await kube.delete_service(namespace, name, uid=_meta(service).get("uid") or None)
    return UNDONE if deleted else ALREADY_GONE


Executor = Callable[[Mapping[str, Any], ReplayContext], Awaitable[str]]
EXECUTORS: Mapping[str, Executor] = {
    "delete_tun": _delete_tun,
    "restore_dns": _restore_dns,
    "remove_file": _remove_file,
    "delete_pod": _delete_pod,
    "restore_service": _restore_service,
    "release_lock": _release_lock,
    "scale_back": _scale_back,
    "delete_service": _delete_service,
    "leave_mesh": _leave_mesh,
    "delete_member": _delete_member,
}


# -- replaying a plan ------------------------------------------------------------------------


@dataclass
class ReplayReport:
    steps: int = 0  # undos planned (dry run: that would run)
    undone: int = 0
    problems: list[str] = field(default_factory=list)


def _append_done(path: Path, n: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        os.write(fd, (json.dumps({"done": n}) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


async def _run_step(step: ReplayStep, ctx: ReplayContext) -> str:
    if step.skip:
        return f"skipped: {step.skip}"
    executor = EXECUTORS.get(step.entry.undo.kind)
    if executor is None:
        raise ReplayError(f"unknown undo kind {step.entry.undo.kind!r} (a newer kvpn's?)")
    try:
        return await asyncio.wait_for(executor(step.entry.undo.args, ctx), CLUSTER_TIMEOUT)
    except ClusterGone as exc:
        return f"skipped: {exc}"
    except TimeoutError:
        raise ReplayError(f"no answer within {CLUSTER_TIMEOUT:g}s") from None
    except InterceptApiError as exc:
        raise ReplayError(str(exc)) from None


async def replay(judged: list[JudgedJournal], out: Out, *, dry_run: bool) -> ReplayReport:
    """Undo what the dead sessions' journals hold, newest first; print each step."""
    plan: ReplayPlan = plan_replay(judged)
    report = ReplayReport(steps=len(plan.steps))
    for note in plan.notes:
        out(f"note: {note}")
    if dry_run:
        for line in plan.describe():
            out(f"would undo: {line}")
        for j in plan.journals:
            if not j.contents.pending():
                out(f"would remove the finished journal of {j.describe()}")
        return report
    ctx = ReplayContext()
    failed: set[Path] = set()
    try:
        for step in plan.steps:
            what = f"{step.entry.what} (session {step.session})"
            try:
                outcome = await _run_step(step, ctx)
            except (ReplayError, OSError, ValueError) as exc:
                report.problems.append(f"{what}: {exc}")
                failed.add(step.journal)
                continue
            out(f"{outcome}: {what}" if outcome in (UNDONE, ALREADY_GONE) else f"{what}: {outcome}")
            report.undone += outcome == UNDONE
            with contextlib.suppress(OSError):
                _append_done(step.journal, step.entry.n)
    finally:
        ctx.close()
    for j in plan.journals:
        if j.contents.path not in failed:
            with contextlib.suppress(FileNotFoundError):
                j.contents.path.unlink()
    return report


def describe_leftovers(judged: Iterable[JudgedJournal]) -> list[str]:
    """One line per dead session with something left, and what is left."""
    lines = []
    for j in judged:
        if j.verdict != JournalVerdict.DEAD:
            continue
        pending = j.contents.pending()
        lines.append(
            f"{j.describe()} is no longer running and left {len(pending)} change(s): "
            + "; ".join(e.what for e in pending)
        )
    return lines


# -- entry points for the sessions and for kvpn clean ---------------------------------------


def open_session_journal(directory: Path | None, session: str, command: str) -> ChangeJournal:
    """The journal a session writes its changes to (user: the one locks and pods name)."""
    from kvpn.cli.errors import UserError
    from kvpn.cluster.locks import Identity

    directory = directory or default_journal_dir()
    header = JournalHeader.for_this_process(session, command, Identity.of_this_process().user)
    try:
        return ChangeJournal.create(directory, header)
    except OSError as exc:
        raise UserError(f"cannot write the change journal in {directory}: {exc}") from None


def judge_here(directory: Path | None) -> list[JudgedJournal]:
    """This machine's journals, judged from this process (user, network namespace)."""
    from kvpn.cluster.locks import Identity

    return judge_journals(
        read_journals(directory or default_journal_dir()),
        user=Identity.of_this_process().user,
        here=Place.here(),
    )


async def clean_journals(directory: Path | None, out: Out, *, dry_run: bool) -> ReplayReport:
    """``kvpn clean``'s local part: replay every dead session's journal (this user's, made in
    this network namespace); a journal directory we may not read is said, not an error."""
    directory = directory or default_journal_dir()
    if directory.exists() and not os.access(directory, os.R_OK | os.X_OK):
        out(f"note: cannot read the change journals in {directory} (run kvpn clean as root)")
        return ReplayReport()
    return await replay(judge_here(directory), out, dry_run=dry_run)


def _ask(question: str) -> bool:
    try:
        answer = input(question)
    except EOFError:
        return False
    return answer.strip().lower() in ("", "y", "yes")


async def offer_leftover_cleanup(
    directory: Path | None, out: Out, *, clean: bool | None, interactive: bool | None = None
) -> None:
    """At the start of ``kvpn connect``: say what dead sessions left; clean it when asked to
    (``clean=True``, or yes at the prompt when stdin is a terminal), else say how."""
    judged = judge_here(directory)
    lines = describe_leftovers(judged)
    if not lines:
        return
    for line in lines:
        out(f"kvpn: {line}")
    if interactive is None:
        interactive = sys.stdin.isatty()
    if clean is None and interactive:
        clean = await asyncio.to_thread(_ask, "clean them up now? [Y/n] ")
    if not clean:
        out("note: run `kvpn clean` to undo them (or connect with --clean-leftovers)")
        return
    report = await replay(judged, out, dry_run=False)
    for problem in report.problems:
        out(f"kvpn: could not undo: {problem}")


async def retire_sessions(directory: Path | None, sessions: Set[str], out: Out) -> ReplayReport:
    """After ``kvpn recover`` undid dead sessions' changes from the cluster's annotations:
    replay what this machine's journals of those sessions still hold (each step then finds
    its change already gone), so the journals go too."""
    judged = [
        j
        for j in judge_here(directory)
        if j.contents.session in sessions
        and j.verdict in (JournalVerdict.DEAD, JournalVerdict.FINISHED)
    ]
    return await replay(judged, out, dry_run=False) if judged else ReplayReport()
