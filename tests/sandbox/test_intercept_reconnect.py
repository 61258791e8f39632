"""`kvpn exchange` and `kvpn mesh` survive a lost tunnel: the shadow pod is deleted under them
(recreated from the same plan; the Service keeps selecting its labels), and the process is
stopped longer than its lock's ttl (it carries on when nobody took the lock, and leaves the
Service alone when somebody recovered it meanwhile). `kvpn status` shows it throughout."""

# ruff: noqa: F811 - the fixtures imported from test_exchange and test_mesh are parameters

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from kubernetes import client

from kvpn.session_status import status_path
from sandbox.apiserver import authorization as authz
from tests.sandbox import test_mesh as mesh_test
from tests.sandbox.support import Cluster, venv_bin
from tests.sandbox.test_exchange import (  # noqa: F401 - fixtures
    ORIGINAL_SELECTOR,
    Kvpn,
    answered_by_laptop,
    assert_restored,
    client_pod,
    kvpn,
    local_server,
    service_state,
    wait_for,
)
from tests.sandbox.test_mesh import client_pod as mesh_client_pod  # noqa: F401 - fixture
from tests.sandbox.test_mesh import laptop_servers  # noqa: F401 - fixture

SESSIONS = Path("/run/kvpn/sessions")  # kvpn runs as root in the laptop namespace


def _statuses(cluster: Cluster) -> list[dict[str, Any]]:
    result = cluster.in_laptop([venv_bin("kvpn"), "status", "--output", "json"])
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout)["sessions"])


def _mine(cluster: Cluster, session: str) -> dict[str, Any]:
    (mine,) = [s for s in _statuses(cluster) if s["session"] == session]
    return mine


def _state(session: str) -> str:
    """The state the session last wrote (read directly: cheaper than the CLI in a poll)."""
    try:
        return str(json.loads(status_path(SESSIONS, session).read_text()).get("state", ""))
    except (OSError, ValueError):
        return ""


def _start(cluster: Cluster) -> tuple[Kvpn, str]:
    session = Kvpn(cluster, "exchange", "echo", "--expose", "8080:8080", "--heartbeat", "1")
    session.wait_line("exchanged")
    return session, session.shadow_pod().removeprefix("kvpn-shadow-")


def test_exchange_reconnects_after_its_pod_is_deleted_and_a_stop(
    cluster: Cluster, core: client.CoreV1Api, local_server: int, client_pod: str
) -> None:
    session, sid = _start(cluster)
    pod = f"kvpn-shadow-{sid}"
    try:
        wait_for(lambda: answered_by_laptop(cluster, client_pod), 20, "the laptop to answer")
        status = _mine(cluster, sid)
        assert status["kind"] == "exchange" and status["state"] == "connected", status
        assert status["service"] == "default/echo" and status["mode"] == "selector"
        assert status["shadow_pod"] == f"default/{pod}"
        assert status["ports"] == ["8080 -> localhost:8080"]
        assert status_path(SESSIONS, sid).stat().st_mode & 0o777 == 0o600
        assert SESSIONS.stat().st_mode & 0o777 == 0o700
        text = cluster.in_laptop([venv_bin("kvpn"), "status"]).stdout
        assert f"session {sid}: connected (since " in text
        assert "exchange     service default/echo (selector)" in text
        selector = service_state(core)[0]

        # 1. the shadow pod is deleted, and may not be created again for a while (RBAC): the
        # session says reconnecting with the error, then serves again once it may
        old_uid = core.read_namespaced_pod(pod, "default").metadata.uid
        core.create_namespaced_config_map(
            "kube-system", authz.rules_configmap([{"verb": "create", "resource": "pods"}])
        )
        try:
            core.delete_namespaced_pod(pod, "default", grace_period_seconds=0)
            t0 = time.monotonic()
            wait_for(lambda: _state(sid) == "reconnecting", 15, "status: reconnecting")
            status = wait_for(
                lambda: (s := _mine(cluster, sid))["last_error"] and s, 20, "a failed attempt"
            )
            assert status["state"] == "reconnecting", status  # type: ignore[index]
            assert "create" in status["last_error"], status  # type: ignore[index]
            text = cluster.in_laptop([venv_bin("kvpn"), "status"]).stdout
            assert f"session {sid}: reconnecting (since " in text and "last error: " in text
            assert service_state(core)[0] == selector  # the Service is left selecting the pod
        finally:
            core.delete_namespaced_config_map(authz.AUTHZ_CONFIGMAP, "kube-system")
        wait_for(lambda: _state(sid) == "connected", 60, "status: connected again")
        assert _mine(cluster, sid)["state"] == "connected"
        wait_for(lambda: answered_by_laptop(cluster, client_pod), 20, "the laptop again")
        print(f"\nexchange recovered from the pod deletion in {time.monotonic() - t0:.1f} s")
        assert core.read_namespaced_pod(pod, "default").metadata.uid != old_uid
        status = _mine(cluster, sid)
        assert status["state"] == "connected"
        assert status["reconnects"] == 1 and status["pods_recreated"] == 1, status
        assert any(line.startswith("reconnecting: ") for line in session.lines)
        assert any(line.startswith("reconnected after ") for line in session.lines)
        assert service_state(core)[0] == selector  # the Service was never touched

        # 2. a laptop asleep (stopped) longer than the lock's ttl (3 s) and than the agent's
        # keepalives (4 x 5 s): nobody took the lock, so it reconnects and carries on
        os.kill(session.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(12)
            assert _mine(cluster, sid)["state"] == "unresponsive"  # never "connected"
            time.sleep(16)
        finally:
            os.kill(session.proc.pid, signal.SIGCONT)
        wait_for(
            lambda: len([x for x in session.lines if x.startswith("reconnected after ")]) == 2,
            30,
            "a reconnect after SIGCONT",
        )
        wait_for(lambda: _state(sid) == "connected", 15, "status: connected after SIGCONT")
        wait_for(lambda: answered_by_laptop(cluster, client_pod), 20, "the laptop after SIGCONT")
        assert session.proc.poll() is None, session.output
    finally:
        code = session.stop()
    print("\nkvpn exchange said:\n" + session.output)
    assert code == 0, session.output
    assert "restored service default/echo" in session.output
    assert_restored(cluster, core, client_pod)
    assert not status_path(SESSIONS, sid).exists()
    assert not (SESSIONS / f"{sid}.json").exists()


def test_exchange_stopped_and_recovered_meanwhile_leaves_the_service_alone(
    cluster: Cluster, core: client.CoreV1Api, local_server: int, client_pod: str
) -> None:
    session, sid = _start(cluster)
    try:
        lock = json.loads(service_state(core)[1]["kvpn.dev/lock"])
        os.kill(session.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(max(0.0, lock["ttl"] + 1.5))
            done = kvpn(cluster, "recover", "echo")  # the stopped session looks dead
            assert done.returncode == 0, done.stdout + done.stderr
            assert service_state(core) == (ORIGINAL_SELECTOR, {})
        finally:
            os.kill(session.proc.pid, signal.SIGCONT)
        session.proc.wait(30)
    finally:
        code = session.stop()
    print("\nkvpn exchange said:\n" + session.output)
    assert code == 1, session.output
    assert "no longer locked by this session" in session.output
    assert service_state(core) == (ORIGINAL_SELECTOR, {})  # nothing of recover's undone
    assert_restored(cluster, core, client_pod)


def test_mesh_reconnects_after_its_pod_is_deleted(
    cluster: Cluster, core: client.CoreV1Api, laptop_servers: None, mesh_client_pod: str
) -> None:
    before = mesh_test.service_snapshot(cluster, core)
    session = mesh_test.mesh(cluster, mesh_test.PORT_A, mesh_test.MARK_A)
    code = -1
    try:
        session.started()
        sid = session.shadow_pod().removeprefix("kvpn-shadow-")
        mark = mesh_test.MARK_A

        def answered() -> str:
            return mesh_test.answered_by(cluster, mesh_client_pod, mark)

        wait_for(lambda: answered() == "A", 30, "mark A -> laptop A")
        status = _mine(cluster, sid)
        assert status["kind"] == "mesh" and status["state"] == "connected", status
        assert status["mode"] == "auto" and status["mark"] == f"version: {mark}"
        core.delete_namespaced_pod(f"kvpn-shadow-{sid}", "default", grace_period_seconds=0)
        wait_for(
            lambda: any(x.startswith("reconnected after ") for x in session.lines),
            60,
            "the mesh to reconnect",
        )
        wait_for(lambda: answered() == "A", 30, "mark A -> laptop A again")
        assert _mine(cluster, sid)["pods_recreated"] == 1
    finally:
        code = session.stop()
    print("\nkvpn mesh said:\n" + session.output)
    assert code == 0, session.output
    assert mesh_test.service_snapshot(cluster, core) == before
    wait_for(lambda: not mesh_test.mesh_leftovers(core), 20, "the mesh objects to go")
