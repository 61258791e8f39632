"""`kvpn mesh` against the sandbox: two developers share the echo Service by header.

Two laptop servers (A and B, aiohttp, in the laptop namespace where the test thread lives; A
also speaks WebSocket) and two ``kvpn mesh echo`` processes with different marks. Requests
are made from inside a cluster pod (exec), by a small Python script: marked ones must reach
their laptop server, unmarked ones the echo pods; chunked POSTs and a WebSocket upgrade go
through the router. After both leave, the Service is exactly as before.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from kubernetes import client

from kvpn.change_journal import default_journal_dir
from kvpn.shadow.mesh_names import mesh_service_name
from tests.sandbox import support
from tests.sandbox.support import Cluster, exec_in_pod, venv_bin

PORT_A, PORT_B = 18081, 18082
MARK_A, MARK_B = "alpha1", "bravo2"
NAMESPACE = "default"


# --- the laptop side -------------------------------------------------------------------------


def _app(name: str) -> web.Application:
    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str(f"{name}:{message.data}")
        return ws

    async def anything(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "server": name,
                "method": request.method,
                "body_bytes": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "transfer_encoding": request.headers.get("Transfer-Encoding", ""),
            }
        )

    app = web.Application()
    app.router.add_get("/ws", websocket)
    app.router.add_route("*", "/{tail:.*}", anything)
    return app


@pytest.fixture(scope="module")
def laptop_servers(cluster: Cluster) -> Iterator[None]:
    """Servers A and B on the laptop's localhost (the test thread is in the laptop netns)."""
    loop = asyncio.new_event_loop()
    runners: list[web.AppRunner] = []

    async def start() -> None:
        for name, port in (("A", PORT_A), ("B", PORT_B)):
            runner = web.AppRunner(_app(name))
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            runners.append(runner)

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    yield
    for runner in runners:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


# --- the cluster side ------------------------------------------------------------------------


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def client_pod(core: client.CoreV1Api) -> Iterator[str]:
    name = "mesh-client-" + os.urandom(3).hex()
    core.create_namespaced_pod(
        NAMESPACE,
        {
            "metadata": {"name": name, "labels": {"app": "mesh-client"}},
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
    wait_for(
        lambda: core.read_namespaced_pod(name, NAMESPACE).status.phase == "Running",
        30,
        "the client pod",
    )
    yield name
    core.delete_namespaced_pod(name, NAMESPACE, grace_period_seconds=0)


# Runs inside the client pod: one request per case, printed as one JSON list.
CLIENT = r"""
import base64, hashlib, http.client, json, os, socket, sys

def get(mark):
    c = http.client.HTTPConnection("echo", 80, timeout=10)
    c.request("GET", "/", headers={"version": mark} if mark else {})
    r = c.getresponse()
    return {"status": r.status, "body": json.loads(r.read())}

def post(mark):
    chunks = [os.urandom(4000 + i) for i in range(6)]
    c = http.client.HTTPConnection("echo", 80, timeout=10)
    headers = {"Version": mark} if mark else {}
    c.request("POST", "/upload", body=iter(chunks), headers=headers, encode_chunked=True)
    r = c.getresponse()
    return {"status": r.status, "body": json.loads(r.read()),
            "sha256": hashlib.sha256(b"".join(chunks)).hexdigest()}

def websocket(mark):
    s = socket.create_connection(("echo", 80), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((
        "GET /ws HTTP/1.1\r\nHost: echo\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nversion: %s\r\n\r\n"
    % (key, mark)).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        data = s.recv(1)
        if not data:
            return {"error": "closed before the response", "head": head.decode("latin-1")}
        head += data
    status = head.split(b"\r\n", 1)[0].decode()
    payload = b"ping"
    mask = os.urandom(4)
    s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask
              + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    first = s.recv(2)
    size = first[1] & 0x7F
    data = b""
    while len(data) < size:
        data += s.recv(size - len(data))
    s.close()
    return {"status": status, "message": data.decode()}

def keepalive(marks):
    c = http.client.HTTPConnection("echo", 80, timeout=10)
    seen = []
    for mark in marks.split(","):
        c.request("GET", "/", headers={"version": mark} if mark else {})
        body = json.loads(c.getresponse().read())
        seen.append(body.get("server") or ("echo" if body.get("pod", "").startswith("echo-") else "?"))
    return {"seen": seen}

def udp(payload):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(payload.encode(), ("echo", 8080))
    return {"echo": s.recvfrom(2048)[0].decode()}

cases = json.loads(sys.argv[1])
out = []
for kind, mark in cases:
    try:
        kinds = {"get": get, "post": post, "ws": websocket, "keepalive": keepalive, "udp": udp}
        out.append(kinds[kind](mark))
    except Exception as exc:
        out.append({"error": repr(exc)})
print(json.dumps(out))
"""


def run_client(cluster: Cluster, pod: str, cases: list[tuple[str, str]]) -> list[dict[str, Any]]:
    out, err, code = exec_in_pod(
        cluster, NAMESPACE, pod, ["python3", "-c", CLIENT, json.dumps(cases)]
    )
    assert code == 0, err
    return list(json.loads(out))


def answered_by(cluster: Cluster, pod: str, mark: str) -> str:
    """ "A", "B", "echo" (an echo pod), or what went wrong."""
    result = run_client(cluster, pod, [("get", mark)])[0]
    body = result.get("body") or {}
    if "server" in body:
        return str(body["server"])
    if str(body.get("pod", "")).startswith("echo-"):
        return "echo"
    return json.dumps(result)


class Kvpn(support.KvpnProcess):
    def started(self, prefix: str = "mesh: curl", timeout: float = 90) -> str:
        try:
            return self.wait_for(prefix, timeout)
        except AssertionError:
            self.stop(signal.SIGKILL)
            pytest.fail(f"kvpn never printed {prefix!r}:\n{self.output}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        return super().stop(sig, timeout)


def kvpn(cluster: Cluster, *args: str) -> Any:
    return cluster.in_laptop(
        [venv_bin("kvpn"), *args, "--kubeconfig", str(cluster.config.kubeconfig_path)]
    )


def service_snapshot(cluster: Cluster, core: client.CoreV1Api) -> dict[str, Any]:
    svc = core.read_namespaced_service("echo", NAMESPACE)
    data = cluster.api_client().sanitize_for_serialization(svc)
    meta = data["metadata"]
    return {
        "spec": data["spec"],
        "labels": meta.get("labels") or {},
        "annotations": meta.get("annotations") or {},
    }


def mesh_leftovers(core: client.CoreV1Api) -> list[str]:
    pods = core.list_namespaced_pod(
        NAMESPACE, label_selector="app.kubernetes.io/managed-by=kvpn"
    ).items
    left = [
        f"pod {p.metadata.name}"
        for p in pods
        if p.metadata.deletion_timestamp is None
        and (
            "kvpn.dev/mesh-router" in (p.metadata.labels or {})
            or (p.metadata.annotations or {}).get("kvpn.dev/kind") == "mesh"
        )
    ]
    services = core.list_namespaced_service(NAMESPACE).items
    left += [
        f"service {s.metadata.name}"
        for s in services
        if "kvpn.dev/mesh-service" in (s.metadata.labels or {})
    ]
    return left


def mesh(cluster: Cluster, port: int, mark: str, *extra: str, heartbeat: int = 1) -> Kvpn:
    return Kvpn(
        cluster, "mesh", "echo", "--expose", f"{port}:80", "--version-mark", mark,
        "--heartbeat", str(heartbeat), *extra,
    )  # fmt: skip


def journal_of(process: Kvpn) -> Any:
    """The change journal of a running mesh session (named after its session)."""
    return default_journal_dir() / (process.shadow_pod().removeprefix("kvpn-shadow-") + ".journal")


def test_two_meshes_route_by_header_and_restore(
    cluster: Cluster, core: client.CoreV1Api, laptop_servers: None, client_pod: str
) -> None:
    before = service_snapshot(cluster, core)
    first = mesh(cluster, PORT_A, MARK_A)
    second: Kvpn | None = None
    code = -1
    try:
        curl = first.started()
        assert curl == f"mesh: curl -H 'version: {MARK_A}' http://echo.default:80/"
        second = mesh(cluster, PORT_B, f"version:{MARK_B}")
        second.started()
        journals = [journal_of(first), journal_of(second)]
        assert all(j.exists() for j in journals)
        assert "router pod default/kvpn-router-echo created" in first.output
        assert "router pod default/kvpn-router-echo created" not in second.output  # joined

        wait_for(lambda: answered_by(cluster, client_pod, MARK_A) == "A", 30, "mark A -> A")
        wait_for(lambda: answered_by(cluster, client_pod, MARK_B) == "B", 30, "mark B -> B")
        cases = [
            ("get", MARK_A), ("get", MARK_B), ("get", ""), ("get", "nobody"),
            ("post", MARK_A), ("post", ""), ("ws", MARK_A),
            ("keepalive", f"{MARK_A},,{MARK_B},{MARK_A}"), ("udp", "over udp"),
        ]  # fmt: skip
        get_a, get_b, plain, unknown, post_a, post_plain, ws_a, one_connection, udp = run_client(
            cluster, client_pod, cases
        )
        assert get_a["body"]["server"] == "A", get_a
        assert get_b["body"]["server"] == "B", get_b
        for unmarked in (plain, unknown):
            assert str(unmarked["body"].get("pod", "")).startswith("echo-"), unmarked
        assert post_a["body"]["server"] == "A", post_a
        assert post_a["body"]["body_sha256"] == post_a["sha256"]
        assert post_plain["body"]["pod"].startswith("echo-"), post_plain
        assert post_plain["body"]["body_sha256"] == post_plain["sha256"]
        assert ws_a == {"status": "HTTP/1.1 101 Switching Protocols", "message": "A:ping"}
        # Routed per request, not per connection; UDP is relayed to the original pods.
        assert one_connection == {"seen": ["A", "echo", "B", "A"]}, one_connection
        assert udp == {"echo": "over udp"}, udp

        state = service_snapshot(cluster, core)
        assert state["spec"]["selector"] == {"kvpn.dev/mesh-router": "echo"}
        mesh_state = json.loads(state["annotations"]["kvpn.dev/mesh"])
        assert mesh_state["originalSelector"] == before["spec"]["selector"]
        assert mesh_state["header"] == "version"
        members = [k for k in state["annotations"] if k.startswith("kvpn.dev/mesh-member.")]
        assert len(members) == 2

        # Exchange refuses a meshed service; recover refuses while members live.
        refused = kvpn(cluster, "exchange", "echo", "--expose", f"{PORT_A}:80")
        assert refused.returncode == 2 and "is meshed by" in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        refused = kvpn(cluster, "recover", "echo")
        assert refused.returncode == 2 and "live sessions" in refused.stderr, refused.stderr
        taken = kvpn(cluster, "mesh", "echo", "--expose", f"{PORT_A}:80", "--version-mark",
                     "x-other:zz")  # fmt: skip
        assert taken.returncode == 2 and "routes on header 'version'" in taken.stderr

        # The first one leaves: the second keeps the mesh.
        assert first.stop() == 0, first.output
        assert "last member out" not in first.output
        wait_for(lambda: answered_by(cluster, client_pod, MARK_A) == "echo", 20, "A -> echo")
        assert answered_by(cluster, client_pod, MARK_B) == "B"
    finally:
        first.stop()
        if second is not None:
            code = second.stop(signal.SIGTERM)  # the last one out leaves on SIGTERM too
    assert code == 0, second.output if second else ""
    assert second is not None and "last member out" in second.output
    assert service_snapshot(cluster, core) == before
    assert not any(j.exists() for j in journals)  # normal exit: everything undone
    wait_for(lambda: not mesh_leftovers(core), 20, "the mesh objects to go")
    assert answered_by(cluster, client_pod, MARK_B) == "echo"


def test_kill_9_then_clean_at_once_replays_the_journal(
    cluster: Cluster, core: client.CoreV1Api, laptop_servers: None, client_pod: str
) -> None:
    """The member's heartbeat is still fresh (60 s): only the journal says it is dead."""
    before = service_snapshot(cluster, core)
    session = mesh(cluster, PORT_A, MARK_A, heartbeat=20)
    session.started()
    journal = journal_of(session)
    sid = journal.name.removesuffix(".journal")
    assert journal.exists()
    session.stop(signal.SIGKILL)
    assert service_snapshot(cluster, core) != before

    dry = kvpn(cluster, "clean", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    for what in (
        f"join the mesh of service default/echo (session {sid}): undo by leave_mesh",
        f"create router pod default/kvpn-router-echo (session {sid}): undo by leave_mesh",
        f"create shadow pod default/kvpn-shadow-{sid} (session {sid}): undo by delete_pod",
    ):
        assert f"would undo: {what}" in dry.stdout, dry.stdout
    assert "would restore meshed service" not in dry.stdout  # its member still looks alive
    assert service_snapshot(cluster, core)["annotations"] != before["annotations"]

    done = kvpn(cluster, "clean")
    print("\nkvpn clean said:\n" + done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    member = mesh_service_name("echo", MARK_A)
    assert f"undone: create member service default/{member} (session {sid})" in done.stdout
    assert service_snapshot(cluster, core) == before
    wait_for(lambda: not mesh_leftovers(core), 20, "the mesh objects to go")
    assert not journal.exists()
    assert answered_by(cluster, client_pod, MARK_A) == "echo"


def test_kill_then_clean_restores(
    cluster: Cluster, core: client.CoreV1Api, laptop_servers: None, client_pod: str
) -> None:
    """A session that crashed on another machine (no journal here): the cluster scan
    restores the mesh once the member's heartbeat has expired."""
    before = service_snapshot(cluster, core)
    session = mesh(cluster, PORT_A, MARK_A)
    session.started()
    journal = journal_of(session)
    session.stop(signal.SIGKILL)
    journal.unlink()
    annotations = service_snapshot(cluster, core)["annotations"]
    member = next(v for k, v in annotations.items() if k.startswith("kvpn.dev/mesh-member."))
    time.sleep(json.loads(member)["ttl"] + 1.5)
    recover = kvpn(cluster, "recover", "echo", "--dry-run")
    assert "would restore meshed service default/echo" in recover.stdout, recover.stderr
    dry = kvpn(cluster, "clean", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would restore meshed service default/echo (selector app=echo)" in dry.stdout
    assert "would delete shadow pod" in dry.stdout
    done = kvpn(cluster, "clean")
    assert done.returncode == 0, done.stdout + done.stderr
    assert service_snapshot(cluster, core) == before
    wait_for(lambda: not mesh_leftovers(core), 20, "the mesh objects to go")
    assert answered_by(cluster, client_pod, MARK_A) == "echo"


def test_manual_mode_labels_the_shadow_pod(
    cluster: Cluster, core: client.CoreV1Api, laptop_servers: None
) -> None:
    before = service_snapshot(cluster, core)
    session = mesh(cluster, PORT_A, "version:manual1", "--mode", "manual")
    try:
        session.started()
        assert "kind: VirtualService" in session.output
        pod = session.shadow_pod()
        labels = core.read_namespaced_pod(pod, NAMESPACE).metadata.labels
        assert labels["app"] == "echo" and labels["version"] == "manual1"
        assert service_snapshot(cluster, core)["spec"] == before["spec"]
    finally:
        code = session.stop()
    assert code == 0, session.output
    assert service_snapshot(cluster, core) == before
    wait_for(lambda: not mesh_leftovers(core), 20, "the shadow pod to go")
