"""`kvpn connect` from the laptop namespace to the sandbox cluster, end to end."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from kubernetes import client

from sandbox.inside_netns import inside_netns
from tests.sandbox.support import Cluster, KvpnProcess, venv_bin

TARGETS_SCRIPT = r"""
import hashlib, socket, threading
def echo(c):
    while (d := c.recv(65536)):
        c.sendall(d)
    c.close()
def digest(c):
    h = hashlib.sha256(); n = 0
    while (d := c.recv(65536)):
        h.update(d); n += len(d)
    c.sendall(f"{n} {h.hexdigest()}\n".encode()); c.close()
def serve(port, handler):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(512)
    while True:
        c, _ = s.accept()
        threading.Thread(target=handler, args=(c,), daemon=True).start()
threading.Thread(target=serve, args=(9000, echo), daemon=True).start()
serve(9001, digest)
"""


def _ready(core: client.CoreV1Api, ns: str, name: str) -> client.V1Pod | None:
    pod = core.read_namespaced_pod(name, ns)
    ok = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
    return pod if ok else None


@pytest.fixture(scope="module")
def targets(core: client.CoreV1Api) -> Iterator[str]:
    """A pod with a TCP echo on 9000 and a read-to-EOF-then-digest server on 9001."""
    name = "targets-" + os.urandom(3).hex()
    core.create_namespaced_pod(
        "default",
        {
            "metadata": {"name": name, "labels": {"app": "targets"}},
            "spec": {
                "containers": [
                    {
                        "name": "targets",
                        "image": "python",
                        "command": ["python3", "-c", TARGETS_SCRIPT],
                        "readinessProbe": {"tcpSocket": {"port": 9001}, "periodSeconds": 1},
                    }
                ],
                "terminationGracePeriodSeconds": 1,
            },
        },
    )
    deadline = time.monotonic() + 30
    pod = None
    while pod is None and time.monotonic() < deadline:
        pod = _ready(core, "default", name)
        time.sleep(0.2)
    assert pod is not None, "targets pod not ready"
    yield pod.status.pod_ip
    core.delete_namespaced_pod(name, "default", grace_period_seconds=0)


@pytest.fixture(scope="module")
def connected(cluster: Cluster, core: client.CoreV1Api) -> Iterator[KvpnProcess]:
    kvpn = KvpnProcess(cluster, "connect")
    try:
        kvpn.wait_for("connected")
    except AssertionError:
        kvpn.stop(signal.SIGKILL)
        pytest.fail("kvpn connect did not connect:\n" + kvpn.output)
    try:
        yield kvpn
    finally:
        code = kvpn.stop(signal.SIGINT)
    assert code == 0, kvpn.output
    # Nothing is left: no TUN device, no route through it, no shadow pod.
    tun_devices = cluster.in_laptop(["ip", "-o", "link", "show", "type", "tun"]).stdout
    assert tun_devices == ""
    routes = cluster.in_laptop(["ip", "route"]).stdout
    assert "kvpn0" not in routes
    left = core.list_namespaced_pod(
        "default", label_selector="app.kubernetes.io/managed-by=kvpn"
    ).items
    assert [p.metadata.name for p in left if p.metadata.deletion_timestamp is None] == []


def _http_get(cluster: Cluster, url: str) -> dict[str, object]:
    with inside_netns(cluster.config.laptop_netns):
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = resp.read()
    return json.loads(body)


def test_curl_cluster_ip_and_pod_ip(
    cluster: Cluster, core: client.CoreV1Api, connected: object
) -> None:
    ip = core.read_namespaced_service("echo", "default").spec.cluster_ip
    result = cluster.in_laptop(["curl", "-s", "-m", "10", f"http://{ip}/"])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pod"].startswith("echo-")
    pod = core.list_namespaced_pod("default", label_selector="app=echo").items[0]
    answer = _http_get(cluster, f"http://{pod.status.pod_ip}:8080/")
    assert answer["pod"] == pod.metadata.name


def test_twenty_megabytes_each_way(cluster: Cluster, targets: str, connected: object) -> None:
    payload = os.urandom(20 << 20)
    received = bytearray()
    with inside_netns(cluster.config.laptop_netns):
        sock = socket.create_connection((targets, 9000), timeout=30)

    def reader() -> None:
        while len(received) < len(payload):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            received.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    sock.sendall(payload)
    t.join(120)
    sock.close()
    assert len(received) == len(payload)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def test_half_closed_stream_still_gets_the_reply(
    cluster: Cluster, targets: str, connected: object
) -> None:
    data = os.urandom(300_000)
    with inside_netns(cluster.config.laptop_netns):
        sock = socket.create_connection((targets, 9001), timeout=10)
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    reply = b""
    while chunk := sock.recv(4096):
        reply += chunk
    sock.close()
    assert reply.decode() == f"{len(data)} {hashlib.sha256(data).hexdigest()}\n"


def test_closed_port_is_refused_fast(cluster: Cluster, targets: str, connected: object) -> None:
    with inside_netns(cluster.config.laptop_netns):
        sock = socket.socket()
    sock.settimeout(5)
    t0 = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        sock.connect((targets, 9999))
    assert time.monotonic() - t0 < 1.0
    sock.close()


def test_udp_echo_through_the_service(
    cluster: Cluster, core: client.CoreV1Api, connected: object
) -> None:
    ip = core.read_namespaced_service("echo", "default").spec.cluster_ip
    with inside_netns(cluster.config.laptop_netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    sock.sendto(b"hello udp", (ip, 8080))
    data, _ = sock.recvfrom(2048)
    assert data == b"hello udp"
    sock.close()


def test_udp_to_closed_port_is_unreachable(
    cluster: Cluster, targets: str, connected: object
) -> None:
    with inside_netns(cluster.config.laptop_netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    sock.connect((targets, 9999))
    sock.send(b"anyone?")
    with pytest.raises(ConnectionRefusedError):
        sock.recv(100)
    sock.close()


def test_ping_a_pod(cluster: Cluster, targets: str, connected: object) -> None:
    result = cluster.in_laptop(["ping", "-c", "2", "-W", "3", targets])
    assert result.returncode == 0, result.stdout + result.stderr


def test_two_hundred_concurrent_connections(
    cluster: Cluster, targets: str, connected: object
) -> None:
    async def one(i: int) -> bytes:
        reader, writer = await asyncio.open_connection(sock=socks[i])
        msg = f"hello {i}\n".encode()
        writer.write(msg)
        got = await reader.readexactly(len(msg))
        writer.close()
        return got

    async def main() -> list[bytes]:
        return await asyncio.gather(*(one(i) for i in range(200)))

    socks = []
    with inside_netns(cluster.config.laptop_netns):
        for _ in range(200):
            s = socket.socket()
            s.setblocking(False)
            socks.append(s)
    # Connect from this thread's original namespace: the sockets keep the laptop's.
    for s in socks:
        s.setblocking(True)
        s.settimeout(30)
    threads = []
    errors: list[BaseException] = []

    def connect(s: socket.socket) -> None:
        try:
            s.connect((targets, 9000))
        except OSError as exc:
            errors.append(exc)

    for s in socks:
        th = threading.Thread(target=connect, args=(s,))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    assert errors == []
    for s in socks:
        s.setblocking(False)
    answers = asyncio.run(main())
    assert answers == [f"hello {i}\n".encode() for i in range(200)]


def test_routes_explain_the_live_session(cluster: Cluster, targets: str, connected: object) -> None:
    kubeconfig = str(cluster.config.kubeconfig_path)
    result = cluster.in_laptop(
        [venv_bin("kvpn"), "routes", "--kubeconfig", kubeconfig, "--output", "json"]
    )
    assert result.returncode == 0, result.stderr
    live = json.loads(result.stdout)
    text = json.dumps(live)
    assert "10.244.0.0/24" in text and "10.96.0.0/12" in text
    through = cluster.in_laptop(
        [venv_bin("kvpn"), "routes", "--kubeconfig", kubeconfig, "--explain", targets]
    )
    assert through.returncode == 0, through.stderr
    assert "kvpn0" in through.stdout
    api = cluster.in_laptop(
        [venv_bin("kvpn"), "routes", "--kubeconfig", kubeconfig, "--explain", "172.31.255.1"]
    )
    assert api.returncode == 0, api.stderr
    assert "API server" in api.stdout or "api-server" in api.stdout
