"""`kvpn exchange`, `kvpn preview`, `kvpn clean` and `kvpn recover` against the sandbox.

A local HTTP server runs in the laptop namespace (the test thread lives there); kvpn runs as
a subprocess in the same namespace; requests are made from inside a cluster pod (exec).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client

from tests.sandbox import support
from tests.sandbox.support import Cluster, exec_in_pod, venv_bin

LOCAL_PORT = 8080
LOCAL_ANSWER = "hello from the laptop"
ORIGINAL_SELECTOR = {"app": "echo"}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = LOCAL_ANSWER.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def local_server(cluster: Cluster) -> Iterator[int]:
    """An HTTP server on the laptop's localhost:8080 (the test thread is in the laptop netns)."""
    server = ThreadingHTTPServer(("127.0.0.1", LOCAL_PORT), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield LOCAL_PORT
    server.shutdown()
    server.server_close()


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def client_pod(core: client.CoreV1Api) -> Iterator[str]:
    """A pod to make requests from (the echo pods go away in scale mode)."""
    name = "curl-" + os.urandom(3).hex()
    core.create_namespaced_pod(
        "default",
        {
            "metadata": {"name": name, "labels": {"app": "curl-client"}},
            "spec": {
                "containers": [
                    {
                        "name": "client",
                        "image": "python",
                        "command": ["python3", "-c", "import time; time.sleep(86400)"],
                    }
                ],
                "terminationGracePeriodSeconds": 1,
            },
        },
    )

    def running() -> bool:
        return core.read_namespaced_pod(name, "default").status.phase == "Running"

    wait_for(running, 30, "the client pod")
    yield name
    core.delete_namespaced_pod(name, "default", grace_period_seconds=0)


def curl(cluster: Cluster, pod: str, url: str) -> str:
    out, _, code = exec_in_pod(cluster, "default", pod, ["curl", "-s", "-m", "5", url])
    return out if code == 0 else f"<curl failed {code}>"


def answered_by_laptop(cluster: Cluster, pod: str, url: str = "http://echo/") -> bool:
    return curl(cluster, pod, url) == LOCAL_ANSWER


def answered_by_echo_pod(cluster: Cluster, pod: str) -> bool:
    text = curl(cluster, pod, "http://echo/")
    try:
        return str(json.loads(text).get("pod", "")).startswith("echo-")
    except ValueError:
        return False


class Kvpn(support.KvpnProcess):
    """A foreground kvpn command in the laptop namespace, its output collected by a thread."""

    def wait_line(self, prefix: str, timeout: float = 60) -> None:
        try:
            self.wait_for(prefix, timeout)
        except AssertionError:
            self.stop(signal.SIGKILL)
            pytest.fail(f"kvpn never printed {prefix!r}:\n{self.output}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        return super().stop(sig, timeout)


def kvpn(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return cluster.in_laptop(
        [venv_bin("kvpn"), *args, "--kubeconfig", str(cluster.config.kubeconfig_path)]
    )


def service_state(
    core: client.CoreV1Api, name: str = "echo"
) -> tuple[dict[str, str], dict[str, str]]:
    svc = core.read_namespaced_service(name, "default")
    kvpn_annotations = {
        k: v for k, v in (svc.metadata.annotations or {}).items() if k.startswith("kvpn.dev/")
    }
    return dict(svc.spec.selector or {}), kvpn_annotations


def kvpn_pods(core: client.CoreV1Api, kind: str) -> list[str]:
    pods = core.list_namespaced_pod(
        "default", label_selector="app.kubernetes.io/managed-by=kvpn"
    ).items
    return [
        p.metadata.name
        for p in pods
        if p.metadata.deletion_timestamp is None
        and (p.metadata.annotations or {}).get("kvpn.dev/kind") == kind
    ]


def assert_restored(cluster: Cluster, core: client.CoreV1Api, pod: str) -> None:
    assert service_state(core) == (ORIGINAL_SELECTOR, {})
    wait_for(lambda: answered_by_echo_pod(cluster, pod), 20, "the echo pods to answer again")
    assert kvpn_pods(core, "exchange") == []


def test_bad_input_is_refused_and_changes_nothing(
    cluster: Cluster, core: client.CoreV1Api, local_server: int
) -> None:
    wrong_port = kvpn(cluster, "exchange", "echo", "--expose", "8080:1234")
    assert wrong_port.returncode == 2
    assert "1234 is not a TCP port or targetPort of service default/echo" in wrong_port.stderr
    assert "Traceback" not in wrong_port.stderr
    nothing_local = kvpn(cluster, "exchange", "echo", "--expose", "9999:8080")
    assert nothing_local.returncode == 2
    assert "nothing listens on localhost:9999" in nothing_local.stderr
    missing = kvpn(cluster, "exchange", "nope", "--expose", "8080")
    assert missing.returncode == 2 and "service default/nope not found" in missing.stderr
    # --skip-port-check really skips it: the same command gets further (to the cluster).
    skipped = cluster.in_laptop(
        [venv_bin("kvpn"), "preview", "p", "--expose", "9999", "--skip-port-check",
         "--kubeconfig", "/nonexistent"]
    )  # fmt: skip
    assert skipped.returncode == 2 and "kubeconfig /nonexistent not found" in skipped.stderr
    assert service_state(core) == (ORIGINAL_SELECTOR, {})


def test_exchange_selector_mode(
    cluster: Cluster, core: client.CoreV1Api, local_server: int, client_pod: str
) -> None:
    session = Kvpn(cluster, "exchange", "echo", "--expose", "8080:8080", "--heartbeat", "1")
    try:
        session.wait_line("exchanged")
        wait_for(lambda: answered_by_laptop(cluster, client_pod), 20, "the laptop to answer")
        selector, annotations = service_state(core)
        assert list(selector) == ["kvpn.dev/exchange"]  # replaced, not merged
        assert json.loads(annotations["kvpn.dev/original-selector"]) == ORIGINAL_SELECTOR
        lock = json.loads(annotations["kvpn.dev/lock"])
        assert lock["kind"] == "exchange" and lock["mode"] == "selector"

        second = kvpn(cluster, "exchange", "echo", "--expose", "8080:8080")
        assert second.returncode == 2, second.stdout + second.stderr
        assert "already taken" in second.stderr
        assert f"{lock['user']}@{lock['host']}" in second.stderr
        assert f"since {lock['since']}" in second.stderr

        # clean and recover never touch a live session.
        assert kvpn(cluster, "clean").returncode == 0
        refused = kvpn(cluster, "recover", "echo")
        assert refused.returncode == 2 and "live session" in refused.stderr
        assert service_state(core)[0] == selector
    finally:
        code = session.stop()
    assert code == 0, session.output
    assert "restored service default/echo" in session.output
    assert_restored(cluster, core, client_pod)


def test_exchange_scale_mode(
    cluster: Cluster,
    core: client.CoreV1Api,
    apps: client.AppsV1Api,
    local_server: int,
    client_pod: str,
) -> None:
    session = Kvpn(cluster, "exchange", "echo", "--expose", "8080:8080", "--mode", "scale")
    try:
        session.wait_line("exchanged")
        deployment = apps.read_namespaced_deployment("echo", "default")
        assert deployment.spec.replicas == 0
        assert deployment.metadata.annotations["kvpn.dev/original-replicas"] == "2"
        assert service_state(core)[0] == ORIGINAL_SELECTOR  # the selector is not touched
        wait_for(lambda: answered_by_laptop(cluster, client_pod), 20, "the laptop to answer")
    finally:
        code = session.stop()
    assert code == 0, session.output
    assert "deployment default/echo: 2/2 pods ready" in session.output
    deployment = apps.read_namespaced_deployment("echo", "default")
    assert deployment.spec.replicas == 2
    assert deployment.status.ready_replicas == 2
    assert "kvpn.dev/original-replicas" not in (deployment.metadata.annotations or {})
    assert_restored(cluster, core, client_pod)


def test_kill_then_clean_and_recover(
    cluster: Cluster, core: client.CoreV1Api, local_server: int, client_pod: str
) -> None:
    for way in ("clean", "recover"):
        session = Kvpn(cluster, "exchange", "echo", "--expose", "8080", "--heartbeat", "1")
        session.wait_line("exchanged")
        session.stop(signal.SIGKILL)
        lock = json.loads(service_state(core)[1]["kvpn.dev/lock"])
        assert kvpn_pods(core, "exchange") == [f"kvpn-shadow-{lock['session']}"]
        # The lock expires 3 heartbeats (3 s) after the last one.
        time.sleep(max(0.0, lock["ttl"] + 1.5 - (time.time() % 1)))
        if way == "clean":
            dry = kvpn(cluster, "clean", "--dry-run")
            assert dry.returncode == 0, dry.stderr
            assert "would restore service default/echo (selector app=echo)" in dry.stdout
            assert "would delete shadow pod" in dry.stdout
            assert service_state(core)[1] != {}  # a dry run changes nothing
            done = kvpn(cluster, "clean")
        else:
            done = kvpn(cluster, "recover", "echo")
        assert done.returncode == 0, done.stdout + done.stderr
        assert_restored(cluster, core, client_pod)


def test_preview(
    cluster: Cluster, core: client.CoreV1Api, local_server: int, client_pod: str
) -> None:
    session = Kvpn(cluster, "preview", "laptop-preview", "--expose", "8080", "--external")
    try:
        session.wait_line("preview:")
        assert core.read_namespaced_service("laptop-preview", "default").spec.type == (
            "LoadBalancer"
        )
        wait_for(
            lambda: answered_by_laptop(cluster, client_pod, "http://laptop-preview:8080/"),
            20,
            "the preview to answer",
        )
    finally:
        code = session.stop()
    assert code == 0, session.output
    names = [s.metadata.name for s in core.list_namespaced_service("default").items]
    assert "laptop-preview" not in names
    assert kvpn_pods(core, "preview") == []
