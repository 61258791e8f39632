"""The three PATCH flavours a Kubernetes API server accepts, chosen by Content-Type.

- ``application/json-patch+json``: RFC 6902 operations (the ``jsonpatch`` library).
- ``application/merge-patch+json``: RFC 7386 (objects merge, ``null`` deletes, lists replace).
- ``application/strategic-merge-patch+json``: Kubernetes' strategic merge. Like a merge patch,
  but lists that the API schema marks ``patchStrategy: merge`` are merged element by element,
  matched on their ``patchMergeKey`` (containers by ``name``, container ports by
  ``containerPort``, service ports by ``port``, ...); lists of scalars with that strategy
  (``finalizers``) are unioned. Directives: ``$patch: replace|delete|merge`` in a map,
  ``{"$patch": "replace"}`` or ``{"<key>": v, "$patch": "delete"}`` as a list element,
  ``$deleteFromPrimitiveList/<field>``, ``$retainKeys`` and ``$setElementOrder/<field>``.
  Lists without a merge strategy are replaced.
- ``application/apply-patch+yaml`` (server-side apply) is approximated as a strategic merge of
  the applied configuration (it does not track field managers).

The merge keys come from the Kubernetes OpenAPI (``x-kubernetes-patch-merge-key``), written out
as a table of object paths per resource type; list elements add no path component.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import jsonpatch
import jsonpointer

from sandbox.apiserver.store import BadRequest, Invalid, UnsupportedMediaType

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
PATCH_TYPES = (JSON_PATCH, MERGE_PATCH, APPLY_PATCH, STRATEGIC_MERGE_PATCH)

Path = tuple[str, ...]
PRIMITIVE = ""  # merge key of a list of scalars merged as a set (e.g. finalizers)

# -- merge keys -----------------------------------------------------------------------------

_CONTAINER_KEYS: dict[Path, str] = {
    ("ports",): "containerPort",
    ("env",): "name",
    ("volumeMounts",): "mountPath",
    ("volumeDevices",): "devicePath",
}

_POD_SPEC_KEYS: dict[Path, str] = {
    ("volumes",): "name",
    ("imagePullSecrets",): "name",
    ("hostAliases",): "ip",
    ("topologySpreadConstraints",): "topologyKey",
    ("resourceClaims",): "name",
    ("schedulingGates",): "name",
}
for _list in ("containers", "initContainers", "ephemeralContainers"):
    _POD_SPEC_KEYS[(_list,)] = "name"
    for _sub, _key in _CONTAINER_KEYS.items():
        _POD_SPEC_KEYS[(_list, *_sub)] = _key

_METADATA_KEYS: dict[Path, str] = {
    ("ownerReferences",): "uid",
    ("finalizers",): PRIMITIVE,
}

_CONDITIONS: dict[Path, str] = {("conditions",): "type"}


def _under(prefix: Path, table: Mapping[Path, str]) -> dict[Path, str]:
    return {prefix + path: key for path, key in table.items()}


def _workload_keys() -> dict[Path, str]:
    return {
        **_under(("metadata",), _METADATA_KEYS),
        **_under(("spec", "template", "metadata"), _METADATA_KEYS),
        **_under(("spec", "template", "spec"), _POD_SPEC_KEYS),
        **_under(("status",), _CONDITIONS),
    }


MERGE_KEYS: dict[str, dict[Path, str]] = {
    "pods": {
        **_under(("metadata",), _METADATA_KEYS),
        **_under(("spec",), _POD_SPEC_KEYS),
        **_under(("status",), _CONDITIONS),
        ("status", "podIPs"): "ip",
        ("status", "hostIPs"): "ip",
    },
    "services": {
        **_under(("metadata",), _METADATA_KEYS),
        ("spec", "ports"): "port",
        **_under(("status",), _CONDITIONS),
    },
    "deployments.apps": _workload_keys(),
    "replicasets.apps": _workload_keys(),
    "nodes": {
        **_under(("metadata",), _METADATA_KEYS),
        ("spec", "podCIDRs"): PRIMITIVE,
        ("status", "addresses"): "type",
        **_under(("status",), _CONDITIONS),
    },
    "namespaces": {**_under(("metadata",), _METADATA_KEYS), **_under(("status",), _CONDITIONS)},
    "serviceaccounts": {
        **_under(("metadata",), _METADATA_KEYS),
        ("secrets",): "name",
        ("imagePullSecrets",): "name",
    },
}


def merge_keys_for(resource_key: str) -> dict[Path, str]:
    """Merge-key table for a resource type key (``pods``, ``deployments.apps``, ...)."""
    return MERGE_KEYS.get(resource_key, _under(("metadata",), _METADATA_KEYS))


# -- JSON merge patch (RFC 7386) ----------------------------------------------------------


def json_merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = json_merge_patch(result.get(key), value)
    return result


# -- JSON patch (RFC 6902) ----------------------------------------------------------------


def json_patch(doc: Any, operations: Any) -> Any:
    if not isinstance(operations, list):
        raise BadRequest("json: cannot unmarshal object into Go value of type jsonpatch.Patch")
    try:
        return jsonpatch.JsonPatch(operations).apply(copy.deepcopy(doc))
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException, TypeError,
            KeyError, IndexError, ValueError) as exc:
        raise Invalid(str(exc) or type(exc).__name__) from exc


# -- strategic merge patch ----------------------------------------------------------------

_DELETE = object()  # sentinel: a map patched with ``$patch: delete``


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [
            _strip_directives(v)
            for v in value
            if not (isinstance(v, dict) and set(v) == {"$patch"})
        ]
    return copy.deepcopy(value)


def strategic_merge_patch(original: Any, patch: Any, merge_keys: Mapping[Path, str]) -> Any:
    """Apply a strategic merge patch; ``merge_keys`` maps list paths to their merge key."""
    if not isinstance(patch, dict):
        raise BadRequest("strategic merge patch body must be a JSON object")
    result = _merge_map(original, patch, merge_keys, ())
    return {} if result is _DELETE else result


def _merge_map(original: Any, patch: dict[str, Any], keys: Mapping[Path, str], path: Path) -> Any:
    directive = patch.get("$patch")
    if directive == "delete":
        return _DELETE
    if directive == "replace":
        return _strip_directives({k: v for k, v in patch.items() if k != "$patch"})
    if directive not in (None, "merge"):
        raise BadRequest(f"Unknown patch type: {directive} in map: {patch}")
    result: dict[str, Any] = copy.deepcopy(original) if isinstance(original, dict) else {}
    # Deletions from primitive lists go first, then the ordinary fields.
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            if not isinstance(value, list):
                raise BadRequest(f"{key} must be a list")
            if isinstance(result.get(field), list):
                result[field] = [v for v in result[field] if v not in value]
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            result.pop(key, None)
            continue
        sub = path + (key,)
        if isinstance(value, dict):
            merged = _merge_map(result.get(key), value, keys, sub)
            if merged is _DELETE:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list):
            result[key] = _merge_list(result.get(key), value, keys, sub)
        else:
            result[key] = value
    retain = patch.get("$retainKeys")
    if retain is not None:
        if not isinstance(retain, list):
            raise BadRequest("$retainKeys must be a list")
        for key in list(result):
            if key not in retain:
                del result[key]
    for key, order in patch.items():
        if key.startswith("$setElementOrder/") and isinstance(order, list):
            field = key.split("/", 1)[1]
            if isinstance(result.get(field), list):
                result[field] = _apply_order(result[field], order, keys.get(path + (field,)))
    return result


def _apply_order(items: list[Any], order: list[Any], merge_key: str | None) -> list[Any]:
    def ident(item: Any) -> Any:
        if merge_key and isinstance(item, dict):
            return item.get(merge_key)
        return item

    wanted = [ident(o) for o in order]

    def rank(item: Any) -> int:
        try:
            return wanted.index(ident(item))
        except ValueError:
            return len(wanted)

    return sorted(items, key=rank)


def _merge_list(original: Any, patch: list[Any], keys: Mapping[Path, str], path: Path) -> list[Any]:
    merge_key = keys.get(path)
    if merge_key is None:
        return list(_strip_directives(patch))
    replace = any(isinstance(e, dict) and e.get("$patch") == "replace" for e in patch)
    if replace:
        return list(_strip_directives([e for e in patch if not (isinstance(e, dict) and "$patch" in e)]))
    base = copy.deepcopy(original) if isinstance(original, list) else []
    if merge_key == PRIMITIVE:
        for value in patch:
            if isinstance(value, (dict, list)):
                raise BadRequest(f"a list of scalars is expected at {'.'.join(path)}")
            if value not in base:
                base.append(value)
        return base
    for item in patch:
        if not isinstance(item, dict):
            raise BadRequest(f"{'.'.join(path)}: a list of objects is expected")
        if merge_key not in item:
            raise BadRequest(f"map: {item} does not contain declared merge key: {merge_key}")
        wanted = item[merge_key]
        index = next(
            (i for i, e in enumerate(base) if isinstance(e, dict) and e.get(merge_key) == wanted),
            None,
        )
        if item.get("$patch") == "delete":
            base = [e for e in base if not (isinstance(e, dict) and e.get(merge_key) == wanted)]
            continue
        merged = _merge_map(base[index] if index is not None else {}, item, keys, path)
        if merged is _DELETE:
            continue
        if index is None:
            base.append(merged)
        else:
            base[index] = merged
    return base


# -- dispatch -----------------------------------------------------------------------------


def normalize_content_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def apply_patch(doc: dict[str, Any], body: object, content_type: str, resource_key: str) -> dict[str, Any]:
    """Patch ``doc`` (not modified) by Content-Type; the result must still be an object."""
    ctype = normalize_content_type(content_type)
    if ctype == JSON_PATCH:
        result = json_patch(doc, body)
    elif ctype == MERGE_PATCH:
        if not isinstance(body, dict):
            raise BadRequest("merge patch body must be a JSON object")
        result = json_merge_patch(doc, body)
    elif ctype in (STRATEGIC_MERGE_PATCH, APPLY_PATCH):
        result = strategic_merge_patch(doc, body, merge_keys_for(resource_key))
    else:
        raise UnsupportedMediaType(
            f"the body of the request was in an unknown format - accepted media types include: "
            f"{', '.join(PATCH_TYPES)}"
        )
    if not isinstance(result, dict):
        raise Invalid("the patched document is not an object")
    return result
