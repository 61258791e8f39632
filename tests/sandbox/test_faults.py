"""Crashes, end to end: ``kill -9`` a running session, then ``kvpn clean`` (issue 9).

What a killed ``kvpn connect`` leaves: its TUN device and routes go with its file descriptor
(the TUN is not persistent), but the laptop's resolv.conf, the session files and the shadow
pod stay. What a killed ``kvpn exchange`` leaves: the Service's selector, annotations and lock,
and the shadow pod. ``kvpn clean`` replays the dead session's change journal and puts back
exactly what was there before. Two users in one namespace: cleaning one user's dead session
leaves the other's live session working.

(Stopping a session with SIGSTOP and blocking its transport are in test_reconnect.py.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client

from kvpn.change_journal import default_journal_dir
from kvpn.cluster.pod_heartbeat import HEARTBEAT_ANNOTATION
from tests.sandbox.support import Cluster, KvpnProcess, venv_bin

SESSIONS = Path("/run/kvpn/sessions")


def kvpn(cluster: Cluster, *args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    env = ["env", f"LOGNAME={user}", f"USER={user}"] if user else []
    return cluster.in_laptop(
        [*env, venv_bin("kvpn"), *args, "--kubeconfig", str(cluster.config.kubeconfig_path)]
    )


def started(cluster: Cluster, *args: str, user: str | None = None) -> KvpnProcess:
    """``kvpn ARGS`` in the laptop namespace; ``user`` is the identity it runs as (getpass
    reads LOGNAME first), so two "users" can share the machine and the namespace."""
    if user is None:
        return KvpnProcess(cluster, *args)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LOGNAME", user)
        env.setenv("USER", user)
        return KvpnProcess(cluster, *args)


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def session_of(process: KvpnProcess) -> str:
    return process.shadow_pod().removeprefix("kvpn-shadow-")


def pod_alive(core: client.CoreV1Api, name: str) -> bool:
    pods = core.list_namespaced_pod("default", field_selector=f"metadata.name={name}").items
    return any(p.metadata.deletion_timestamp is None for p in pods)


def laptop_snapshot(cluster: Cluster) -> dict[str, str | bytes]:
    """Everything a connect changes on the laptop: routes, links, resolv.conf's bytes."""
    resolv = Path("/etc/netns") / cluster.config.laptop_netns / "resolv.conf"
    return {
        "routes": cluster.in_laptop(["ip", "route", "show", "table", "all"]).stdout,
        "links": cluster.in_laptop(["ip", "-o", "link", "show"]).stdout,
        "addresses": cluster.in_laptop(["ip", "-o", "address", "show"]).stdout,
        "resolv.conf": resolv.read_bytes(),
    }


def service_state(core: client.CoreV1Api, name: str) -> tuple[object, object]:
    svc = core.read_namespaced_service(name, "default")
    return svc.spec.to_dict(), dict(svc.metadata.annotations or {})


@pytest.fixture
def killed_sessions() -> Iterator[list[KvpnProcess]]:
    """Processes a test starts; whatever is still running at the end is stopped."""
    processes: list[KvpnProcess] = []
    yield processes
    for process in processes:
        process.stop(signal.SIGINT)


def test_kill_9_connect_then_clean_restores_the_laptop_exactly(
    cluster: Cluster, core: client.CoreV1Api, killed_sessions: list[KvpnProcess]
) -> None:
    before = laptop_snapshot(cluster)
    connect = started(cluster, "connect")
    killed_sessions.append(connect)
    connect.wait_for("connected")
    session = session_of(connect)
    journal = default_journal_dir() / f"{session}.journal"
    assert journal.exists() and journal.stat().st_mode & 0o777 == 0o600
    assert default_journal_dir().stat().st_mode & 0o777 == 0o700
    pod = f"kvpn-shadow-{session}"
    wait_for(
        lambda: HEARTBEAT_ANNOTATION in (core.read_namespaced_pod(pod, "default").metadata.annotations or {}),
        10,
        "the shadow pod's heartbeat",
    )  # fmt: skip
    assert laptop_snapshot(cluster)["resolv.conf"] != before["resolv.conf"]

    connect.stop(signal.SIGKILL)
    crashed = laptop_snapshot(cluster)
    # The TUN (and its routes) went with the killed process's descriptor ...
    assert "kvpn0" not in str(crashed["links"])
    # ... but DNS, the session files and the shadow pod are left behind.
    assert crashed["resolv.conf"] != before["resolv.conf"]
    assert (SESSIONS / f"{session}.json").exists()
    assert pod_alive(core, pod)

    dry = kvpn(cluster, "clean", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert f"would undo: restore the DNS configuration (session {session})" in dry.stdout
    assert f"would undo: delete shadow pod {pod} (session {session})" in dry.stdout
    assert laptop_snapshot(cluster) == crashed and pod_alive(core, pod)  # changed nothing

    done = kvpn(cluster, "clean")
    print("\nkvpn clean --dry-run said:\n" + dry.stdout + "kvpn clean said:\n" + done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    restored = [line for line in done.stdout.splitlines() if f"(session {session})" in line]
    assert any(line.startswith("undone: restore the DNS configuration") for line in restored)
    assert laptop_snapshot(cluster) == before
    wait_for(lambda: not pod_alive(core, pod), 15, "the shadow pod to go")
    assert not (SESSIONS / f"{session}.json").exists()
    assert not (SESSIONS / f"{session}.status.json").exists()
    assert not journal.exists()
    again = kvpn(cluster, "clean")
    assert again.returncode == 0 and session not in again.stdout


def test_kill_9_exchange_then_clean_restores_the_service_exactly(
    cluster: Cluster, core: client.CoreV1Api, killed_sessions: list[KvpnProcess]
) -> None:
    before = service_state(core, "echo")
    exchange = started(cluster, "exchange", "echo", "--expose", "8093:8080", "--skip-port-check")
    killed_sessions.append(exchange)
    exchange.wait_for("exchanged")
    session = session_of(exchange)
    assert service_state(core, "echo") != before
    exchange.stop(signal.SIGKILL)
    assert pod_alive(core, f"kvpn-shadow-{session}")

    # No waiting for the lock to expire: the journal says its session is dead.
    done = kvpn(cluster, "clean")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"undone: restore the selector of service echo (session {session})" in done.stdout
    assert service_state(core, "echo") == before
    wait_for(lambda: not pod_alive(core, f"kvpn-shadow-{session}"), 15, "the shadow pod to go")
    assert not (default_journal_dir() / f"{session}.journal").exists()


def test_cleaning_one_users_dead_session_leaves_another_users_live_session(
    cluster: Cluster, core: client.CoreV1Api, killed_sessions: list[KvpnProcess]
) -> None:
    alice = started(cluster, "connect", "--dns-mode", "off", user="alice")
    killed_sessions.append(alice)
    alice.wait_for("connected")
    alice_pod = alice.shadow_pod()
    bob = started(
        cluster, "preview", "bob-preview", "--expose", "8094", "--skip-port-check", user="bob"
    )
    killed_sessions.append(bob)
    bob.wait_for("preview:")
    bob_pod = bob.shadow_pod()
    bob.stop(signal.SIGKILL)

    # Alice's clean leaves bob's dead session to bob; nothing of hers is live-cleaned.
    as_alice = kvpn(cluster, "clean", "--dry-run", user="alice")
    assert as_alice.returncode == 0, as_alice.stdout + as_alice.stderr
    would = [line for line in as_alice.stdout.splitlines() if line.startswith("would")]
    assert not [line for line in would if "bob-preview" in line or bob_pod in line], would
    assert not [line for line in would if alice_pod in line], would
    assert "of bob" in as_alice.stdout and "not yours" in as_alice.stdout

    as_bob = kvpn(cluster, "clean", user="bob")
    assert as_bob.returncode == 0, as_bob.stdout + as_bob.stderr
    assert "undone: delete service bob-preview" in as_bob.stdout
    assert (
        core.list_namespaced_service("default", field_selector="metadata.name=bob-preview").items
        == []
    )
    wait_for(lambda: not pod_alive(core, bob_pod), 15, "bob's shadow pod to go")

    # Alice's session still works, untouched.
    assert pod_alive(core, alice_pod)
    assert alice.proc.poll() is None
    echo_ip = core.read_namespaced_service("echo", "default").spec.cluster_ip
    answer = cluster.in_laptop(["curl", "-s", "-m", "5", f"http://{echo_ip}/"])
    assert answer.returncode == 0 and json.loads(answer.stdout)["pod"].startswith("echo-")
    assert alice.stop(signal.SIGINT) == 0, alice.output
    assert not pod_alive(core, alice_pod)
    assert not (default_journal_dir() / f"{alice_pod.removeprefix('kvpn-shadow-')}.journal").exists()
