"""Ways for end-to-end tests to reach a sandbox cluster from the laptop namespace."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
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


class KvpnProcess:
    """``kvpn <args> --kubeconfig <sandbox>`` running in the laptop namespace, its output read
    line by line in the background."""

    def __init__(self, cluster: Cluster, *args: str) -> None:
        self.proc = subprocess.Popen(
            [
                "ip", "netns", "exec", cluster.config.laptop_netns, venv_bin("kvpn"), *args,
                "--kubeconfig", str(cluster.config.kubeconfig_path),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._new_line = threading.Condition()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._new_line:
                self.lines.append(line.rstrip("\n"))
                self._new_line.notify_all()
        with self._new_line:
            self._new_line.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, prefix: str, timeout: float = 90.0) -> str:
        """The first line starting with ``prefix``; AssertionError if kvpn never prints it."""
        deadline = time.monotonic() + timeout
        with self._new_line:
            while True:
                found = next((line for line in self.lines if line.startswith(prefix)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line starting {prefix!r}:\n{self.output}")
                self._new_line.wait(min(left, 1.0))

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        """Send ``sig`` (Ctrl-C by default) and wait; SIGKILL if it does not exit; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode

    def shadow_pod(self) -> str:
        line = self.wait_for("shadow pod ", 1)  # "shadow pod default/kvpn-shadow-xxxx created"
        return line.split()[2].split("/")[1]
