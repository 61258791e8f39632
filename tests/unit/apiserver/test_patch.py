"""Patch flavours from one table of cases: (name, resource, original, patch, content type, want)."""

from __future__ import annotations

from typing import Any

import pytest

from sandbox.apiserver.patch import (
    JSON_PATCH,
    MERGE_PATCH,
    STRATEGIC_MERGE_PATCH,
    apply_patch,
)
from sandbox.apiserver.store import BadRequest, Invalid, UnsupportedMediaType

SMP = STRATEGIC_MERGE_PATCH


def pod(*containers: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p"}, "spec": {"containers": list(containers), **spec}}


C1 = {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}],
      "ports": [{"containerPort": 80, "protocol": "TCP"}]}
C2 = {"name": "b", "image": "b:1"}

CASES: list[tuple[str, str, dict[str, Any], Any, str, dict[str, Any]]] = [
    ("smp merges containers by name", "pods", pod(C1, C2),
     {"spec": {"containers": [{"name": "b", "image": "b:2"}]}}, SMP,
     pod(C1, {"name": "b", "image": "b:2"})),
    ("smp appends a new container", "pods", pod(C2),
     {"spec": {"containers": [{"name": "c", "image": "c:1"}]}}, SMP,
     pod(C2, {"name": "c", "image": "c:1"})),
    ("smp merges env by name inside a container", "pods", pod(C1),
     {"spec": {"containers": [{"name": "a", "env": [{"name": "Y", "value": "9"}, {"name": "Z", "value": "3"}]}]}}, SMP,
     pod({**C1, "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "9"}, {"name": "Z", "value": "3"}]})),
    ("smp deletes an env entry with $patch: delete", "pods", pod(C1),
     {"spec": {"containers": [{"name": "a", "env": [{"name": "X", "$patch": "delete"}]}]}}, SMP,
     pod({**C1, "env": [{"name": "Y", "value": "2"}]})),
    ("smp merges container ports by containerPort", "pods", pod(C1),
     {"spec": {"containers": [{"name": "a", "ports": [{"containerPort": 80, "name": "http"}, {"containerPort": 81}]}]}}, SMP,
     pod({**C1, "ports": [{"containerPort": 80, "protocol": "TCP", "name": "http"}, {"containerPort": 81}]})),
    ("smp $patch: replace on a list element replaces the list", "pods", pod(C1, C2),
     {"spec": {"containers": [{"$patch": "replace"}, {"name": "z", "image": "z"}]}}, SMP,
     pod({"name": "z", "image": "z"})),
    ("smp $patch: replace on a map replaces the map", "pods",
     {"metadata": {"name": "p", "labels": {"a": "1", "b": "2"}}},
     {"metadata": {"labels": {"$patch": "replace", "c": "3"}}}, SMP,
     {"metadata": {"name": "p", "labels": {"c": "3"}}}),
    ("smp $patch: delete on a map removes it", "pods",
     {"metadata": {"name": "p", "labels": {"a": "1"}}},
     {"metadata": {"labels": {"$patch": "delete"}}}, SMP,
     {"metadata": {"name": "p"}}),
    ("smp null deletes a key", "pods", {"metadata": {"name": "p", "labels": {"a": "1", "b": "2"}}},
     {"metadata": {"labels": {"a": None}}}, SMP, {"metadata": {"name": "p", "labels": {"b": "2"}}}),
    ("smp list without merge key is replaced", "pods",
     pod(C2, tolerations=[{"key": "a"}, {"key": "b"}]),
     {"spec": {"tolerations": [{"key": "c"}]}}, SMP, pod(C2, tolerations=[{"key": "c"}])),
    ("smp args (scalar list) are replaced", "pods", pod({**C2, "args": ["1", "2"]}),
     {"spec": {"containers": [{"name": "b", "args": ["3"]}]}}, SMP, pod({**C2, "args": ["3"]})),
    ("smp finalizers are a set union", "pods",
     {"metadata": {"name": "p", "finalizers": ["a", "b"]}},
     {"metadata": {"finalizers": ["b", "c"]}}, SMP,
     {"metadata": {"name": "p", "finalizers": ["a", "b", "c"]}}),
    ("smp $deleteFromPrimitiveList", "pods",
     {"metadata": {"name": "p", "finalizers": ["a", "b"]}},
     {"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}, SMP,
     {"metadata": {"name": "p", "finalizers": ["b"]}}),
    ("smp ownerReferences merge by uid", "pods",
     {"metadata": {"name": "p", "ownerReferences": [{"uid": "1", "name": "a"}]}},
     {"metadata": {"ownerReferences": [{"uid": "2", "name": "b"}, {"uid": "1", "name": "a2"}]}}, SMP,
     {"metadata": {"name": "p", "ownerReferences": [{"uid": "1", "name": "a2"}, {"uid": "2", "name": "b"}]}}),
    ("smp volumes by name, volumeMounts by mountPath", "pods",
     pod({**C2, "volumeMounts": [{"name": "v", "mountPath": "/a"}]}, volumes=[{"name": "v", "emptyDir": {}}]),
     {"spec": {"volumes": [{"name": "w", "emptyDir": {}}],
               "containers": [{"name": "b", "volumeMounts": [{"name": "w", "mountPath": "/b"}]}]}}, SMP,
     pod({**C2, "volumeMounts": [{"name": "v", "mountPath": "/a"}, {"name": "w", "mountPath": "/b"}]},
         volumes=[{"name": "v", "emptyDir": {}}, {"name": "w", "emptyDir": {}}])),
    ("smp status conditions by type", "pods",
     {"status": {"conditions": [{"type": "Ready", "status": "False"}, {"type": "PodScheduled", "status": "True"}]}},
     {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}, SMP,
     {"status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "PodScheduled", "status": "True"}]}}),
    ("smp service ports merge by port", "services",
     {"spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}, {"name": "m", "port": 9090}]}},
     {"spec": {"ports": [{"port": 80, "targetPort": 9000}]}}, SMP,
     {"spec": {"ports": [{"name": "http", "port": 80, "targetPort": 9000}, {"name": "m", "port": 9090}]}}),
    ("smp deployment template containers by name", "deployments.apps",
     {"spec": {"template": {"spec": {"containers": [C2, {"name": "c", "image": "c"}]}}}},
     {"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "c:2"}]}}}}, SMP,
     {"spec": {"template": {"spec": {"containers": [C2, {"name": "c", "image": "c:2"}]}}}}),
    ("smp $setElementOrder reorders", "pods", pod(C1, C2),
     {"spec": {"$setElementOrder/containers": [{"name": "b"}, {"name": "a"}],
               "containers": [{"name": "a", "image": "a:2"}]}}, SMP,
     pod(C2, {**C1, "image": "a:2"})),
    ("smp $retainKeys drops other keys", "deployments.apps",
     {"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}},
     {"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}}, SMP,
     {"spec": {"strategy": {"type": "Recreate"}}}),
    ("merge patch replaces lists and nulls delete", "pods", pod(C1, C2),
     {"spec": {"containers": [{"name": "n"}]}, "metadata": {"name": None}}, MERGE_PATCH,
     {"metadata": {}, "spec": {"containers": [{"name": "n"}]}}),
    ("merge patch merges maps recursively", "pods",
     {"metadata": {"labels": {"a": "1"}, "annotations": {"x": "y"}}},
     {"metadata": {"labels": {"b": "2"}}}, MERGE_PATCH,
     {"metadata": {"labels": {"a": "1", "b": "2"}, "annotations": {"x": "y"}}}),
    ("json patch ops", "pods", pod(C1, C2),
     [{"op": "replace", "path": "/spec/containers/1/image", "value": "b:9"},
      {"op": "remove", "path": "/spec/containers/0"},
      {"op": "add", "path": "/metadata/labels", "value": {"k": "v"}}], JSON_PATCH,
     {"metadata": {"name": "p", "labels": {"k": "v"}}, "spec": {"containers": [{"name": "b", "image": "b:9"}]}}),
]


@pytest.mark.parametrize(("resource", "original", "patch", "ctype", "want"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_patch_cases(resource: str, original: dict[str, Any], patch: Any, ctype: str,
                     want: dict[str, Any]) -> None:
    import copy

    before = copy.deepcopy(original)
    assert apply_patch(original, patch, ctype, resource) == want
    assert original == before  # the input is never modified


ERRORS: list[tuple[str, Any, str, type[Exception]]] = [
    ("json patch test failure", [{"op": "test", "path": "/a", "value": 2}], JSON_PATCH, Invalid),
    ("json patch missing path", [{"op": "remove", "path": "/nope"}], JSON_PATCH, Invalid),
    ("json patch body not a list", {"op": "add"}, JSON_PATCH, BadRequest),
    ("merge patch body not a map", [1], MERGE_PATCH, BadRequest),
    ("smp body not a map", [1], SMP, BadRequest),
    ("smp element without merge key", {"spec": {"containers": [{"image": "x"}]}}, SMP, BadRequest),
    ("smp unknown directive", {"$patch": "explode"}, SMP, BadRequest),
    ("unknown content type", {}, "application/xml", UnsupportedMediaType),
]


@pytest.mark.parametrize(("patch", "ctype", "error"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_patch_errors(patch: Any, ctype: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        apply_patch({"a": 1, "spec": {"containers": []}}, patch, ctype, "pods")


def test_content_type_parameters_are_ignored() -> None:
    got = apply_patch({"a": 1}, {"b": 2}, "application/merge-patch+json; charset=utf-8", "pods")
    assert got == {"a": 1, "b": 2}
