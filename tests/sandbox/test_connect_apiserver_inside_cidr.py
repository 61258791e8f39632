"""The classic route conflict: the API server's address is inside the service CIDR.

Routing the whole service CIDR into the TUN would send the tunnel's own port-forward traffic
into itself. kvpn must split the CIDR around the API server and still reach every service.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator

import pytest

from sandbox import lifecycle
from sandbox.config import SandboxConfig
from tests.sandbox.support import venv_bin

APISERVER = "10.96.0.50"


@pytest.fixture(scope="module")
def conflicted() -> Iterator[SandboxConfig]:
    import ipaddress

    config = SandboxConfig(
        name=f"a{os.getpid() % 100000}",
        netns_prefix_base="kvpnt-",
        apiserver_address=ipaddress.IPv4Address(APISERVER),
    )
    lifecycle.start(config)
    try:
        yield config
    finally:
        lifecycle.stop(config)


def _in_laptop(config: SandboxConfig, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", config.laptop_netns, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_connect_splits_the_service_cidr_around_the_api_server(conflicted: SandboxConfig) -> None:
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            conflicted.laptop_netns,
            venv_bin("kvpn"),
            "connect",
            "--kubeconfig",
            str(conflicted.kubeconfig_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("connected"):
                break
        assert lines and lines[-1].startswith("connected"), "".join(lines)
        routes = _in_laptop(conflicted, ["ip", "route", "get", APISERVER]).stdout
        assert "kvpn0" not in routes and "eth0" in routes
        # Services, including ones next to the API server's address, go through kvpn.
        answer = _in_laptop(conflicted, ["curl", "-s", "-m", "10", "http://echo/"])
        assert answer.returncode == 0 and '"pod": "echo-' in answer.stdout, answer.stderr
        assert "kvpn0" in _in_laptop(conflicted, ["ip", "route", "get", "10.96.0.51"]).stdout
        # The API server itself still answers, through the laptop's own route.
        version = _in_laptop(
            conflicted, ["curl", "-s", "-m", "5", f"http://{APISERVER}:6443/version"]
        )
        assert version.returncode == 0 and "gitVersion" in version.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, "".join(lines) + rest
