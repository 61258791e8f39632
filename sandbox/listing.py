"""kubectl-style tables of sandbox objects, read through the official kubernetes client."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from typing import Any

from kubernetes import client

Row = list[str]


def _age(ts: _dt.datetime | None) -> str:
    if ts is None:
        return "<unknown>"
    seconds = int((_dt.datetime.now(_dt.UTC) - ts).total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _pods(core: Any, ns: str | None) -> tuple[Row, list[Row]]:
    items: list[Any] = (
        core.list_pod_for_all_namespaces() if ns is None else core.list_namespaced_pod(ns)
    ).items
    rows = []
    for p in items:
        statuses = p.status.container_statuses or []
        ready = sum(1 for s in statuses if s.ready)
        restarts = sum(s.restart_count for s in statuses)
        rows.append(
            [
                p.metadata.namespace,
                p.metadata.name,
                f"{ready}/{len(p.spec.containers)}",
                p.status.phase or "",
                str(restarts),
                p.status.pod_ip or "<none>",
                _age(p.metadata.creation_timestamp),
            ]
        )
    return ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "IP", "AGE"], rows


def _services(core: Any, ns: str | None) -> tuple[Row, list[Row]]:
    items: list[Any] = (
        core.list_service_for_all_namespaces() if ns is None else core.list_namespaced_service(ns)
    ).items
    rows = []
    for s in items:
        ports = ",".join(f"{p.port}/{p.protocol}" for p in s.spec.ports or [])
        rows.append(
            [
                s.metadata.namespace,
                s.metadata.name,
                s.spec.type or "",
                s.spec.cluster_ip or "",
                ports,
                _age(s.metadata.creation_timestamp),
            ]
        )
    return ["NAMESPACE", "NAME", "TYPE", "CLUSTER-IP", "PORT(S)", "AGE"], rows


def _deployments(apps: Any, ns: str | None) -> tuple[Row, list[Row]]:
    items: list[Any] = (
        apps.list_deployment_for_all_namespaces()
        if ns is None
        else apps.list_namespaced_deployment(ns)
    ).items
    rows = []
    for d in items:
        st = d.status
        rows.append(
            [
                d.metadata.namespace,
                d.metadata.name,
                f"{st.ready_replicas or 0}/{d.spec.replicas}",
                str(st.updated_replicas or 0),
                str(st.available_replicas or 0),
                _age(d.metadata.creation_timestamp),
            ]
        )
    return ["NAMESPACE", "NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"], rows


def _endpoints(core: Any, ns: str | None) -> tuple[Row, list[Row]]:
    items: list[Any] = (
        core.list_endpoints_for_all_namespaces()
        if ns is None
        else core.list_namespaced_endpoints(ns)
    ).items
    rows = []
    for e in items:
        eps = [
            f"{a.ip}:{p.port}/{p.protocol}"
            for sub in e.subsets or []
            for a in sub.addresses or []
            for p in sub.ports or []
        ]
        rows.append(
            [
                e.metadata.namespace,
                e.metadata.name,
                ",".join(eps) or "<none>",
                _age(e.metadata.creation_timestamp),
            ]
        )
    return ["NAMESPACE", "NAME", "ENDPOINTS", "AGE"], rows


def _nodes(core: Any, ns: str | None) -> tuple[Row, list[Row]]:
    rows = []
    nodes: list[Any] = core.list_node().items
    for n in nodes:
        ip = next((a.address for a in n.status.addresses or [] if a.type == "InternalIP"), "")
        rows.append(
            [
                "",
                n.metadata.name,
                "Ready",
                ",".join(n.spec.pod_cidrs or []),
                ip,
                _age(n.metadata.creation_timestamp),
            ]
        )
    return ["", "NAME", "STATUS", "POD-CIDRS", "INTERNAL-IP", "AGE"], rows


LISTERS: dict[str, Callable[[Any, str | None], tuple[Row, list[Row]]]] = {
    "pods": _pods,
    "services": _services,
    "deployments": _deployments,
    "endpoints": _endpoints,
    "nodes": _nodes,
}
ALIASES = {
    "po": "pods",
    "pod": "pods",
    "svc": "services",
    "service": "services",
    "deploy": "deployments",
    "deployment": "deployments",
    "ep": "endpoints",
    "no": "nodes",
    "node": "nodes",
}


def table(api_client: client.ApiClient, resource: str, namespace: str | None) -> str:
    """Render ``resource`` in ``namespace`` (None: all namespaces) as a kubectl-style table."""
    kind = ALIASES.get(resource, resource)
    if kind not in LISTERS:
        raise ValueError(f"unknown resource {resource!r}; try one of {', '.join(LISTERS)}")
    api: Any = (
        client.AppsV1Api(api_client) if kind == "deployments" else client.CoreV1Api(api_client)
    )
    header, rows = LISTERS[kind](api, namespace)
    keep = [i for i, h in enumerate(header) if h and (h != "NAMESPACE" or namespace is None)]
    grid = [[header[i] for i in keep]] + [[r[i] for i in keep] for r in rows]
    widths = [max(len(row[c]) for row in grid) for c in range(len(keep))]
    return "\n".join(
        "   ".join(cell.ljust(widths[c]) for c, cell in enumerate(row)).rstrip() for row in grid
    )
