"""Reconnect and `kvpn status`, end to end: the shadow pod is deleted under a running
`kvpn connect`, and the kvpn process is stopped (a sleeping laptop) and continued."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kvpn.session_status import status_path
from sandbox.inside_netns import inside_netns
from tests.sandbox.support import Cluster, venv_bin

SESSIONS = Path("/run/kvpn/sessions")


@dataclass
class Session:
    proc: subprocess.Popen[str]
    session_id: str
    output: list[str] = field(default_factory=list)

    def lines_matching(self, pattern: str) -> list[str]:
        return [line for line in list(self.output) if re.search(pattern, line)]


def _wait(predicate: Callable[[], Any], timeout: float, what: str, session: Session) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"{what} within {timeout} s; kvpn said:\n" + "".join(session.output))


@pytest.fixture(scope="module")
def session(cluster: Cluster, core: client.CoreV1Api) -> Iterator[Session]:
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            cluster.config.laptop_netns,
            venv_bin("kvpn"),
            "connect",
            "--kubeconfig",
            str(cluster.config.kubeconfig_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    ids: list[str] = []
    connected = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            found = re.search(r"shadow pod \S+/kvpn-shadow-([a-z0-9]+) created", line)
            if found:
                ids.append(found.group(1))
            if line.startswith("connected"):
                connected.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    if not connected.wait(90) or not ids:
        proc.kill()
        pytest.fail("kvpn connect did not connect:\n" + "".join(output))
    try:
        yield Session(proc, ids[0], output)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(5)
    assert proc.returncode == 0, "".join(output)
    left = core.list_namespaced_pod(
        "default", label_selector="app.kubernetes.io/managed-by=kvpn"
    ).items
    assert [p.metadata.name for p in left if p.metadata.deletion_timestamp is None] == []
    print("\nkvpn connect said:\n" + "".join(output))
    assert not status_path(SESSIONS, ids[0]).exists()


def _status(cluster: Cluster, session: Session) -> dict[str, Any]:
    result = cluster.in_laptop([venv_bin("kvpn"), "status", "--output", "json"])
    assert result.returncode == 0, result.stderr
    sessions = json.loads(result.stdout)["sessions"]
    (mine,) = [s for s in sessions if s["session"] == session.session_id]
    return mine


def _status_state(session: Session) -> str:
    """The state the session last wrote (read directly: cheaper than the CLI in a poll)."""
    try:
        data = json.loads(status_path(SESSIONS, session.session_id).read_text())
    except (OSError, ValueError):
        return ""
    return str(data.get("state", ""))


def _resolves(cluster: Cluster, name: str) -> bool:
    result = cluster.in_laptop(["getent", "hosts", name])
    return result.returncode == 0 and result.stdout.startswith("10.96.")


def _curl_echo(cluster: Cluster, core: client.CoreV1Api) -> bool:
    ip = core.read_namespaced_service("echo", "default").spec.cluster_ip
    result = cluster.in_laptop(["curl", "-s", "-m", "5", f"http://{ip}/"])
    return result.returncode == 0 and json.loads(result.stdout)["pod"].startswith("echo-")


def test_status_json_fields(cluster: Cluster, session: Session) -> None:
    status = _status(cluster, session)
    assert status["state"] == "connected"
    assert status["pid"] == session.proc.pid
    assert status["shadow_pod"] == f"default/kvpn-shadow-{session.session_id}"
    assert status["transport"] == "portforward"
    assert status["tun"] == "kvpn0"
    assert "10.96.0.0/12" in status["routes"]
    assert status["dns_mode"] == "resolv.conf"
    assert {"flows_open", "bytes_up", "bytes_down", "drops", "dns"} <= set(status["counters"])
    assert abs(time.time() - status["updated_at"]) < 10
    text = cluster.in_laptop([venv_bin("kvpn"), "status"]).stdout
    assert f"session {session.session_id}: connected (since " in text
    mode = status_path(SESSIONS, session.session_id).stat().st_mode
    assert mode & 0o777 == 0o600
    assert (SESSIONS / f"{session.session_id}.json").stat().st_mode & 0o777 == 0o600
    assert SESSIONS.stat().st_mode & 0o777 == 0o700
    assert SESSIONS.parent.stat().st_mode & 0o777 == 0o700


def test_no_secret_in_files_logs_or_the_cluster(
    cluster: Cluster, core: client.CoreV1Api, session: Session
) -> None:
    token = re.search(r"token\"?:\s*\"?([0-9a-f]{16,})", cluster.config.kubeconfig_path.read_text())
    assert token is not None
    pod = core.read_namespaced_pod(f"kvpn-shadow-{session.session_id}", "default")
    places = {
        "kvpn output": "".join(session.output),
        "session file": (SESSIONS / f"{session.session_id}.json").read_text(),
        "status file": status_path(SESSIONS, session.session_id).read_text(),
        "shadow pod": json.dumps(core.api_client.sanitize_for_serialization(pod)),
    }
    for where, text in places.items():
        assert token.group(1) not in text, where
        assert "PRIVATE KEY" not in text, where
    env = {e.name: e.value for e in pod.spec.containers[0].env}
    assert env["KVPN_AUTHORIZED_KEY"].startswith("ssh-ed25519 ")  # the public half only


def test_shadow_pod_deleted_is_recreated(
    cluster: Cluster, core: client.CoreV1Api, session: Session
) -> None:
    assert _curl_echo(cluster, core)
    name = f"kvpn-shadow-{session.session_id}"
    old_uid = core.read_namespaced_pod(name, "default").metadata.uid
    # an open connection through the tunnel: it must be reset, not left hanging
    pod_ip = core.list_namespaced_pod("default", label_selector="app=echo").items[0].status.pod_ip
    with inside_netns(cluster.config.laptop_netns):
        open_conn = socket.create_connection((pod_ip, 8080), timeout=10)
    open_conn.settimeout(20)

    core.delete_namespaced_pod(name, "default", grace_period_seconds=0)
    t0 = time.monotonic()
    _wait(lambda: _status_state(session) == "reconnecting", 15, "status: reconnecting", session)
    assert session.lines_matching(r"^reconnecting: ")
    with pytest.raises(OSError):  # ConnectionResetError; not a timeout
        if open_conn.recv(100) == b"":
            raise ConnectionResetError("closed")
    open_conn.close()

    _wait(lambda: session.lines_matching(r"^reconnected after "), 20, "reconnected", session)
    assert _status(cluster, session)["state"] == "connected"
    _wait(lambda: _curl_echo(cluster, core), 5, "curl to the echo ClusterIP", session)
    # cluster DNS stayed configured and works through the new tunnel
    _wait(lambda: _resolves(cluster, "echo"), 5, "the name echo to resolve", session)
    print(f"\nrecovered from the pod deletion in {time.monotonic() - t0:.1f} s")
    new = core.read_namespaced_pod(name, "default")
    assert new.metadata.uid != old_uid
    status = _status(cluster, session)
    assert status["reconnects"] == 1 and status["pods_recreated"] == 1
    assert status["last_outage_s"] > 0


def test_stopped_process_recovers(
    cluster: Cluster, core: client.CoreV1Api, session: Session
) -> None:
    """A laptop asleep for two minutes (the issue's case): longer than the agent's keepalive
    allowance, so the shadow side has dropped the old SSH connection when kvpn wakes up."""
    stopped = time.monotonic()
    os.kill(session.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(12)
        status = _status(cluster, session)  # never "connected" while it cannot pass traffic
        assert status["state"] == "unresponsive", status
    finally:
        time.sleep(max(0.0, SLEEP_SECONDS - (time.monotonic() - stopped)))
        os.kill(session.proc.pid, signal.SIGCONT)
    _wait(
        lambda: _status(cluster, session)["state"] == "connected",
        25,
        "status connected after SIGCONT",
        session,
    )
    _wait(lambda: _curl_echo(cluster, core), 10, "curl after SIGCONT", session)


def test_woken_up_after_the_pod_went_away(
    cluster: Cluster, core: client.CoreV1Api, session: Session
) -> None:
    """The laptop sleeps; meanwhile its shadow pod is gone. Waking up, kvpn notices the dead
    tunnel by itself and recreates the pod."""
    name = f"kvpn-shadow-{session.session_id}"
    before = len(session.lines_matching(r"^reconnected after "))
    os.kill(session.proc.pid, signal.SIGSTOP)
    try:
        core.delete_namespaced_pod(name, "default", grace_period_seconds=0)
        time.sleep(3)
    finally:
        os.kill(session.proc.pid, signal.SIGCONT)
    _wait(
        lambda: len(session.lines_matching(r"^reconnected after ")) > before,
        25,
        "reconnected after waking up",
        session,
    )
    _wait(lambda: _curl_echo(cluster, core), 10, "curl after waking up", session)
    assert _status(cluster, session)["state"] == "connected"


BLOCK_TABLE = "kvpnt_block_transport"
SLEEP_SECONDS = 120.0  # SIGSTOP .. SIGCONT of the sleeping-laptop test


def _block_api_server(cluster: Cluster, blocked: bool) -> None:
    """Drop every packet between the laptop and the API server (the tunnel's transport)."""
    if not blocked:
        cluster.in_laptop(["nft", "delete", "table", "inet", BLOCK_TABLE])
        return
    kubeconfig = cluster.config.kubeconfig_path.read_text()
    server = re.search(r"server\"?:\s*\"?https?://([0-9.]+):", kubeconfig)
    assert server is not None
    address = server.group(1)
    rules = (
        f"table inet {BLOCK_TABLE} {{\n"
        f"  chain out {{ type filter hook output priority 0; ip daddr {address} drop; }}\n"
        f"  chain in {{ type filter hook input priority 0; ip saddr {address} drop; }}\n"
        "}\n"
    )
    result = cluster.in_laptop(["nft", "-f", "-"], input=rules)
    assert result.returncode == 0, result.stderr


def test_transport_blocked_for_ten_seconds(
    cluster: Cluster, core: client.CoreV1Api, session: Session
) -> None:
    """Keepalives notice the silent transport; open flows are reset, new connections fail
    fast (never hang) while it is down, and work again soon after it returns."""
    assert _curl_echo(cluster, core)
    pod_ip = core.list_namespaced_pod("default", label_selector="app=echo").items[0].status.pod_ip
    with inside_netns(cluster.config.laptop_netns):
        open_conn = socket.create_connection((pod_ip, 8080), timeout=10)
    open_conn.settimeout(20)
    before = len(session.lines_matching(r"^reconnected after "))
    _block_api_server(cluster, True)
    try:
        blocked_at = time.monotonic()
        _wait(
            lambda: _status(cluster, session)["state"] == "reconnecting",
            12,
            "kvpn status: reconnecting",
            session,
        )
        detected = time.monotonic() - blocked_at
        with pytest.raises(OSError):  # reset by kvpn when the tunnel was declared dead
            if open_conn.recv(100) == b"":
                raise ConnectionResetError("closed")
        # a new connection while the tunnel is down: held up to the dial timeout, then
        # "no route to host" - an answer, not a hang
        started = time.monotonic()
        with inside_netns(cluster.config.laptop_netns), pytest.raises(OSError):
            socket.create_connection((pod_ip, 8080), timeout=15).close()
        assert time.monotonic() - started < 8
        remaining = 10 - (time.monotonic() - blocked_at)
        if remaining > 0:
            time.sleep(remaining)
    finally:
        _block_api_server(cluster, False)
        open_conn.close()
    unblocked = time.monotonic()
    _wait(
        lambda: len(session.lines_matching(r"^reconnected after ")) > before,
        20,
        "reconnected after the transport came back",
        session,
    )
    _wait(lambda: _curl_echo(cluster, core), 10, "curl after the transport came back", session)
    recovered = time.monotonic() - unblocked
    print(f"\nsilent transport detected in {detected:.1f} s; traffic again {recovered:.1f} s after")
    assert recovered < 12
