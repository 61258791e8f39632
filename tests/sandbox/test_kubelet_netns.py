"""The kubelet running real pods in network namespaces (needs root).

The node and pod namespaces are ``kvpnt-<name>-...`` and are removed at the end, even on
failure. The kubelet's event loop runs in a thread that has entered the node netns, as the
control plane does, so probes and connections reach pod IPs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox import network
from sandbox.apiserver.api import Api
from sandbox.apiserver.resources import NAMESPACES, NODES, PODS
from sandbox.apiserver.store import Store
from sandbox.config import SandboxConfig
from sandbox.inside_netns import inside_netns
from sandbox.kubelet import Kubelet

pytestmark = pytest.mark.sandbox


@pytest.fixture
def config(tmp_path: Path) -> Iterator[SandboxConfig]:
    cfg = SandboxConfig(
        name="k" + uuid.uuid4().hex[:8], netns_prefix_base="kvpnt-", state_root=tmp_path
    )
    try:
        network.create_topology(cfg)
        yield cfg
    finally:
        network.destroy_topology(cfg)
    assert network.list_netns(cfg.netns_prefix) == []


def run_in_node(config: SandboxConfig, scenario: Callable[[], Any]) -> None:
    """Run an async scenario on an event loop in a thread inside the node netns."""
    errors: list[BaseException] = []

    def main() -> None:
        try:
            with inside_netns(config.node_netns):
                asyncio.run(asyncio.wait_for(scenario(), 120))
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=main)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


async def wait_for(api: Api, name: str, check: Callable[[Any], bool], timeout: float = 30) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        pod = api.store.find(PODS, "default", name)
        if check(pod):
            return pod
        if loop.time() > deadline:
            raise AssertionError(f"pod {name} never matched; last seen: {pod}")
        await asyncio.sleep(0.1)


def ready(pod: Any) -> bool:
    statuses = (pod or {}).get("status", {}).get("containerStatuses") or []
    return bool(statuses) and all(s["ready"] for s in statuses)


async def run_target(target: Any) -> str:
    proc = await asyncio.create_subprocess_exec(
        *target.argv, env=target.env, cwd=target.cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return out.decode()


def test_pods_run_in_their_own_netns(config: SandboxConfig) -> None:
    async def scenario() -> None:
        api = Api(Store(), config)
        api.create(NAMESPACES, None, {"metadata": {"name": "default"}})
        api.create(NODES, None, {"metadata": {"name": config.node_name}})
        kubelet = Kubelet(api, config, network, resync_interval=0.5)
        task = asyncio.create_task(kubelet.run())
        try:
            api.create(PODS, "default", {
                "metadata": {"name": "echo"},
                "spec": {"terminationGracePeriodSeconds": 5, "containers": [{
                    "name": "echo", "image": "kvpn-sandbox/echo:latest",
                    "env": [{"name": "POD_NAME",
                             "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 1},
                }]},
            })  # fmt: skip
            api.create(PODS, "default", {
                "metadata": {"name": "nobody"},
                "spec": {"terminationGracePeriodSeconds": 5,
                         "securityContext": {"runAsUser": 65534, "runAsGroup": 65534},
                         "containers": [{"name": "c", "image": "busybox",
                                         "command": ["sh", "-c", "id -u; id -g; exec sleep 60"]}]},
            })  # fmt: skip
            pod = await wait_for(api, "echo", ready)
            ip = ipaddress.IPv4Address(pod["status"]["podIP"])
            assert ip in config.node_pod_cidr and ip != config.pod_gateway
            netns = kubelet.pod_netns(pod)
            assert network.netns_exists(netns)

            # The pod IP answers from the node, like from any other node process.
            reader, writer = await asyncio.open_connection(str(ip), 8080)
            writer.write(b"GET /hi HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            body = (await reader.read()).split(b"\r\n\r\n", 1)[1]
            writer.close()
            info = json.loads(body)
            assert info["pod"] == "echo" and info["path"] == "/hi"
            assert info["client_address"] == str(config.pod_gateway)

            # exec runs inside the pod's netns and sees its eth0 and resolv.conf.
            out = await run_target(kubelet.exec_target(pod, "echo", [
                "sh", "-c", "ip -4 -o addr show eth0; cat /etc/resolv.conf"]))  # fmt: skip
            assert f"inet {ip}/32" in out
            assert f"nameserver {config.dns_service_ip}" in out
            assert "search default.svc.cluster.local" in out

            # port-forward's connection is made to localhost inside the pod.
            reader, writer = await kubelet.open_port(pod, 8080)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert b'"client_address": "127.0.0.1"' in await reader.read()
            writer.close()

            # runAsUser/runAsGroup through setpriv.
            other = await wait_for(api, "nobody", ready)
            log_path = kubelet.log_path(other, "c")
            for _ in range(100):
                if log_path.exists() and log_path.read_text().count("\n") >= 2:
                    break
                await asyncio.sleep(0.05)
            assert log_path.read_text() == "65534\n65534\n"
            assert other["status"]["podIP"] != pod["status"]["podIP"]

            # Graceful deletion: processes stopped, netns gone, pod removed from the store.
            api.delete(PODS, "default", "echo")
            api.delete(PODS, "default", "nobody")
            await wait_for(api, "echo", lambda p: p is None)
            await wait_for(api, "nobody", lambda p: p is None)
            assert not network.netns_exists(netns)
            assert network.list_netns(config.netns_prefix + "pod-") == []
        finally:
            await kubelet.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run_in_node(config, scenario)
