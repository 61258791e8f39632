"""Thin asyncio adapter over the Kubernetes API for exchange, preview, clean and recover.

Only moves objects: reads (as plain camelCase dicts, so the pure planners never see client
models), JSON patches, deletes, and a bounded wait for a Deployment to be ready again. The
synchronous client runs in threads. A JSON patch whose ``test`` fails (HTTP 422, or 409 on
a resourceVersion conflict) raises :class:`PatchRejected`: someone else changed the object.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException

from kvpn.cluster.cleanup import (
    CleanupAction,
    CleanupPlan,
    DeletePod,
    DeleteService,
    RestoreDeployment,
    RestoreService,
)
from kvpn.cluster.forbidden import describe_api_error
from kvpn.cluster.mesh_cleanup import DeleteMeshService, DropMeshMembers, RestoreMesh
from kvpn.cluster.settled_call import call_settled

Obj = dict[str, Any]


class InterceptApiError(Exception):
    """A Kubernetes call failed; the message names the object and the reason."""


class PatchRejected(InterceptApiError):
    """A JSON patch's precondition failed: the object changed since it was read."""


def api_reason(exc: ApiException) -> str:
    """``404 Not Found``; a 403 names the refused permission (kvpn.cluster.forbidden)."""
    return describe_api_error(exc)


@dataclass(frozen=True)
class KubeClients:
    api: Any  # kubernetes.client.ApiClient
    core: Any  # CoreV1Api
    apps: Any  # AppsV1Api

    @classmethod
    def from_configuration(cls, configuration: Any) -> KubeClients:
        from kubernetes import client

        api = client.ApiClient(configuration)
        return cls(api, client.CoreV1Api(api), client.AppsV1Api(api))

    def to_dict(self, obj: Any) -> Obj:
        result = self.api.sanitize_for_serialization(obj)
        return result if isinstance(result, dict) else {}

    def close(self) -> None:
        self.api.close()

    async def _call(
        self, what: str, fn: Callable[..., Any], *args: Any, settle: bool = False, **kw: Any
    ) -> Any:
        """*fn* in a thread; *settle* (a write): seen through even if cancelled (settled_call)."""
        try:
            if settle:
                return await call_settled(fn, *args, **kw)
            return await asyncio.to_thread(fn, *args, **kw)
        except ApiException as exc:
            if exc.status in (409, 422) and kw.get("body") is not None:
                raise PatchRejected(f"{what}: {api_reason(exc)}") from None
            raise InterceptApiError(f"{what}: {api_reason(exc)}") from None

    async def read_service(self, namespace: str, name: str) -> Obj | None:
        try:
            obj = await asyncio.to_thread(self.core.read_namespaced_service, name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise InterceptApiError(
                f"cannot read service {namespace}/{name}: {api_reason(exc)}"
            ) from None
        return self.to_dict(obj)

    async def read_deployment(self, namespace: str, name: str) -> Obj | None:
        try:
            obj = await asyncio.to_thread(self.apps.read_namespaced_deployment, name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise InterceptApiError(
                f"cannot read deployment {namespace}/{name}: {api_reason(exc)}"
            ) from None
        return self.to_dict(obj)

    async def list_services(self, namespace: str | None) -> list[Obj]:
        if namespace is None:
            result = await self._call("list services", self.core.list_service_for_all_namespaces)
        else:
            result = await self._call(
                f"list services in {namespace}", self.core.list_namespaced_service, namespace
            )
        return [self.to_dict(i) for i in result.items]

    async def list_deployments(self, namespace: str | None) -> list[Obj]:
        if namespace is None:
            result = await self._call(
                "list deployments", self.apps.list_deployment_for_all_namespaces
            )
        else:
            result = await self._call(
                f"list deployments in {namespace}", self.apps.list_namespaced_deployment, namespace
            )
        return [self.to_dict(i) for i in result.items]

    async def list_pods(self, namespace: str | None, label_selector: str) -> list[Obj]:
        if namespace is None:
            result = await self._call(
                "list pods", self.core.list_pod_for_all_namespaces, label_selector=label_selector
            )
        else:
            result = await self._call(
                f"list pods in {namespace}",
                self.core.list_namespaced_pod,
                namespace,
                label_selector=label_selector,
            )
        return [self.to_dict(i) for i in result.items]

    async def patch_service(self, namespace: str, name: str, ops: list[Obj]) -> Obj:
        result = await self._call(
            f"patch service {namespace}/{name}",
            self.core.patch_namespaced_service,
            name,
            namespace,
            body=ops,  # a list: sent as application/json-patch+json
            settle=True,
        )
        return self.to_dict(result)

    async def patch_deployment(self, namespace: str, name: str, ops: list[Obj]) -> Obj:
        result = await self._call(
            f"patch deployment {namespace}/{name}",
            self.apps.patch_namespaced_deployment,
            name,
            namespace,
            body=ops,
            settle=True,
        )
        return self.to_dict(result)

    async def patch_pod(self, namespace: str, name: str, patch: Obj) -> None:
        """A JSON merge patch (a dict body would be sent as a strategic merge patch)."""
        await self._call(
            f"label pod {namespace}/{name}",
            self.core.patch_namespaced_pod,
            name,
            namespace,
            patch,
            _content_type="application/merge-patch+json",
            settle=True,
        )

    async def create_service(self, namespace: str, manifest: Obj) -> Obj:
        name = manifest["metadata"]["name"]
        try:
            result = await call_settled(self.core.create_namespaced_service, namespace, manifest)
        except ApiException as exc:
            raise InterceptApiError(
                f"cannot create service {namespace}/{name}: {api_reason(exc)}"
            ) from None
        return self.to_dict(result)

    async def create_pod(self, namespace: str, manifest: Obj) -> None:
        name = manifest["metadata"]["name"]
        try:
            await call_settled(self.core.create_namespaced_pod, namespace, manifest)
        except ApiException as exc:
            raise InterceptApiError(
                f"cannot create shadow pod {namespace}/{name}: {api_reason(exc)}"
            ) from None

    async def delete_service(self, namespace: str, name: str, *, uid: str | None = None) -> bool:
        """Delete a Service; False when it is gone (or, with *uid*, replaced since)."""
        try:
            await asyncio.to_thread(
                self.core.delete_namespaced_service, name, namespace, body=_delete_options(uid)
            )
        except ApiException as exc:
            if exc.status == 404 or (uid is not None and exc.status == 409):
                return False
            raise InterceptApiError(
                f"cannot delete service {namespace}/{name}: {api_reason(exc)}"
            ) from None
        return True

    # --- kvpn mesh (issue 7) -------------------------------------------------------------

    async def read_pod(self, namespace: str, name: str) -> Obj | None:
        try:
            obj = await asyncio.to_thread(self.core.read_namespaced_pod, name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise InterceptApiError(
                f"cannot read pod {namespace}/{name}: {api_reason(exc)}"
            ) from None
        return self.to_dict(obj)

    async def read_pod_log(self, namespace: str, name: str, *, tail_lines: int = 20) -> str:
        """The last lines of a pod's log; "" when it cannot be read."""
        try:
            log = await asyncio.to_thread(
                self.core.read_namespaced_pod_log, name, namespace, tail_lines=tail_lines
            )
        except ApiException:
            return ""
        return str(log or "").strip()

    # --- end kvpn mesh ---------------------------------------------------------------------

    async def delete_pod(self, namespace: str, name: str, *, uid: str | None = None) -> bool:
        """Delete a pod at once; False when it is gone (or, with *uid*, replaced since)."""
        try:
            await asyncio.to_thread(
                self.core.delete_namespaced_pod,
                name,
                namespace,
                grace_period_seconds=0,
                body=_delete_options(uid),
            )
        except ApiException as exc:
            if exc.status == 404 or (uid is not None and exc.status == 409):
                return False
            raise InterceptApiError(
                f"cannot delete pod {namespace}/{name}: {api_reason(exc)}"
            ) from None
        return True


def _delete_options(uid: str | None) -> Any:
    """With *uid*: delete only that very object - a same-named one created since it was read
    is left alone (the API server answers 409 Conflict)."""
    if uid is None:
        return None
    from kubernetes import client

    return client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=uid))


def _ready_count(deployment: Obj) -> tuple[int, bool]:
    status = deployment.get("status") or {}
    meta = deployment.get("metadata") or {}
    observed = status.get("observedGeneration", 0) >= meta.get("generation", 0)
    return int(status.get("readyReplicas") or 0), observed


async def wait_deployment_ready(
    kube: KubeClients,
    namespace: str,
    name: str,
    replicas: int,
    out: Callable[[str], None],
    *,
    timeout: float = 120.0,
    poll_interval: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Wait until ``replicas`` pods are ready, printing progress; bounded by ``timeout``."""
    deadline = clock() + timeout
    last: int | None = None
    while True:
        deployment = await kube.read_deployment(namespace, name)
        if deployment is None:
            raise InterceptApiError(f"deployment {namespace}/{name} disappeared")
        ready, observed = _ready_count(deployment)
        if ready != last:
            out(f"deployment {namespace}/{name}: {ready}/{replicas} pods ready")
            last = ready
        if observed and ready >= replicas:
            return
        if clock() >= deadline:
            raise InterceptApiError(
                f"deployment {namespace}/{name} has {ready}/{replicas} pods ready after "
                f"{timeout:g}s; it was scaled back and will finish on its own"
            )
        await asyncio.sleep(poll_interval)


async def _restore_deployment(
    kube: KubeClients, action: RestoreDeployment, out: Callable[[str], None], timeout: float
) -> None:
    await kube.patch_deployment(action.namespace, action.name, list(action.ops))
    await wait_deployment_ready(
        kube, action.namespace, action.name, action.replicas, out, timeout=timeout
    )


async def _restore_service(
    kube: KubeClients, action: RestoreService, out: Callable[[str], None], timeout: float
) -> None:
    await kube.patch_service(action.namespace, action.name, list(action.ops))


async def _delete_pod(
    kube: KubeClients, action: DeletePod, out: Callable[[str], None], timeout: float
) -> None:
    await kube.delete_pod(action.namespace, action.name)


async def _delete_service(
    kube: KubeClients, action: DeleteService, out: Callable[[str], None], timeout: float
) -> None:
    await kube.delete_service(action.namespace, action.name)


# --- kvpn mesh (issue 7) -----------------------------------------------------------------


async def _restore_mesh(
    kube: KubeClients, action: RestoreMesh, out: Callable[[str], None], timeout: float
) -> None:
    """Selector first (so no request reaches a deleted router), then the mesh's objects."""
    await kube.patch_service(action.namespace, action.name, list(action.ops))
    restore = action.restore
    await kube.delete_pod(action.namespace, restore.router)
    await kube.delete_service(action.namespace, restore.standin)
    for name in restore.member_services:
        await kube.delete_service(action.namespace, name)


async def _drop_mesh_members(
    kube: KubeClients, action: DropMeshMembers, out: Callable[[str], None], timeout: float
) -> None:
    if action.ops:
        await kube.patch_service(action.namespace, action.name, list(action.ops))
    for name in action.member_services:
        await kube.delete_service(action.namespace, name)


async def _delete_mesh_service(
    kube: KubeClients, action: DeleteMeshService, out: Callable[[str], None], timeout: float
) -> None:
    await kube.delete_service(action.namespace, action.name)


# --- end kvpn mesh ---------------------------------------------------------------------------


_APPLY: Mapping[type, Callable[..., Awaitable[None]]] = {
    RestoreDeployment: _restore_deployment,
    RestoreService: _restore_service,
    DeletePod: _delete_pod,
    DeleteService: _delete_service,
    RestoreMesh: _restore_mesh,
    DropMeshMembers: _drop_mesh_members,
    DeleteMeshService: _delete_mesh_service,
}


async def apply_cleanup_action(
    kube: KubeClients, action: CleanupAction, out: Callable[[str], None], *, ready_timeout: float
) -> None:
    await _APPLY[type(action)](kube, action, out, ready_timeout)


async def apply_cleanup(
    kube: KubeClients, plan: CleanupPlan, out: Callable[[str], None], *, ready_timeout: float
) -> list[str]:
    """Apply every action (each even if an earlier one failed); return the failures."""
    problems = []
    for action in plan.actions:
        out(action.describe())
        try:
            await apply_cleanup_action(kube, action, out, ready_timeout=ready_timeout)
        except InterceptApiError as exc:
            problems.append(str(exc))
    return problems
