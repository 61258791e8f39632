"""The sandbox API: admission + store, the one entry point for every writer.

Theory of operation
-------------------
HTTP handlers (app.py), controllers, the kubelet and the bootstrap all go through ``Api``, so
each write gets the same defaults, validation and lifecycle rules a real API server applies:

- ``create``: the namespace must exist (404 ``namespaces "x" not found``) and not be
  Terminating (403); ``metadata.namespace`` must agree with the request (400); defaults and
  validation come from ``Admission``; then ``Store.create`` stamps uid/resourceVersion.
- ``update``: the main resource keeps ``.status``; ``subresource="status"`` takes only
  ``.status``. Identity metadata (uid, creationTimestamp, deletionTimestamp, ...) cannot be
  changed by a client. A stale ``metadata.resourceVersion`` is a 409 Conflict.
- ``patch``: the patch is applied to the stored object (patch.py), then it is an ``update``.
- ``delete``: pods bound to a node are deleted gracefully (``deletionTimestamp`` +
  ``deletionGracePeriodSeconds``; the kubelet removes them); objects with finalizers are only
  marked; namespaces go Terminating (the namespace controller empties and removes them);
  ``propagationPolicy=Orphan`` strips the owner reference from dependents; otherwise the object
  is removed at once and the garbage collector deletes dependents.

Errors are ``StoreError`` subclasses, turned into ``kind: Status`` at the HTTP boundary.
"""

from __future__ import annotations

import builtins
import copy
import datetime as _dt
import uuid
from typing import Any

from sandbox.apiserver import resources as R
from sandbox.apiserver.admission import Admission
from sandbox.apiserver.patch import APPLY_PATCH, apply_patch, normalize_content_type
from sandbox.apiserver.resources import ResourceType
from sandbox.apiserver.selectors import (
    format_label_selector,
    parse_field_selector,
    parse_label_selector,
)
from sandbox.apiserver.store import (
    AlreadyExists,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    Obj,
    Store,
    now_rfc3339,
)
from sandbox.apiserver.validation import invalid, invalid_value
from sandbox.config import SandboxConfig

PROPAGATION_POLICIES = ("Orphan", "Background", "Foreground")
UNDELETABLE_NAMESPACES = ("default", "kube-system", "kube-public")
TERMINAL_POD_PHASES = ("Succeeded", "Failed")


def _rfc3339_in(seconds: int) -> str:
    when = _dt.datetime.now(_dt.UTC) + _dt.timedelta(seconds=seconds)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _what(rt: ResourceType) -> str:
    return f"{rt.plural}.{rt.group}" if rt.group else rt.plural


class Api:
    def __init__(self, store: Store, config: SandboxConfig) -> None:
        self.store = store
        self.config = config
        self.admission = Admission(store, config)

    # -- reads ----------------------------------------------------------------------------

    def get(self, rt: ResourceType, namespace: str | None, name: str) -> Obj:
        return self.store.get(rt, namespace, name)

    def list(
        self,
        rt: ResourceType,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> builtins.list[Obj]:
        items, _ = self.list_with_revision(
            rt, namespace, label_selector=label_selector, field_selector=field_selector
        )
        return items

    def list_with_revision(
        self,
        rt: ResourceType,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> tuple[builtins.list[Obj], int]:
        """Matching objects sorted by namespace/name, and the store revision they were read at."""
        labels = parse_label_selector(label_selector)
        fields = parse_field_selector(field_selector, rt)
        return self.store.list(
            rt,
            namespace if rt.namespaced else None,
            lambda o: labels.matches_object(o) and fields.matches(o),
        )

    # -- create ---------------------------------------------------------------------------

    def _check_namespace_for_create(self, rt: ResourceType, namespace: str, name: str) -> None:
        ns = self.store.find(R.NAMESPACES, None, namespace)
        if ns is None:
            raise NotFound(
                f'namespaces "{namespace}" not found',
                details={"name": namespace, "kind": "namespaces"},
            )
        if ns.get("status", {}).get("phase") == "Terminating" or ns["metadata"].get(
            "deletionTimestamp"
        ):
            message = (
                f"unable to create new content in namespace {namespace} because it is being "
                "terminated"
            )
            raise Forbidden(
                f'{_what(rt)} "{name}" is forbidden: {message}',
                details={
                    "name": name,
                    "kind": rt.plural,
                    **({"group": rt.group} if rt.group else {}),
                    "causes": [
                        {
                            "reason": "NamespaceTerminating",
                            "message": message,
                            "field": "metadata.namespace",
                        }
                    ],
                },
            )

    def _resolve_namespace(self, rt: ResourceType, namespace: str | None, obj: Obj) -> str | None:
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise BadRequest("metadata must be an object")
        if not rt.namespaced:
            meta.pop("namespace", None)
            return None
        given = meta.get("namespace")
        if namespace and given and given != namespace:
            raise BadRequest(
                "the namespace of the provided object does not match the namespace sent on the "
                "request"
            )
        ns = namespace or given
        if not ns:
            raise BadRequest("a namespace is required for namespaced resources")
        meta["namespace"] = ns
        return str(ns)

    def create(
        self, rt: ResourceType, namespace: str | None, obj: dict[str, Any], *, dry_run: bool = False
    ) -> Obj:
        if not isinstance(obj, dict):
            raise BadRequest(f"the body of the request was not a {rt.kind} object")
        obj = copy.deepcopy(obj)
        self._check_kind(rt, obj)
        ns = self._resolve_namespace(rt, namespace, obj)
        meta = obj["metadata"]
        for key in (
            "uid", "resourceVersion", "creationTimestamp", "deletionTimestamp",
            "deletionGracePeriodSeconds", "generation", "selfLink", "managedFields",
        ):
            meta.pop(key, None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = self._generate_name(rt, ns, str(meta["generateName"]))
        if ns is not None:
            self._check_namespace_for_create(rt, ns, str(meta.get("name", "")))
        obj = self.admission.on_create(rt, obj)
        if dry_run:
            if self.store.find(rt, ns, meta["name"]) is not None:
                raise AlreadyExists(
                    f'{_what(rt)} "{meta["name"]}" already exists',
                    details={"name": meta["name"], "kind": rt.plural,
                             **({"group": rt.group} if rt.group else {})},
                )
            obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
            obj["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), generation=1)
            return obj
        return self.store.create(rt, obj)

    def _generate_name(self, rt: ResourceType, namespace: str | None, prefix: str) -> str:
        alphabet = "bcdfghjklmnpqrstvwxz2456789"
        for _ in range(100):
            suffix = "".join(alphabet[b % len(alphabet)] for b in uuid.uuid4().bytes[:5])
            if self.store.find(rt, namespace, prefix + suffix) is None:
                return prefix + suffix
        raise Conflict(f"unable to generate a unique name from {prefix!r}")

    @staticmethod
    def _check_kind(rt: ResourceType, obj: Obj) -> None:
        kind, api_version = obj.get("kind"), obj.get("apiVersion")
        if (kind and kind != rt.kind) or (api_version and api_version != rt.api_version):
            raise BadRequest(
                f"the API version in the data ({api_version}) does not match the expected API "
                f"version ({rt.api_version})"
                if api_version and api_version != rt.api_version
                else f"{kind} in version \"{rt.version}\" cannot be handled as a {rt.kind}"
            )

    # -- update ---------------------------------------------------------------------------

    def update(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        obj: dict[str, Any],
        *,
        subresource: str | None = None,
        dry_run: bool = False,
    ) -> Obj:
        if not isinstance(obj, dict):
            raise BadRequest(f"the body of the request was not a {rt.kind} object")
        if subresource not in (None, "status"):
            raise NotFound(f"the server could not find the requested resource ({subresource})")
        old = self.store.get(rt, namespace, name)
        new = copy.deepcopy(obj)
        self._check_kind(rt, new)
        meta = new.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise BadRequest("metadata must be an object")
        if meta.get("name") and meta["name"] != name:
            raise BadRequest(
                f"the name of the object ({meta['name']}) does not match the name on the URL "
                f"({name})"
            )
        self._resolve_namespace(rt, namespace, new)
        meta["name"] = name
        if subresource == "status":
            merged = copy.deepcopy(old)
            merged["status"] = new.get("status", {})
            merged["metadata"]["resourceVersion"] = meta.get("resourceVersion")
            new = merged
        else:
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
            # Identity and lifecycle metadata are the server's, whatever the client sent.
            for key in ("uid", "creationTimestamp", "deletionTimestamp",
                        "deletionGracePeriodSeconds", "generation"):
                if key in old["metadata"]:
                    meta[key] = old["metadata"][key]
                else:
                    meta.pop(key, None)
            if old["metadata"].get("deletionTimestamp"):
                added = set(meta.get("finalizers") or []) - set(old["metadata"].get("finalizers") or [])
                if added:
                    raise invalid(rt, name, [invalid_value(
                        "metadata.finalizers", sorted(added),
                        "no new finalizers can be added if the object is being deleted")])
            new = self.admission.on_update(rt, old, new)
        if not meta.get("resourceVersion"):
            new["metadata"].pop("resourceVersion", None)
        if dry_run:
            self._check_version(rt, old, new)
            return new
        result = self.store.update(rt, new)
        return self._finish_deletion(rt, result)

    @staticmethod
    def _check_version(rt: ResourceType, old: Obj, new: Obj) -> None:
        given = new.get("metadata", {}).get("resourceVersion")
        if given and given != old["metadata"]["resourceVersion"]:
            name = old["metadata"]["name"]
            raise Conflict(
                f'Operation cannot be fulfilled on {_what(rt)} "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again",
                details={"name": name, "kind": rt.plural, **({"group": rt.group} if rt.group else {})},
            )

    def _finish_deletion(self, rt: ResourceType, obj: Obj) -> Obj:
        """Remove an object being deleted once nothing holds it (finalizers, pod grace)."""
        meta = obj["metadata"]
        if not meta.get("deletionTimestamp") or meta.get("finalizers"):
            return obj
        if rt is R.NAMESPACES:
            return obj  # the namespace controller removes it
        if rt is R.PODS and meta.get("deletionGracePeriodSeconds", 0) != 0:
            return obj  # the kubelet removes it
        return self.store.delete(rt, meta.get("namespace"), meta["name"])

    # -- patch ----------------------------------------------------------------------------

    def patch(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        body: object,
        content_type: str,
        *,
        subresource: str | None = None,
        dry_run: bool = False,
    ) -> Obj:
        ctype = normalize_content_type(content_type)
        if ctype == APPLY_PATCH and subresource is None:
            current = self.store.find(rt, namespace, name)
            if current is None:
                if not isinstance(body, dict):
                    raise BadRequest("apply patch body must be an object")
                applied = copy.deepcopy(body)
                meta = applied.setdefault("metadata", {})
                if isinstance(meta, dict) and meta.get("name", name) != name:
                    raise BadRequest(
                        f"the name of the object ({meta.get('name')}) does not match the name on "
                        f"the URL ({name})"
                    )
                if isinstance(meta, dict):
                    meta["name"] = name
                return self.create(rt, namespace, applied, dry_run=dry_run)
        else:
            current = self.store.get(rt, namespace, name)
        patched = apply_patch(current, body, ctype, rt.key)
        return self.update(rt, namespace, name, patched, subresource=subresource, dry_run=dry_run)

    # -- scale subresource ----------------------------------------------------------------

    def get_scale(self, rt: ResourceType, namespace: str | None, name: str) -> Obj:
        if "scale" not in rt.subresources:
            raise NotFound("the server could not find the requested resource")
        return self._scale_of(self.store.get(rt, namespace, name))

    @staticmethod
    def _scale_of(obj: Obj) -> Obj:
        meta = obj["metadata"]
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                k: meta[k]
                for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if k in meta
            },
            "spec": {"replicas": obj.get("spec", {}).get("replicas", 0)},
            "status": {
                "replicas": obj.get("status", {}).get("replicas", 0),
                "selector": format_label_selector(obj.get("spec", {}).get("selector")),
            },
        }

    def update_scale(
        self, rt: ResourceType, namespace: str | None, name: str, scale: object, *, dry_run: bool = False
    ) -> Obj:
        if "scale" not in rt.subresources:
            raise NotFound("the server could not find the requested resource")
        if not isinstance(scale, dict):
            raise BadRequest("the body of the request was not a Scale object")
        replicas = scale.get("spec", {}).get("replicas", 0) if isinstance(scale.get("spec"), dict) else 0
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise invalid(
                rt, name,
                [invalid_value("spec.replicas", replicas, "must be greater than or equal to 0")],
                kind="Scale",
            )
        obj = self.store.get(rt, namespace, name)
        given = scale.get("metadata", {}).get("resourceVersion") if isinstance(scale.get("metadata"), dict) else None
        if given:
            obj["metadata"]["resourceVersion"] = given
        obj.setdefault("spec", {})["replicas"] = replicas
        return self._scale_of(self.update(rt, namespace, name, obj, dry_run=dry_run))

    def patch_scale(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        body: object,
        content_type: str,
        *,
        dry_run: bool = False,
    ) -> Obj:
        current = self.get_scale(rt, namespace, name)
        patched = apply_patch(current, body, normalize_content_type(content_type), "scale")
        return self.update_scale(rt, namespace, name, patched, dry_run=dry_run)

    # -- delete ---------------------------------------------------------------------------

    def delete(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        *,
        grace_period_seconds: int | None = None,
        propagation_policy: str | None = None,
        preconditions: dict[str, Any] | None = None,
        dry_run: bool = False,
    ) -> Obj:
        if propagation_policy is not None and propagation_policy not in PROPAGATION_POLICIES:
            raise BadRequest(
                f'DeleteOptions.meta.k8s.io "" is invalid: propagationPolicy: Unsupported value: '
                f'"{propagation_policy}": supported values: "Foreground", "Background", "Orphan", '
                '"nil"'
            )
        if grace_period_seconds is not None and grace_period_seconds < 0:
            grace_period_seconds = 0
        obj = self.store.get(rt, namespace, name)
        meta = obj["metadata"]
        self._check_preconditions(rt, obj, preconditions or {})
        if dry_run:
            return obj
        if rt is R.NAMESPACES:
            return self._delete_namespace(obj)
        if propagation_policy == "Orphan":
            self._orphan_dependents(meta["uid"])
        if rt is R.PODS:
            return self._delete_pod(obj, grace_period_seconds)
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                meta["deletionTimestamp"] = now_rfc3339()
                meta["deletionGracePeriodSeconds"] = 0
                return self.store.update(rt, obj)
            return obj
        return self.store.delete(rt, namespace, name)

    def _check_preconditions(self, rt: ResourceType, obj: Obj, pre: dict[str, Any]) -> None:
        meta = obj["metadata"]
        for key, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            want = pre.get(key)
            if want and want != meta.get(key):
                raise Conflict(
                    f"Operation cannot be fulfilled on {_what(rt)} \"{meta['name']}\": "
                    f"Precondition failed: {label} in precondition: {want}, {label} in object "
                    f"meta: {meta.get(key)}",
                    details={"name": meta["name"], "kind": rt.plural},
                )

    def _delete_namespace(self, ns: Obj) -> Obj:
        name = ns["metadata"]["name"]
        if name in UNDELETABLE_NAMESPACES:
            raise Forbidden(
                f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                details={"name": name, "kind": "namespaces"},
            )
        if ns.get("status", {}).get("phase") == "Terminating":
            return ns
        ns["metadata"].setdefault("deletionTimestamp", now_rfc3339())
        ns["metadata"].setdefault("deletionGracePeriodSeconds", 0)
        ns["status"] = {"phase": "Terminating"}
        return self.store.update(R.NAMESPACES, ns)

    def _delete_pod(self, pod: Obj, grace: int | None) -> Obj:
        meta, spec = pod["metadata"], pod.get("spec", {})
        if grace is None:
            grace = int(spec.get("terminationGracePeriodSeconds", 30))
        if not spec.get("nodeName") or pod.get("status", {}).get("phase") in TERMINAL_POD_PHASES:
            grace = 0
        if grace == 0 and not meta.get("finalizers"):
            return self.store.delete(R.PODS, meta.get("namespace"), meta["name"])
        current = meta.get("deletionGracePeriodSeconds")
        if meta.get("deletionTimestamp") and current is not None and current <= grace:
            return pod  # already terminating at least as fast
        meta["deletionTimestamp"] = _rfc3339_in(grace)
        meta["deletionGracePeriodSeconds"] = grace
        return self.store.update(R.PODS, pod)

    def _orphan_dependents(self, owner_uid: str) -> None:
        for rt in R.ALL:
            if not rt.namespaced:
                continue
            dependents = [
                copy.deepcopy(o)
                for o in self.store.iter_objects(rt)
                if any(ref.get("uid") == owner_uid for ref in o["metadata"].get("ownerReferences") or [])
            ]
            for dep in dependents:
                refs = [r for r in dep["metadata"]["ownerReferences"] if r.get("uid") != owner_uid]
                if refs:
                    dep["metadata"]["ownerReferences"] = refs
                else:
                    del dep["metadata"]["ownerReferences"]
                self.store.update(rt, dep, check_version=False)

    def delete_collection(
        self,
        rt: ResourceType,
        namespace: str | None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        grace_period_seconds: int | None = None,
        propagation_policy: str | None = None,
        dry_run: bool = False,
    ) -> builtins.list[Obj]:
        """Delete every matching object; returns what each delete returned."""
        results: builtins.list[Obj] = []
        for obj in self.list(rt, namespace, label_selector=label_selector, field_selector=field_selector):
            meta = obj["metadata"]
            try:
                results.append(
                    self.delete(
                        rt, meta.get("namespace"), meta["name"],
                        grace_period_seconds=grace_period_seconds,
                        propagation_policy=propagation_policy,
                        dry_run=dry_run,
                    )
                )
            except (NotFound, Forbidden):
                continue
        return results
