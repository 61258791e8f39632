"""The resource types the sandbox API server serves, as data.

Every handler, the store and discovery read this one table, so adding a resource is one line.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ResourceType:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str
    short_names: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    verbs: tuple[str, ...] = (
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    )

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        """Unique name of the type, e.g. ``pods`` or ``deployments.apps``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"


def _core(plural: str, kind: str, namespaced: bool = True, **kw: object) -> ResourceType:
    return ResourceType("", "v1", plural, kind, namespaced, kind.lower(), **kw)  # type: ignore[arg-type]


def _apps(plural: str, kind: str, **kw: object) -> ResourceType:
    return ResourceType("apps", "v1", plural, kind, True, kind.lower(), **kw)  # type: ignore[arg-type]


NAMESPACES = _core("namespaces", "Namespace", False, short_names=("ns",), subresources=("status",))
NODES = _core("nodes", "Node", False, short_names=("no",), subresources=("status",))
PODS = _core(
    "pods",
    "Pod",
    short_names=("po",),
    subresources=("status", "exec", "portforward", "log"),
)
SERVICES = _core("services", "Service", short_names=("svc",), subresources=("status",))
ENDPOINTS = _core("endpoints", "Endpoints", short_names=("ep",))
CONFIGMAPS = _core("configmaps", "ConfigMap", short_names=("cm",))
SECRETS = _core("secrets", "Secret")
SERVICEACCOUNTS = _core("serviceaccounts", "ServiceAccount", short_names=("sa",))
EVENTS = _core("events", "Event", short_names=("ev",))
DEPLOYMENTS = _apps(
    "deployments", "Deployment", short_names=("deploy",), subresources=("status", "scale")
)
REPLICASETS = _apps(
    "replicasets", "ReplicaSet", short_names=("rs",), subresources=("status", "scale")
)

ALL: tuple[ResourceType, ...] = (
    NAMESPACES,
    NODES,
    PODS,
    SERVICES,
    ENDPOINTS,
    CONFIGMAPS,
    SECRETS,
    SERVICEACCOUNTS,
    EVENTS,
    DEPLOYMENTS,
    REPLICASETS,
)

BY_GROUP_VERSION_PLURAL: dict[tuple[str, str, str], ResourceType] = {
    (r.group, r.version, r.plural): r for r in ALL
}
BY_KEY: dict[str, ResourceType] = {r.key: r for r in ALL}
