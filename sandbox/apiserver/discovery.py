"""Discovery documents and ``/version``, generated from the resource table (resources.py).

The legacy (non-aggregated) discovery format: ``/api`` (APIVersions), ``/apis``
(APIGroupList), ``/apis/<group>`` (APIGroup) and ``/api/v1``, ``/apis/apps/v1``
(APIResourceList, subresources listed as ``pods/status``, ``deployments/scale``, ...).
"""

from __future__ import annotations

from typing import Any

from sandbox.apiserver import authorization
from sandbox.apiserver import resources as R

Obj = dict[str, Any]

_CATEGORIES = {"pods": ["all"], "services": ["all"], "deployments.apps": ["all"],
               "replicasets.apps": ["all"]}
_SUBRESOURCES: dict[str, tuple[str, tuple[str, ...], str, str]] = {
    # name -> (kind or "" for the parent's, verbs, group, version)
    "status": ("", ("get", "patch", "update"), "", ""),
    "scale": ("Scale", ("get", "patch", "update"), "autoscaling", "v1"),
    "exec": ("PodExecOptions", ("create", "get"), "", ""),
    "portforward": ("PodPortForwardOptions", ("create", "get"), "", ""),
    "log": ("", ("get",), "", ""),
}


def resource_list(group: str, version: str) -> Obj:
    resources: list[Obj] = []
    for rt in R.ALL:
        if (rt.group, rt.version) != (group, version):
            continue
        entry: Obj = {
            "name": rt.plural,
            "singularName": rt.singular,
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": list(rt.verbs),
        }
        if rt.short_names:
            entry["shortNames"] = list(rt.short_names)
        if rt.key in _CATEGORIES:
            entry["categories"] = _CATEGORIES[rt.key]
        resources.append(entry)
        for sub in rt.subresources:
            kind, verbs, sub_group, sub_version = _SUBRESOURCES.get(sub, ("", ("get",), "", ""))
            sub_entry: Obj = {
                "name": f"{rt.plural}/{sub}",
                "singularName": "",
                "namespaced": rt.namespaced,
                "kind": kind or rt.kind,
                "verbs": list(verbs),
            }
            if sub_group:
                sub_entry["group"], sub_entry["version"] = sub_group, sub_version
            resources.append(sub_entry)
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": resources,
    }


def api_groups() -> list[Obj]:
    seen: dict[str, Obj] = {}
    for rt in R.ALL:
        if rt.group and rt.group not in seen:
            gv = {"groupVersion": rt.api_version, "version": rt.version}
            seen[rt.group] = {"name": rt.group, "versions": [gv], "preferredVersion": gv}
    return [*seen.values(), authorization.api_group()]


def version_info(git_version: str) -> Obj:
    major, minor = git_version.lstrip("v").split(".")[:2]
    return {
        "major": major,
        "minor": minor,
        "emulationMajor": major,
        "emulationMinor": minor,
        "minCompatibilityMajor": major,
        "minCompatibilityMinor": str(max(int(minor) - 1, 0)),
        "gitVersion": git_version,
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    }


