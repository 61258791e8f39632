"""Permission preflight: ask the API server what a command needs before changing anything.

Theory of operation
-------------------
Each command lists the permissions it needs (:class:`Permission`: verb, resource,
subresource, API group, namespace or cluster scope) with a pure function below
(:func:`connect_permissions`, :func:`exchange_permissions`, :func:`preview_permissions`,
:func:`cleanup_permissions`; :func:`shadow_pod_permissions` and
:func:`service_lock_permissions` are the building blocks ``kvpn mesh`` composes its own
list from). :func:`require_permissions` asks the API server about all of them at once with
``SelfSubjectAccessReview`` (what ``kubectl auth can-i`` does) and raises one
:class:`~kvpn.cli.errors.UserError` naming every missing permission::

    not allowed to create pods/portforward in namespace default (RBAC); ask your cluster
    admin for: create pods/portforward

The preflight never blocks on its own: if the reviews cannot be made (the user may not
create them, the server does not serve them, the call fails) it is skipped and the command
goes on; a later 403 is still one line (:mod:`kvpn.cluster.forbidden`). It also says
``namespace X not found`` when the namespace is readable and missing.

The decision (:func:`judge`) is pure; :func:`ssar_review` is the thin adapter over the
official client (synchronous, so each review runs in a thread).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kvpn.cli.errors import UserError

PORTFORWARD_TRANSPORT = "portforward"


@dataclass(frozen=True, slots=True, order=True)
class Permission:
    verb: str
    resource: str
    namespace: str | None = None  # None: cluster-wide
    subresource: str = ""
    group: str = ""

    def describe(self) -> str:
        """``create pods/portforward``, ``patch deployments.apps``."""
        qualified = f"{self.resource}.{self.group}" if self.group else self.resource
        return f"{self.verb} {qualified}/{self.subresource}" if self.subresource else (
            f"{self.verb} {qualified}"
        )

    def where(self) -> str:
        return f"in namespace {self.namespace}" if self.namespace else "cluster-wide"

    def review_body(self) -> dict[str, Any]:
        """A ``SelfSubjectAccessReview`` asking for this permission."""
        attributes = {"verb": self.verb, "resource": self.resource, "group": self.group}
        if self.subresource:
            attributes["subresource"] = self.subresource
        if self.namespace:
            attributes["namespace"] = self.namespace
        return {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attributes},
        }


def _perms(namespace: str | None, *specs: str) -> tuple[Permission, ...]:
    """``"create pods"``, ``"create pods/portforward"``, ``"patch deployments.apps"``."""
    out = []
    for spec in specs:
        verb, resource = spec.split(" ", 1)
        resource, _, sub = resource.partition("/")
        resource, _, group = resource.partition(".")
        out.append(Permission(verb, resource, namespace, sub, group))
    return tuple(out)


# -- what each command needs ------------------------------------------------------------------


def shadow_pod_permissions(
    namespace: str, *, transport: str = PORTFORWARD_TRANSPORT
) -> tuple[Permission, ...]:
    """Create a shadow pod, wait for it (its log carries the host key), delete it, and reach
    it through the API server's port-forward (a WebSocket GET: needs get and create)."""
    perms = _perms(namespace, "create pods", "get pods", "delete pods", "get pods/log")
    if transport == PORTFORWARD_TRANSPORT:
        perms += _perms(namespace, "create pods/portforward", "get pods/portforward")
    return perms


def service_lock_permissions(namespace: str) -> tuple[Permission, ...]:
    """Read a Service, and take / refresh / release kvpn's lock on it (JSON patches)."""
    return _perms(namespace, "get services", "patch services")


def connect_permissions(namespace: str, transport: str) -> tuple[Permission, ...]:
    """``kvpn connect``: only the shadow pod is required; discovery and DNS degrade without
    their reads (nodes, services, namespaces) and say so."""
    return shadow_pod_permissions(namespace, transport=transport)


def exchange_permissions(
    namespace: str, *, scale: bool, by_deployment: bool = False
) -> tuple[Permission, ...]:
    """``kvpn exchange``: the Service and its lock, the shadow pod; ``--mode scale`` also
    scales the Deployment and labels the shadow pod; ``deployment/NAME`` lists both kinds."""
    perms = service_lock_permissions(namespace) + shadow_pod_permissions(namespace)
    if scale:
        perms += _perms(
            namespace, "list deployments.apps", "get deployments.apps",
            "patch deployments.apps", "patch pods",
        )  # fmt: skip
    if by_deployment:
        perms += _perms(namespace, "list deployments.apps", "list services")
    return tuple(dict.fromkeys(perms))


def preview_permissions(namespace: str) -> tuple[Permission, ...]:
    """``kvpn preview``: a new Service (locked, deleted on exit) and the shadow pod."""
    return (
        service_lock_permissions(namespace)
        + _perms(namespace, "create services", "delete services")
        + shadow_pod_permissions(namespace)
    )


# Cleanup actions by class name -> what applying one needs (kvpn.cluster.cleanup).
_CLEANUP_NEEDS: dict[str, tuple[str, ...]] = {
    "RestoreDeployment": ("patch deployments.apps", "get deployments.apps"),
    "RestoreService": ("patch services",),
    "DeletePod": ("delete pods",),
    "DeleteService": ("delete services",),
    "RestoreMesh": ("patch services", "delete pods", "delete services"),
    "DropMeshMembers": ("patch services", "delete services"),
    "DeleteMeshService": ("delete services",),
}


def cleanup_permissions(actions: Iterable[object]) -> tuple[Permission, ...]:
    """What applying these ``kvpn clean`` / ``kvpn recover`` actions needs (each action has a
    ``namespace``)."""
    perms: dict[Permission, None] = {}
    for action in actions:
        namespace = str(getattr(action, "namespace", "") or "") or None
        for perm in _perms(namespace, *_CLEANUP_NEEDS.get(type(action).__name__, ())):
            perms[perm] = None
    return tuple(perms)


# -- the decision (pure) ----------------------------------------------------------------------


class Answer(enum.Enum):
    ALLOWED = "allowed"
    DENIED = "denied"
    UNKNOWN = "unknown"  # the review itself could not be made


@dataclass(frozen=True, slots=True)
class PermissionCheck:
    checked: bool  # False: the preflight was skipped (reviews unavailable)
    missing: tuple[Permission, ...] = ()
    note: str = ""

    @property
    def ok(self) -> bool:
        return not self.missing

    def message(self) -> str:
        """One line naming every missing permission (empty when nothing is missing)."""
        if not self.missing:
            return ""
        by_scope: dict[str, list[str]] = {}
        for perm in self.missing:
            by_scope.setdefault(perm.where(), []).append(perm.describe())
        refused = "; ".join(f"{', '.join(what)} {where}" for where, what in by_scope.items())
        wanted = ", ".join(dict.fromkeys(p.describe() for p in self.missing))
        return f"not allowed to {refused} (RBAC); ask your cluster admin for: {wanted}"


def judge(needed: Sequence[Permission], answers: Sequence[Answer]) -> PermissionCheck:
    """Missing permissions from one answer per needed permission; any UNKNOWN skips the
    whole preflight (a partial answer could blame the wrong permission)."""
    if any(a == Answer.UNKNOWN for a in answers):
        return PermissionCheck(False, note="cannot ask the API server about permissions")
    missing = tuple(p for p, a in zip(needed, answers, strict=True) if a == Answer.DENIED)
    return PermissionCheck(True, missing)


# -- the adapter ------------------------------------------------------------------------------

Review = Callable[[Permission], Awaitable[Answer]]


def ssar_review(api_client: Any) -> Review:
    """Ask with ``SelfSubjectAccessReview`` through the official client."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    authorization: Any = client.AuthorizationV1Api(api_client)

    def ask(permission: Permission) -> Answer:
        try:
            review = authorization.create_self_subject_access_review(
                permission.review_body(), _request_timeout=10
            )
        except ApiException:  # 403: may not ask; 404: not served; 5xx: failing
            return Answer.UNKNOWN
        except Exception:  # the connection failed: the command itself will say so
            return Answer.UNKNOWN
        status = getattr(review, "status", None)
        if status is None:
            return Answer.UNKNOWN
        if getattr(status, "allowed", False):
            return Answer.ALLOWED
        return Answer.DENIED

    async def review(permission: Permission) -> Answer:
        return await asyncio.to_thread(ask, permission)

    return review


async def check_permissions(needed: Iterable[Permission], review: Review) -> PermissionCheck:
    wanted = tuple(dict.fromkeys(needed))
    if not wanted:
        return PermissionCheck(True)
    first = await review(wanted[0])  # one review first: if it cannot be made, stop there
    if first == Answer.UNKNOWN:
        return judge(wanted[:1], [first])
    rest = await asyncio.gather(*(review(p) for p in wanted[1:]))
    return judge(wanted, [first, *rest])


def namespace_missing(api_client: Any, namespace: str) -> bool:
    """True only when the namespace can be read and is not there (403 etc.: not known)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        client.CoreV1Api(api_client).read_namespace(namespace, _request_timeout=10)
    except ApiException as exc:
        return bool(exc.status == 404)
    except Exception:
        return False
    return False


async def require_permissions(
    api_client: Any,
    needed: Iterable[Permission],
    *,
    namespace: str | None = None,
    review: Review | None = None,
) -> PermissionCheck:
    """The preflight each command calls before its first change: raises
    :class:`UserError` (one line) if ``namespace`` is missing or a permission is refused;
    returns the check (``checked=False`` when it had to be skipped)."""
    if namespace is not None and await asyncio.to_thread(namespace_missing, api_client, namespace):
        raise UserError(f"namespace {namespace} not found")
    result = await check_permissions(needed, review or ssar_review(api_client))
    if not result.ok:
        raise UserError(result.message())
    return result
