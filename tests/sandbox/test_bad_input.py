"""Unknown namespace or service against the sandbox cluster, for the commands that need a
real cluster and root (``kvpn connect``): one line, non-zero exit, nothing changed."""

from __future__ import annotations

from kubernetes import client

from tests.sandbox.support import Cluster
from tests.sandbox.test_rbac import _assert_changed_nothing_since, _kvpn, _snapshot_all


def _one_line(result: object, says: str) -> None:
    assert result.returncode == 2, result  # type: ignore[attr-defined]
    stderr: str = result.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr + result.stdout  # type: ignore[attr-defined]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == [f"kvpn: {says}"], stderr


def test_unknown_namespace_and_service(cluster: Cluster, core: client.CoreV1Api) -> None:
    before = _snapshot_all(core)
    _one_line(_kvpn(cluster, "connect", "--dns-mode", "off", "-n", "nope"),
              "namespace nope not found")  # fmt: skip
    _one_line(_kvpn(cluster, "exchange", "echo", "--expose", "8080", "-n", "nope"),
              "namespace nope not found")  # fmt: skip
    _one_line(_kvpn(cluster, "exchange", "nope", "--expose", "8080", "--skip-port-check"),
              "service default/nope not found")  # fmt: skip
    _one_line(_kvpn(cluster, "recover", "nope"), "service default/nope not found")
    _one_line(_kvpn(cluster, "connect", "--dns-mode", "off", "--context", "nope"),
              f"context 'nope' not in {cluster.config.kubeconfig_path} "
              f"(have: {_context_names(cluster)})")  # fmt: skip
    _assert_changed_nothing_since(core, before)


def _context_names(cluster: Cluster) -> str:
    from kubernetes import config as kube_config

    contexts, _ = kube_config.list_kube_config_contexts(str(cluster.config.kubeconfig_path))
    return ", ".join(c["name"] for c in contexts)
