"""Pure planners for Deployments (-> ReplicaSets) and ReplicaSets (-> Pods).

Theory of operation
-------------------
A Deployment owns one ReplicaSet per pod template. The *new* ReplicaSet is the one whose
template equals the Deployment's (ignoring the ``pod-template-hash`` label); it is named
``<deployment>-<hash>`` where the hash is a stable FNV-32a of the template rendered with the
same safe alphabet Kubernetes uses. A rolling update (the default strategy) alternates two
moves, one per pass, as ``pkg/controller/deployment/rolling.go`` does: scale the new
ReplicaSet up while the total stays within ``replicas + maxSurge``, and scale old ReplicaSets
down (unhealthy replicas first, then the oldest sets) while at least
``replicas - maxUnavailable`` pods stay available. ``Recreate`` scales the old sets to zero and
creates the new one only once their pods are gone.

A ReplicaSet keeps ``spec.replicas`` *active* pods (not being deleted, not Succeeded/Failed):
it creates pods from its template (``generateName: <rs>-``) and deletes the surplus,
preferring unscheduled, pending, not-ready and newer pods, like ``ActivePodsWithRanks``. It
adopts orphan pods its selector matches and releases owned pods it no longer matches.

Both write ``status`` through the status subresource, only when it changed.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
from collections.abc import Sequence
from typing import Any

from sandbox.apiserver.resources import DEPLOYMENTS, PODS, REPLICASETS, ResourceType
from sandbox.apiserver.selectors import NOTHING, LabelSelector, selector_from_object
from sandbox.apiserver.store import Obj, StoreError
from sandbox.controller_actions import (
    Action,
    CreateObject,
    DeleteObject,
    UpdateObject,
    controller_uid,
    is_deleting,
    labels_of,
    meta,
    owner_reference,
    parse_time,
    pod_condition,
    pod_is_available,
    pod_is_ready,
    set_condition,
)

POD_TEMPLATE_HASH = "pod-template-hash"
REVISION = "deployment.kubernetes.io/revision"
_SAFE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apimachinery/pkg/util/rand
MAX_BURST = 500  # pods created per ReplicaSet per pass, as the real controller's burst limit


# -- small helpers ------------------------------------------------------------------------


def _selector(obj: object) -> LabelSelector:
    if not isinstance(obj, dict):
        return NOTHING
    try:
        return selector_from_object(obj)
    except StoreError:
        return NOTHING


def _count(value: object, default: int = 0) -> int:
    return (
        value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default
    )


def spec_replicas(obj: Obj) -> int:
    return _count(obj.get("spec", {}).get("replicas"), 1)


def _status_count(obj: Obj, key: str) -> int:
    return _count((obj.get("status") or {}).get(key))


def _created(obj: Obj) -> float:
    when = parse_time(meta(obj).get("creationTimestamp"))
    return when.timestamp() if when else 0.0


def _fnv32a(data: bytes) -> int:
    h = 0x811C9DC5
    for byte in data:
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def _without_hash_label(template: Obj) -> Obj:
    out = copy.deepcopy(template)
    labels = (out.get("metadata") or {}).get("labels")
    if isinstance(labels, dict):
        labels.pop(POD_TEMPLATE_HASH, None)
    return out


def pod_template_hash(template: Obj, collision_count: int = 0) -> str:
    """Stable short hash of a pod template, in Kubernetes' safe alphabet (e.g. ``7c5ddbdf54``)."""
    text = json.dumps(_without_hash_label(template), sort_keys=True, separators=(",", ":"))
    if collision_count:
        text += str(collision_count)
    return "".join(
        _SAFE_ALPHABET[ord(c) % len(_SAFE_ALPHABET)] for c in str(_fnv32a(text.encode()))
    )


def _int_or_percent(value: object, total: int, *, round_up: bool, default: str) -> int:
    if isinstance(value, bool) or value is None:
        value = default
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, str):
        text = value.strip()
        try:
            if text.endswith("%"):
                scaled = int(text[:-1]) * total / 100
                return max(math.ceil(scaled) if round_up else math.floor(scaled), 0)
            return max(int(text), 0)
        except ValueError:
            pass
    return _int_or_percent(default, total, round_up=round_up, default="25%")


def rolling_limits(deployment: Obj) -> tuple[int, int]:
    """(maxSurge, maxUnavailable) resolved against spec.replicas; Recreate -> (0, 0)."""
    spec = deployment.get("spec", {})
    strategy = spec.get("strategy") or {}
    desired = spec_replicas(deployment)
    if strategy.get("type") == "Recreate":
        return 0, 0
    rolling = strategy.get("rollingUpdate") or {}
    surge = _int_or_percent(rolling.get("maxSurge"), desired, round_up=True, default="25%")
    unavailable = _int_or_percent(
        rolling.get("maxUnavailable"), desired, round_up=False, default="25%"
    )
    if surge == 0 and unavailable == 0:
        unavailable = 1
    return surge, min(unavailable, desired)


def _revision(rs: Obj) -> int:
    try:
        return int((meta(rs).get("annotations") or {}).get(REVISION, "0"))
    except ValueError:
        return 0


def _wanted_revision(new_rs: Obj, max_old_revision: int) -> int:
    """The current template's set carries the highest revision (a rollback bumps it)."""
    own = _revision(new_rs)
    return own if own > max_old_revision else max_old_revision + 1


def _adopt(obj: Obj, owner: Obj, kind: str, resource: ResourceType) -> UpdateObject:
    adopted = copy.deepcopy(obj)
    refs = adopted["metadata"].setdefault("ownerReferences", [])
    refs.append(owner_reference(owner, "apps/v1", kind))
    return UpdateObject(resource, meta(obj).get("namespace"), meta(obj)["name"], adopted)


def _status_update(resource: ResourceType, obj: Obj, status: Obj) -> UpdateObject | None:
    if obj.get("status") == status:
        return None
    updated = copy.deepcopy(obj)
    updated["status"] = status
    # Only controllers write these statuses: no optimistic lock, so a scale in the same pass
    # does not make the status write conflict.
    updated["metadata"].pop("resourceVersion", None)
    return UpdateObject(resource, meta(obj).get("namespace"), meta(obj)["name"], updated, "status")


def _nonzero(**counts: int) -> Obj:
    return {k: v for k, v in counts.items() if v}


# -- Deployment -> ReplicaSets ------------------------------------------------------------


def _new_replicaset(dep: Obj, template_hash: str, replicas: int, revision: int) -> Obj:
    dmeta = meta(dep)
    spec = dep.get("spec", {})
    template = copy.deepcopy(spec.get("template") or {})
    tmeta = template.setdefault("metadata", {})
    labels = dict(tmeta.get("labels") or {})
    labels[POD_TEMPLATE_HASH] = template_hash
    tmeta["labels"] = labels
    selector = copy.deepcopy(spec.get("selector") or {})
    selector["matchLabels"] = {
        **(selector.get("matchLabels") or {}),
        POD_TEMPLATE_HASH: template_hash,
    }
    rs_spec: Obj = {"replicas": replicas, "selector": selector, "template": template}
    if spec.get("minReadySeconds"):
        rs_spec["minReadySeconds"] = spec["minReadySeconds"]
    return {
        "metadata": {
            "name": f"{dmeta['name']}-{template_hash}",
            "namespace": dmeta.get("namespace"),
            "labels": dict(labels),
            "annotations": {REVISION: str(revision)},
            "ownerReferences": [owner_reference(dep, "apps/v1", "Deployment")],
        },
        "spec": rs_spec,
    }


def _find_new_replicaset(owned: Sequence[Obj], template: Obj, template_hash: str) -> Obj | None:
    wanted = _without_hash_label(template)
    for rs in owned:
        if _without_hash_label(rs.get("spec", {}).get("template") or {}) == wanted:
            return rs
    # The API may have defaulted fields of the stored template: fall back to the hash label.
    for rs in owned:
        if labels_of(rs).get(POD_TEMPLATE_HASH) == template_hash:
            return rs
    return None


def _scale_old_down(
    old: Sequence[Obj], all_sets: Sequence[Obj], new_rs: Obj, desired: int, max_unavailable: int
) -> dict[str, int]:
    """New ``spec.replicas`` for old sets, as ``reconcileOldReplicaSets`` computes them."""
    targets = {meta(rs)["name"]: spec_replicas(rs) for rs in old}
    min_available = desired - max_unavailable
    new_unavailable = spec_replicas(new_rs) - _status_count(new_rs, "availableReplicas")
    budget = sum(spec_replicas(rs) for rs in all_sets) - min_available - new_unavailable
    if budget <= 0:
        return targets
    for rs in old:  # first the replicas that are not available anyway
        name = meta(rs)["name"]
        unhealthy = targets[name] - _status_count(rs, "availableReplicas")
        if budget <= 0 or unhealthy <= 0:
            continue
        cut = min(budget, unhealthy)
        targets[name] -= cut
        budget -= cut
    available = sum(_status_count(rs, "availableReplicas") for rs in all_sets)
    remaining = available - min_available
    for rs in old:  # then healthy ones, oldest set first
        name = meta(rs)["name"]
        if remaining <= 0:
            break
        cut = min(targets[name], remaining)
        targets[name] -= cut
        remaining -= cut
    return targets


def _scaled(rs: Obj, replicas: int, revision: int | None = None) -> UpdateObject | None:
    if spec_replicas(rs) == replicas and (revision is None or _revision(rs) == revision):
        return None
    updated = copy.deepcopy(rs)
    updated.setdefault("spec", {})["replicas"] = replicas
    if revision is not None:
        updated["metadata"].setdefault("annotations", {})[REVISION] = str(revision)
    return UpdateObject(REPLICASETS, meta(rs).get("namespace"), meta(rs)["name"], updated)


def _clean_up_history(old: Sequence[Obj], limit: object) -> list[Action]:
    """Delete the oldest idle old ReplicaSets beyond ``revisionHistoryLimit`` (default 10)."""
    keep = _count(limit, 10)
    idle = [
        rs
        for rs in old
        if not spec_replicas(rs) and not _status_count(rs, "replicas") and not is_deleting(rs)
    ]
    idle.sort(key=lambda rs: (_revision(rs), _created(rs)))
    return [
        DeleteObject(REPLICASETS, meta(rs).get("namespace"), meta(rs)["name"])
        for rs in idle[: max(0, len(idle) - keep)]
    ]


def plan_deployment(dep: Obj, replicasets: Sequence[Obj], now: _dt.datetime) -> list[Action]:
    """Actions for one Deployment, given every ReplicaSet of its namespace."""
    if is_deleting(dep):
        return []
    dmeta = meta(dep)
    ns, uid = dmeta.get("namespace"), dmeta.get("uid")
    spec = dep.get("spec", {})
    selector = _selector(spec.get("selector"))
    template = spec.get("template") or {}
    desired = spec_replicas(dep)
    recreate = (spec.get("strategy") or {}).get("type") == "Recreate"
    paused = bool(spec.get("paused"))
    surge, max_unavailable = rolling_limits(dep)
    actions: list[Action] = []

    owned: list[Obj] = []
    for rs in replicasets:
        cu = controller_uid(rs)
        if cu == uid:
            owned.append(rs)
        elif cu is None and not is_deleting(rs) and not selector.empty:
            if selector.matches(labels_of(rs)):
                actions.append(_adopt(rs, dep, "Deployment", REPLICASETS))
    owned.sort(key=lambda r: (_created(r), meta(r)["name"]))
    template_hash = pod_template_hash(template)
    new_rs = _find_new_replicaset(owned, template, template_hash)
    old = [rs for rs in owned if rs is not new_rs]
    max_old_revision = max((_revision(rs) for rs in old), default=0)
    old_running = any(spec_replicas(rs) or _status_count(rs, "replicas") for rs in old)
    created_name: str | None = None

    if new_rs is None:
        if not paused and not (recreate and old_running):
            current = sum(spec_replicas(rs) for rs in owned)
            replicas = desired if recreate else min(desired, max(0, desired + surge - current))
            new = _new_replicaset(dep, template_hash, replicas, max_old_revision + 1)
            actions.append(CreateObject(REPLICASETS, ns, new))
            created_name = new["metadata"]["name"]
        if recreate:
            actions += [a for rs in old if (a := _scaled(rs, 0))]
    else:
        revision = _wanted_revision(new_rs, max_old_revision)
        target = spec_replicas(new_rs)
        if recreate:
            target = 0 if old_running else desired
        elif target > desired:
            target = desired
        elif target < desired:
            current = sum(spec_replicas(rs) for rs in owned)
            if current < desired + surge:
                target += min(desired + surge - current, desired - target)
        scale_new = _scaled(new_rs, target, revision)
        if scale_new:
            actions.append(scale_new)
        if recreate:
            actions += [a for rs in old if (a := _scaled(rs, 0))]
        elif spec_replicas(new_rs) == target and not paused:
            targets = _scale_old_down(old, owned, new_rs, desired, max_unavailable)
            actions += [a for rs in old if (a := _scaled(rs, targets[meta(rs)["name"]]))]

    actions += _clean_up_history(old, spec.get("revisionHistoryLimit"))
    if new_rs is not None or created_name:
        revision_now = str(
            _wanted_revision(new_rs, max_old_revision) if new_rs else max_old_revision + 1
        )
        if (dmeta.get("annotations") or {}).get(REVISION) != revision_now:
            updated = copy.deepcopy(dep)
            updated["metadata"].setdefault("annotations", {})[REVISION] = revision_now
            actions.append(UpdateObject(DEPLOYMENTS, ns, dmeta["name"], updated))

    status_update = _status_update(
        DEPLOYMENTS,
        dep,
        deployment_status(dep, owned, new_rs, created_name, max_unavailable, paused, now),
    )
    if status_update:
        actions.append(status_update)
    return actions


def deployment_status(
    dep: Obj,
    owned: Sequence[Obj],
    new_rs: Obj | None,
    created_name: str | None,
    max_unavailable: int,
    paused: bool,
    now: _dt.datetime,
) -> Obj:
    desired = spec_replicas(dep)
    replicas = sum(_status_count(rs, "replicas") for rs in owned)
    updated = _status_count(new_rs, "replicas") if new_rs else 0
    ready = sum(_status_count(rs, "readyReplicas") for rs in owned)
    available = sum(_status_count(rs, "availableReplicas") for rs in owned)
    old_pods = sum(_status_count(rs, "replicas") for rs in owned if rs is not new_rs)
    conditions: list[Obj] = list((dep.get("status") or {}).get("conditions") or [])
    if available >= desired - max_unavailable:
        conditions = set_condition(
            conditions,
            "Available",
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.",
            now,
        )
    else:
        conditions = set_condition(
            conditions,
            "Available",
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.",
            now,
        )
    if paused:
        progressing = ("Unknown", "DeploymentPaused", "Deployment is paused")
    elif created_name:
        progressing = ("True", "NewReplicaSetCreated", f'Created new replica set "{created_name}"')
    elif new_rs is None:
        progressing = ("True", "ReplicaSetUpdated", "Deployment is progressing.")
    elif updated == desired == replicas == available and not old_pods:
        progressing = (
            "True",
            "NewReplicaSetAvailable",
            f'ReplicaSet "{meta(new_rs)["name"]}" has successfully progressed.',
        )
    else:
        progressing = (
            "True",
            "ReplicaSetUpdated",
            f'ReplicaSet "{meta(new_rs)["name"]}" is progressing.',
        )
    conditions = set_condition(conditions, "Progressing", *progressing, now)
    order = {"Available": 0, "Progressing": 1}
    conditions.sort(key=lambda c: order.get(str(c.get("type")), 2))
    status: Obj = {"observedGeneration": meta(dep).get("generation", 1)}
    status.update(
        _nonzero(
            replicas=replicas,
            updatedReplicas=updated,
            readyReplicas=ready,
            availableReplicas=available,
            unavailableReplicas=max(0, desired - available),
        )
    )
    status["conditions"] = conditions
    collision = (dep.get("status") or {}).get("collisionCount")
    if collision:
        status["collisionCount"] = collision
    return status


# -- ReplicaSet -> Pods -------------------------------------------------------------------


def pod_is_active(pod: Obj) -> bool:
    return not is_deleting(pod) and (pod.get("status") or {}).get("phase") not in (
        "Succeeded",
        "Failed",
    )


_PHASE_RANK = {"Pending": 0, "Unknown": 1, "Running": 2}


def _deletion_rank(pod: Obj) -> tuple[Any, ...]:
    """Sort key: pods that should go first sort first (ActivePodsWithRanks, simplified)."""
    status = pod.get("status") or {}
    ready = pod_is_ready(pod)
    since = parse_time((pod_condition(pod, "Ready") or {}).get("lastTransitionTime"))
    restarts = sum(_count(c.get("restartCount")) for c in status.get("containerStatuses") or [])
    return (
        bool(pod.get("spec", {}).get("nodeName")),
        _PHASE_RANK.get(str(status.get("phase")), 0),
        ready,
        -(since.timestamp() if ready and since else 0.0),
        -restarts,
        -_created(pod),
        meta(pod).get("name", ""),
    )


def pod_from_template(rs: Obj) -> Obj:
    rmeta = meta(rs)
    template = rs.get("spec", {}).get("template") or {}
    tmeta = template.get("metadata") or {}
    pmeta: Obj = {
        "generateName": f"{rmeta['name']}-",
        "namespace": rmeta.get("namespace"),
        "labels": dict(tmeta.get("labels") or {}),
        "ownerReferences": [owner_reference(rs, "apps/v1", "ReplicaSet")],
    }
    for key in ("annotations", "finalizers"):
        if tmeta.get(key):
            pmeta[key] = copy.deepcopy(tmeta[key])
    return {"metadata": pmeta, "spec": copy.deepcopy(template.get("spec") or {})}


def plan_replicaset(rs: Obj, pods: Sequence[Obj], now: _dt.datetime) -> list[Action]:
    """Actions for one ReplicaSet, given every pod of its namespace."""
    rmeta = meta(rs)
    ns, uid = rmeta.get("namespace"), rmeta.get("uid")
    spec = rs.get("spec", {})
    selector = _selector(spec.get("selector"))
    desired = spec_replicas(rs)
    actions: list[Action] = []
    owned: list[Obj] = []
    for pod in pods:
        cu = controller_uid(pod)
        matches = not selector.empty and selector.matches(labels_of(pod))
        if cu == uid:
            if matches:
                owned.append(pod)
            elif not is_deleting(pod):  # release a pod relabelled out of the selector
                released = copy.deepcopy(pod)
                released["metadata"]["ownerReferences"] = [
                    r for r in meta(pod).get("ownerReferences") or [] if r.get("uid") != uid
                ]
                actions.append(UpdateObject(PODS, ns, meta(pod)["name"], released))
        elif cu is None and matches and pod_is_active(pod) and not is_deleting(rs):
            actions.append(_adopt(pod, rs, "ReplicaSet", PODS))
            owned.append(pod)
    active = [p for p in owned if pod_is_active(p)]
    if not is_deleting(rs):
        diff = len(active) - desired
        if diff < 0:
            actions += [
                CreateObject(PODS, ns, pod_from_template(rs)) for _ in range(min(-diff, MAX_BURST))
            ]
        elif diff > 0:
            for pod in sorted(active, key=_deletion_rank)[:diff]:
                actions.append(DeleteObject(PODS, ns, meta(pod)["name"]))
    template_labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    min_ready = _count(spec.get("minReadySeconds"))
    status: Obj = {"replicas": len(active)}
    status.update(
        _nonzero(
            fullyLabeledReplicas=sum(
                1
                for p in active
                if all(labels_of(p).get(k) == v for k, v in template_labels.items())
            ),
            readyReplicas=sum(1 for p in active if pod_is_ready(p)),
            availableReplicas=sum(1 for p in active if pod_is_available(p, min_ready, now)),
        )
    )
    status["observedGeneration"] = rmeta.get("generation", 1)
    if (rs.get("status") or {}).get("conditions"):
        status["conditions"] = rs["status"]["conditions"]
    update = _status_update(REPLICASETS, rs, status)
    if update:
        actions.append(update)
    return actions
