"""RBAC refusals end-to-end: with a permission taken away (the sandbox's deny rules), kvpn
says which one in a single line, exits non-zero and changes nothing in the cluster."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from sandbox.apiserver import authorization as authz
from tests.sandbox.support import Cluster, venv_bin


def _kvpn(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return cluster.in_laptop(
        [venv_bin("kvpn"), *args, "--kubeconfig", str(cluster.config.kubeconfig_path)]
    )


def _snapshot(core: client.CoreV1Api) -> tuple[Any, ...]:
    """What kvpn could change in namespace default: the service, and the set of pods."""
    svc = core.read_namespaced_service("echo", "default")
    pods = core.list_namespaced_pod("default").items
    return (
        svc.metadata.resource_version,
        svc.spec.selector,
        svc.metadata.annotations,
        sorted((p.metadata.name, p.metadata.uid) for p in pods),
    )


def _snapshot_all(core: client.CoreV1Api) -> tuple[Any, ...]:
    """Every service (with its resourceVersion) and every pod, in every namespace."""
    services = core.list_service_for_all_namespaces().items
    pods = core.list_pod_for_all_namespaces().items
    return (
        sorted((s.metadata.namespace, s.metadata.name, s.metadata.resource_version)
               for s in services),
        sorted((p.metadata.namespace, p.metadata.name, p.metadata.uid) for p in pods),
    )  # fmt: skip


def _assert_changed_nothing_since(core: client.CoreV1Api, before: tuple[Any, ...]) -> None:
    assert _snapshot_all(core) == before


@pytest.fixture
def deny(core: client.CoreV1Api) -> Iterator[Any]:
    """Install deny rules for one test; always removed afterwards."""

    def install(*rules: dict[str, str]) -> None:
        core.create_namespaced_config_map("kube-system", authz.rules_configmap(list(rules)))

    try:
        yield install
    finally:
        try:
            core.delete_namespaced_config_map(authz.AUTHZ_CONFIGMAP, "kube-system")
        except ApiException as exc:
            if exc.status != 404:
                raise


def _assert_one_clear_line(result: subprocess.CompletedProcess[str], permission: str) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("kvpn: not allowed to ")
    assert f"ask your cluster admin for: {permission}" in errors[0]
    assert "(RBAC)" in errors[0]


def test_denied_create_pods_changes_nothing(
    cluster: Cluster, core: client.CoreV1Api, deny: Any
) -> None:
    before, everything = _snapshot(core), _snapshot_all(core)
    deny({"verb": "create", "resource": "pods", "namespace": "default"})
    exchange = _kvpn(cluster, "exchange", "echo", "--expose", "8080")
    _assert_one_clear_line(exchange, "create pods")
    assert "in namespace default" in exchange.stderr
    connect = _kvpn(cluster, "connect", "--dns-mode", "off")
    _assert_one_clear_line(connect, "create pods")
    preview = _kvpn(cluster, "preview", "rbac-preview", "--expose", "8080", "--skip-port-check")
    _assert_one_clear_line(preview, "create pods")
    assert _snapshot(core) == before
    _assert_changed_nothing_since(core, everything)
    with pytest.raises(ApiException) as err:
        core.read_namespaced_service("rbac-preview", "default")
    assert err.value.status == 404


def test_denied_portforward_is_named_too(
    cluster: Cluster, core: client.CoreV1Api, deny: Any
) -> None:
    before = _snapshot(core)
    deny({"verb": "create", "resource": "pods/portforward"})
    exchange = _kvpn(cluster, "exchange", "echo", "--expose", "8080")
    _assert_one_clear_line(exchange, "create pods/portforward")
    connect = _kvpn(cluster, "connect", "--dns-mode", "off")
    _assert_one_clear_line(connect, "create pods/portforward")
    assert _snapshot(core) == before
