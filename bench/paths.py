"""The five paths from the laptop namespace to the bench server, each as a context manager.

Entering a path starts what it needs (nothing, ``ssh -L``, sshuttle, ``kvpn connect``) and
yields a ``PathTarget``: where the measuring clients connect, and which address the server
must see as the peer (checked before measuring, so a path that silently bypassed its tunnel
is caught). Leaving it stops the program with SIGINT, as a user's Ctrl-C would.

| path               | clients connect to                  | the server sees      |
|--------------------|-------------------------------------|----------------------|
| ``kernel``         | server pod IP (routed via the node) | the laptop's address |
| ``ssh_L``          | 127.0.0.1:15201 -> ClusterIP        | the sshd pod         |
| ``sshuttle``       | ClusterIP (redirected by sshuttle)  | the sshd pod         |
| ``kvpn_direct``    | ClusterIP (routed into kvpn0)       | the shadow pod       |
| ``kvpn_portforward`` | ClusterIP (routed into kvpn0)     | the shadow pod       |
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from bench.lab import SERVER_PORT, SSHD_PORT, Lab
from bench.processes import Background, in_netns, run_measure, venv_bin
from sandbox.config import NODE_LINK_ADDRESS

SSH_LOCAL_PORT = 15201
TUNNEL_START_TIMEOUT_S = 30.0
KVPN_CONNECT_TIMEOUT_S = 90.0
SHADOW_RE = re.compile(r"shadow (?P<namespace>[a-z0-9-]+)/(?P<name>[a-z0-9-]+)")


class PathError(Exception):
    """A path could not be set up (explained in one line, with the program's last output)."""


@dataclass(frozen=True)
class PathTarget:
    name: str
    host: str
    port: int
    expected_peer: str | None  # None: only "not the laptop" is known
    process: Background | None = None
    ready_s: float | None = None  # kvpn: from start to the "connected" line


def _wait_port(lab: Lab, host: str, port: int, program: Background) -> None:
    result = run_measure(
        lab.addresses.laptop_netns, "wait", host, port, bound_s=TUNNEL_START_TIMEOUT_S,
        seconds=TUNNEL_START_TIMEOUT_S,
    )  # fmt: skip
    if not result.get("ok"):
        raise PathError(f"{host}:{port} never accepted a connection\n{program.output()}")


@contextlib.contextmanager
def kernel(lab: Lab) -> Iterator[PathTarget]:
    a = lab.addresses
    yield PathTarget("kernel", a.server_pod_ip, SERVER_PORT, a.laptop_address)


@contextlib.contextmanager
def ssh_local_forward(lab: Lab) -> Iterator[PathTarget]:
    a = lab.addresses
    argv = [
        "ssh", *lab.ssh.ssh_options(), "-N", "-p", str(SSHD_PORT),
        "-o", "ExitOnForwardFailure=yes",
        "-L", f"127.0.0.1:{SSH_LOCAL_PORT}:{a.server_cluster_ip}:{SERVER_PORT}",
        f"root@{a.sshd_pod_ip}",
    ]  # fmt: skip
    program = Background(in_netns(a.laptop_netns, argv))
    try:
        _wait_port(lab, "127.0.0.1", SSH_LOCAL_PORT, program)
        yield PathTarget("ssh_L", "127.0.0.1", SSH_LOCAL_PORT, a.sshd_pod_ip, program)
    finally:
        program.stop()


@contextlib.contextmanager
def sshuttle(lab: Lab) -> Iterator[PathTarget]:
    """sshuttle with its defaults (nat method, latency control on) through the same sshd.

    The sandbox laptop has no default route, and Linux refuses ``connect()`` to an address
    without a route before sshuttle's redirect rule is ever consulted; a real laptop has a
    default route. So the ClusterIP gets a /32 route via the node for sshuttle's lifetime.
    """
    a = lab.addresses
    netns = a.laptop_netns
    route = ["ip", "-n", netns, "route", "replace", f"{a.server_cluster_ip}/32",
             "via", str(NODE_LINK_ADDRESS)]  # fmt: skip
    subprocess.run(route, check=True, capture_output=True, timeout=10)
    ssh_command = " ".join(["ssh", *lab.ssh.ssh_options()])
    argv = [
        venv_bin("sshuttle"), "--method", "nat", "-e", ssh_command,
        "-r", f"root@{a.sshd_pod_ip}:{SSHD_PORT}", f"{a.server_cluster_ip}/32",
    ]  # fmt: skip
    program = Background(in_netns(netns, argv))
    try:
        if (
            program.wait_for(lambda line: "Connected to server" in line, TUNNEL_START_TIMEOUT_S)
            is None
        ):
            raise PathError(f"sshuttle did not connect\n{program.output()}")
        yield PathTarget("sshuttle", a.server_cluster_ip, SERVER_PORT, a.sshd_pod_ip, program)
    finally:
        program.stop()
        subprocess.run(
            ["ip", "-n", netns, "route", "del", f"{a.server_cluster_ip}/32"],
            capture_output=True, timeout=10, check=False,
        )  # fmt: skip


def _shadow_pod_ip(lab: Lab, connected_line: str) -> str | None:
    match = SHADOW_RE.search(connected_line)
    if match is None:
        return None
    from kubernetes import client

    from sandbox.inside_netns import inside_netns

    with inside_netns(lab.addresses.laptop_netns):
        core: Any = client.CoreV1Api(lab.api_client())
        pod = core.read_namespaced_pod(match["name"], match["namespace"])
    return str(pod.status.pod_ip) if pod.status.pod_ip else None


def _kvpn(lab: Lab, name: str, transport: str) -> Iterator[PathTarget]:
    a = lab.addresses
    argv = [
        venv_bin("kvpn"), "connect", "--kubeconfig", str(a.kubeconfig),
        "--transport", transport,
    ]  # fmt: skip
    program = Background(in_netns(a.laptop_netns, argv))
    try:
        line = program.wait_for(lambda text: text.startswith("connected"), KVPN_CONNECT_TIMEOUT_S)
        ready_s = time.monotonic() - program.started
        if line is None:
            raise PathError(
                f"kvpn connect --transport {transport} did not connect\n{program.output()}"
            )
        peer = _shadow_pod_ip(lab, line)
        yield PathTarget(name, a.server_cluster_ip, SERVER_PORT, peer, program, ready_s)
    finally:
        program.stop()  # the caller reads the exit code from target.process


@contextlib.contextmanager
def kvpn_direct(lab: Lab) -> Iterator[PathTarget]:
    yield from _kvpn(lab, "kvpn_direct", "direct")


@contextlib.contextmanager
def kvpn_portforward(lab: Lab) -> Iterator[PathTarget]:
    yield from _kvpn(lab, "kvpn_portforward", "portforward")


PATHS: dict[str, Callable[[Lab], contextlib.AbstractContextManager[PathTarget]]] = {
    "kernel": kernel,
    "ssh_L": ssh_local_forward,
    "sshuttle": sshuttle,
    "kvpn_direct": kvpn_direct,
    "kvpn_portforward": kvpn_portforward,
}
