"""The kubelet's process handling, with the real Store/Api and hostNetwork pods (no netns).

hostNetwork pods run in the kubelet's own network namespace, so these tests need neither root
nor namespaces; the pod network module is a fake that records calls.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sandbox.apiserver.api import Api
from sandbox.apiserver.resources import NAMESPACES, NODES, PODS
from sandbox.apiserver.store import Store
from sandbox.config import SandboxConfig
from sandbox.kubelet import Kubelet


@dataclass
class FakeNetwork:
    calls: list[tuple[str, ...]] = field(default_factory=list)

    def setup_pod_network(self, config: SandboxConfig, netns: str, ip: str, namespace: str) -> None:
        self.calls.append(("setup", netns, str(ip), namespace))

    def teardown_pod_network(self, config: SandboxConfig, netns: str) -> None:
        self.calls.append(("teardown", netns))


@dataclass
class Node:
    api: Api
    kubelet: Kubelet
    network: FakeNetwork
    config: SandboxConfig


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    config = SandboxConfig(name="ku", state_root=tmp_path)
    store = Store()
    api = Api(store, config)
    api.create(NAMESPACES, None, {"metadata": {"name": "default"}})
    api.create(NODES, None, {"metadata": {"name": config.node_name,
                                          "labels": {"kubernetes.io/os": "linux"}}})  # fmt: skip
    network = FakeNetwork()
    kubelet = Kubelet(api, config, network, resync_interval=0.2, backoff_base=0.2, backoff_cap=0.4)
    task = asyncio.create_task(kubelet.run())
    try:
        yield Node(api, kubelet, network, config)
    finally:
        await kubelet.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def host_pod(name: str, containers: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"hostNetwork": True, "containers": containers,
                 "terminationGracePeriodSeconds": 5, **spec},
    }  # fmt: skip


async def wait_for(
    api: Api, name: str, check: Callable[[dict[str, Any] | None], bool], timeout: float = 15
) -> dict[str, Any] | None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        pod = api.store.find(PODS, "default", name)
        if check(pod):
            return pod
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"pod {name} never matched; last seen: {pod}")
        await asyncio.sleep(0.05)


def phase(want: str) -> Callable[[dict[str, Any] | None], bool]:
    return lambda p: p is not None and p.get("status", {}).get("phase") == want


def container_state(pod: dict[str, Any] | None) -> dict[str, Any]:
    assert pod is not None
    state: dict[str, Any] = pod["status"]["containerStatuses"][0]["state"]
    return state


async def test_runs_binds_reports_env_and_logs(node: Node) -> None:
    script = "echo name=$POD_NAME ip=$MY_IP k8s=$KUBERNETES_SERVICE_HOST; exec sleep 30"
    node.api.create(PODS, "default", host_pod("sleeper", [{
        "name": "main", "image": "busybox", "command": ["sh", "-c", script],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ],
    }]))  # fmt: skip
    pod = await wait_for(
        node.api,
        "sleeper",
        lambda p: bool(p and p.get("status", {}).get("containerStatuses", [{}])[0].get("ready")),
    )
    assert pod is not None
    status = pod["status"]
    assert pod["spec"]["nodeName"] == node.config.node_name
    assert status["phase"] == "Running"
    assert status["podIP"] == str(node.config.node_address) == status["hostIP"]
    conds = {c["type"]: c["status"] for c in status["conditions"]}
    assert conds == {"Initialized": "True", "Ready": "True", "ContainersReady": "True",
                     "PodScheduled": "True"}  # fmt: skip
    cs = status["containerStatuses"][0]
    assert cs["containerID"].startswith("sandbox://") and "running" in cs["state"]
    log_path = node.kubelet.log_path(pod, "main")
    for _ in range(100):
        if log_path.exists() and log_path.read_text():
            break
        await asyncio.sleep(0.05)
    assert log_path.read_text() == f"name=sleeper ip={node.config.node_address} k8s=10.96.0.1\n"
    assert node.network.calls == []  # hostNetwork: no pod network

    # Graceful delete: SIGTERM ends `sleep`, the kubelet removes the pod from the store.
    node.api.delete(PODS, "default", "sleeper")
    await wait_for(node.api, "sleeper", lambda p: p is None)
    assert not log_path.exists()


async def test_crash_loop_back_off_and_restart_count(node: Node) -> None:
    node.api.create(
        PODS,
        "default",
        host_pod(
            "crasher",
            [{"name": "c", "image": "busybox", "command": ["sh", "-c", "echo boom; exit 2"]}],
        ),
    )
    pod = await wait_for(node.api, "crasher", lambda p: bool(
        p and p.get("status", {}).get("containerStatuses")
        and p["status"]["containerStatuses"][0]["restartCount"] >= 2))  # fmt: skip
    assert pod is not None
    cs = pod["status"]["containerStatuses"][0]
    assert cs["lastState"]["terminated"]["exitCode"] == 2
    assert pod["status"]["phase"] == "Running"
    await wait_for(
        node.api,
        "crasher",
        lambda p: (
            p is not None
            and container_state(p).get("waiting", {}).get("reason") == "CrashLoopBackOff"
        ),
    )
    previous = node.kubelet.log_source(pod, "c", previous=True)
    assert previous.path.read_text() == "boom\n"


async def test_never_policy_completes(node: Node) -> None:
    node.api.create(PODS, "default", host_pod("job", [
        {"name": "ok", "image": "busybox", "command": ["true"]},
        {"name": "bad", "image": "busybox", "command": ["sh", "-c", "exit 4"]},
    ], restartPolicy="Never"))  # fmt: skip
    pod = await wait_for(node.api, "job", phase("Failed"))
    assert pod is not None
    by_name = {c["name"]: c for c in pod["status"]["containerStatuses"]}
    assert by_name["ok"]["state"]["terminated"]["reason"] == "Completed"
    assert by_name["bad"]["state"]["terminated"]["exitCode"] == 4
    ready = {c["type"]: c for c in pod["status"]["conditions"]}["Ready"]
    assert ready["status"] == "False" and ready["reason"] == "PodCompleted"


@pytest.mark.parametrize(
    ("container", "spec", "reason"),
    [
        ({"name": "c", "image": "nginx:1.25"}, {}, "ErrImagePull"),
        ({"name": "c", "image": "kvpn-sandbox/echo"}, {"securityContext": {"runAsNonRoot": True}},
         "CreateContainerConfigError"),
    ],
)  # fmt: skip
async def test_waiting_reasons(
    node: Node, container: dict[str, Any], spec: dict[str, Any], reason: str
) -> None:
    node.api.create(PODS, "default", host_pod("w", [container], **spec))
    pod = await wait_for(node.api, "w", lambda p: p is not None and container_state(p).get(
        "waiting", {}).get("reason") == reason if p and p.get("status", {}).get(
        "containerStatuses") else False)  # fmt: skip
    assert pod is not None and pod["status"]["phase"] == "Pending"


async def test_missing_binary_is_start_error(node: Node) -> None:
    node.api.create(
        PODS,
        "default",
        host_pod(
            "nobin",
            [{"name": "c", "image": "x", "command": ["/nonexistent/prog"]}],
            restartPolicy="Never",
        ),
    )
    pod = await wait_for(node.api, "nobin", phase("Failed"))
    term = container_state(pod)["terminated"]
    assert term["reason"] == "StartError" and term["exitCode"] == 128


async def test_node_selector_mismatch_stays_unschedulable(node: Node) -> None:
    node.api.create(
        PODS,
        "default",
        host_pod(
            "picky",
            [{"name": "c", "image": "x", "command": ["true"]}],
            nodeSelector={"disk": "ssd"},
        ),
    )
    pod = await wait_for(node.api, "picky", lambda p: bool(p and p.get("status", {}).get(
        "conditions")))  # fmt: skip
    assert pod is not None and not pod["spec"].get("nodeName")
    cond = pod["status"]["conditions"][0]
    assert (cond["type"], cond["status"], cond["reason"]) == ("PodScheduled", "False",
                                                             "Unschedulable")  # fmt: skip


async def test_readiness_probe_and_forced_delete_kills(node: Node, tmp_path: Path) -> None:
    flag_file = tmp_path / "ready-flag"
    node.api.create(PODS, "default", host_pod("probed", [{
        "name": "c", "image": "x", "command": ["sleep", "30"],
        "readinessProbe": {"exec": {"command": ["test", "-e", str(flag_file)]},
                           "periodSeconds": 1},
    }]))  # fmt: skip
    pod = await wait_for(node.api, "probed", phase("Running"))
    assert pod is not None and pod["status"]["containerStatuses"][0]["ready"] is False
    flag_file.touch()
    await wait_for(
        node.api, "probed", lambda p: bool(p and p["status"]["containerStatuses"][0]["ready"])
    )
    worker = node.kubelet._workers[pod["metadata"]["uid"]]
    proc = worker.procs["c"]
    node.api.delete(PODS, "default", "probed", grace_period_seconds=0)
    await asyncio.wait_for(proc.wait(), 10)
    assert proc.returncode == -9


async def test_echo_image_runs_the_echo_server(node: Node) -> None:
    with socket.socket() as probe:  # a port free right now on loopback
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    node.api.create(PODS, "default", host_pod("echo", [{
        "name": "echo", "image": "registry.local/kvpn-sandbox/echo:dev",
        "env": [{"name": "PORT", "value": str(port)}, {"name": "HOST", "value": "127.0.0.1"},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "readinessProbe": {"httpGet": {"host": "127.0.0.1", "path": "/healthz", "port": port},
                           "periodSeconds": 1},
    }]))  # fmt: skip
    pod = await wait_for(
        node.api,
        "echo",
        lambda p: bool(p and p.get("status", {}).get("containerStatuses", [{}])[0].get("ready")),
        timeout=30,
    )
    assert pod is not None
    reader, writer = await node.kubelet.open_port(pod, port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    data = await reader.read()
    assert b'"path": "/x"' in data and b'"pod": "echo"' in data
    writer.close()
    assert sys.executable  # the image ran this interpreter


async def test_shorter_second_delete_cuts_the_grace_period(node: Node) -> None:
    node.api.create(PODS, "default", host_pod("stubborn", [{
        "name": "c", "image": "x", "command": ["sh", "-c", 'trap "" TERM; sleep 60'],
    }], terminationGracePeriodSeconds=60))  # fmt: skip
    await wait_for(node.api, "stubborn", phase("Running"))
    node.api.delete(PODS, "default", "stubborn")
    await asyncio.sleep(0.5)
    still = node.api.store.find(PODS, "default", "stubborn")
    assert still is not None and still["metadata"]["deletionGracePeriodSeconds"] == 60
    node.api.delete(PODS, "default", "stubborn", grace_period_seconds=1)
    await wait_for(node.api, "stubborn", lambda p: p is None, timeout=10)
