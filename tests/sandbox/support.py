"""Ways for end-to-end tests to reach a sandbox cluster from the laptop namespace."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from kubernetes import client
from kubernetes import config as kube_config
from kubernetes.stream import stream

from sandbox.config import SandboxConfig
from sandbox.inside_netns import inside_netns
from sandbox.lifecycle import SandboxInfo


def venv_bin(program: str) -> str:
    """Full path of a console script installed beside the running interpreter."""
    return str(Path(sys.executable).parent / program)


@dataclass
class Cluster:
    config: SandboxConfig
    info: SandboxInfo

    def api_client(self) -> client.ApiClient:
        """An official client whose connections are made from the laptop namespace."""
        with inside_netns(self.config.laptop_netns):
            return kube_config.new_client_from_config(str(self.config.kubeconfig_path))

    def in_laptop(self, argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.config.laptop_netns, *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            **kw,  # type: ignore[arg-type]
        )


def exec_in_pod(
    cluster: Cluster, namespace: str, pod: str, command: list[str]
) -> tuple[str, str, int]:
    """Run ``command`` in a pod through the API server; return stdout, stderr, exit code."""
    with inside_netns(cluster.config.laptop_netns):
        api = client.CoreV1Api(
            kube_config.new_client_from_config(str(cluster.config.kubeconfig_path))
        )
        resp = stream(
            api.connect_get_namespaced_pod_exec,
            pod,
            namespace,
            command=command,
            stdin=False,
            stdout=True,
            stderr=True,
            tty=False,
            _preload_content=False,
        )
    resp.run_forever(timeout=60)
    out = resp.read_stdout() or ""
    err = resp.read_stderr() or ""
    code = resp.returncode
    resp.close()
    return out, err, code
