"""The benchmark's lab: a sandbox cluster with a server pod, its Service and an sshd pod.

``Lab.start()`` runs ``kvpn-sandbox up --name bench<N> --laptop-routes-pods`` (through the
library, ``sandbox.lifecycle``), writes OpenSSH keys and an sshd config into a temporary
folder, and creates, through the official Kubernetes client used from the laptop namespace:

* pod + Service ``bench-server`` (``python -m bench.server``, port 5201), the target of every
  path;
* pod ``bench-sshd``: Debian's ``/usr/sbin/sshd -D -e`` on port 2222, aes128-gcm only, root
  login with the generated key only - the server side of the ``ssh -L`` and sshuttle paths.

``Lab.stop()`` removes the sandbox (every namespace and process in it) and the folder; it is
safe to call twice and after a half-made start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox import lifecycle
from sandbox.config import LAPTOP_LINK_ADDRESS, SandboxConfig
from sandbox.inside_netns import inside_netns

REPO = Path(__file__).resolve().parents[1]
SERVER_PORT = 5201
SSHD_PORT = 2222
SSH_CIPHER = "aes128-gcm@openssh.com"
NAMESPACE = "default"
POD_READY_TIMEOUT_S = 60.0
SSHD = "/usr/sbin/sshd"

SSHD_CONFIG = """\
Port {port}
ListenAddress 0.0.0.0
HostKey {folder}/ssh_host_ed25519_key
AuthorizedKeysFile {folder}/authorized_keys
PidFile none
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowTcpForwarding yes
Ciphers {cipher}
PrintMotd no
MaxStartups 100
"""


class LabError(Exception):
    """The lab could not be set up (explained in one line)."""


@dataclass(frozen=True)
class LabAddresses:
    """Where things are, once the lab runs."""

    laptop_netns: str
    kubeconfig: Path
    laptop_address: str
    server_pod_ip: str
    server_cluster_ip: str
    sshd_pod_ip: str


@dataclass(frozen=True)
class SshFiles:
    """The client side of the OpenSSH paths: key, pinned host key, and the ssh options."""

    client_key: Path
    known_hosts: Path

    def ssh_options(self) -> list[str]:
        return [
            "-F", "/dev/null",
            "-i", str(self.client_key),
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-o", f"Ciphers={SSH_CIPHER}",
            "-o", "Compression=no",
        ]  # fmt: skip


def _ssh_keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kvpn-bench", "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return path.with_suffix(".pub").read_text().strip()


def _pod(name: str, command: list[str], port: int) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "containers": [
                {
                    "name": name,
                    "image": "debian",
                    "command": command,
                    "workingDir": str(REPO),
                    "readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 1},
                }
            ],
            "terminationGracePeriodSeconds": 1,
        },
    }


class Lab:
    """One benchmark lab; use ``with Lab(...) as lab`` or call ``start``/``stop``."""

    def __init__(self, name: str | None = None) -> None:
        self.config = SandboxConfig(
            name=name or f"bench{os.getpid() % 100000}", laptop_routes_pods=True
        )
        self.folder = Path(tempfile.mkdtemp(prefix="kvpn-bench-"))
        self.ssh = SshFiles(self.folder / "id_ed25519", self.folder / "known_hosts")
        self._addresses: LabAddresses | None = None
        self._api_client: Any = None

    @property
    def addresses(self) -> LabAddresses:
        if self._addresses is None:
            raise LabError("the lab is not started")
        return self._addresses

    def __enter__(self) -> Lab:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- start ---------------------------------------------------------------------------

    def start(self) -> LabAddresses:
        info = lifecycle.start(self.config)
        host_key = _ssh_keygen(self.folder / "ssh_host_ed25519_key")
        client_key = _ssh_keygen(self.ssh.client_key)
        (self.folder / "authorized_keys").write_text(client_key + "\n")
        sshd_config = self.folder / "sshd_config"
        sshd_config.write_text(
            SSHD_CONFIG.format(port=SSHD_PORT, folder=self.folder, cipher=SSH_CIPHER)
        )
        server_argv = [sys.executable, "-m", "bench.server", "--port", str(SERVER_PORT)]
        # /run/sshd is sshd's privilege separation folder (made by the service unit normally).
        sshd_script = f"mkdir -p /run/sshd && exec {SSHD} -D -e -f {sshd_config}"
        from kubernetes import client

        with inside_netns(self.config.laptop_netns):
            core: Any = client.CoreV1Api(self.api_client())
            core.create_namespaced_pod(NAMESPACE, _pod("bench-server", server_argv, SERVER_PORT))
            core.create_namespaced_service(
                NAMESPACE,
                {
                    "metadata": {"name": "bench-server"},
                    "spec": {
                        "selector": {"app": "bench-server"},
                        "ports": [{"name": "bench", "port": SERVER_PORT, "protocol": "TCP"}],
                    },
                },
            )
            core.create_namespaced_pod(
                NAMESPACE, _pod("bench-sshd", ["/bin/sh", "-c", sshd_script], SSHD_PORT)
            )
            server_ip = self._wait_ready(core, "bench-server")
            sshd_ip = self._wait_ready(core, "bench-sshd")
            self._wait_endpoints(core, "bench-server", server_ip)
            cluster_ip = str(
                core.read_namespaced_service("bench-server", NAMESPACE).spec.cluster_ip
            )
        self.ssh.known_hosts.write_text(f"[{sshd_ip}]:{SSHD_PORT} {host_key}\n")
        self._addresses = LabAddresses(
            laptop_netns=info.laptop_netns,
            kubeconfig=info.kubeconfig,
            laptop_address=str(LAPTOP_LINK_ADDRESS),
            server_pod_ip=server_ip,
            server_cluster_ip=cluster_ip,
            sshd_pod_ip=sshd_ip,
        )
        return self._addresses

    def api_client(self) -> Any:
        """The official client (use it inside the laptop namespace)."""
        if self._api_client is None:
            from kubernetes import config as kube_config

            self._api_client = kube_config.new_client_from_config(  # type: ignore[no-untyped-call]
                str(self.config.kubeconfig_path)
            )
        return self._api_client

    def _wait_ready(self, core: Any, name: str) -> str:
        deadline = time.monotonic() + POD_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            pod = core.read_namespaced_pod(name, NAMESPACE)
            conditions = pod.status.conditions or []
            if any(c.type == "Ready" and c.status == "True" for c in conditions):
                return str(pod.status.pod_ip)
            time.sleep(0.2)
        log = self.config.state_dir / "logs"
        raise LabError(f"pod {name} not ready after {POD_READY_TIMEOUT_S:.0f} s (logs in {log})")

    def _wait_endpoints(self, core: Any, name: str, ip: str) -> None:
        deadline = time.monotonic() + POD_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            endpoints = core.read_namespaced_endpoints(name, NAMESPACE)
            addresses = [a.ip for s in endpoints.subsets or [] for a in s.addresses or []]
            if ip in addresses:
                return
            time.sleep(0.2)
        raise LabError(f"service {name} has no endpoint {ip}")

    # -- stop ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Remove the sandbox and the temporary folder (also after a failed start)."""
        try:
            if self._api_client is not None:
                with contextlib.suppress(Exception):
                    self._api_client.close()
                self._api_client = None
            lifecycle.stop(self.config)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
