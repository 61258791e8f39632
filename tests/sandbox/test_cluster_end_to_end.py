"""The sandbox cluster end to end: the official client from the laptop namespace, and pods."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable

import pytest
from kubernetes import client, watch
from kubernetes.client.rest import ApiException
from kubernetes.stream import portforward

from sandbox import lifecycle, network
from sandbox.config import SandboxConfig
from sandbox.controlplane import WATCH_HISTORY
from sandbox.inside_netns import inside_netns
from tests.sandbox.support import Cluster, exec_in_pod, venv_bin


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.1)


def ready_pods(core: client.CoreV1Api, ns: str, selector: str) -> list[client.V1Pod]:
    pods = core.list_namespaced_pod(ns, label_selector=selector).items
    return [
        p
        for p in pods
        if p.metadata.deletion_timestamp is None
        and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
    ]


def test_laptop_reaches_api_server_but_not_pods(cluster: Cluster, core: client.CoreV1Api) -> None:
    pods = ready_pods(core, "default", "app=echo")
    assert len(pods) == 2
    assert (
        cluster.in_laptop(
            ["curl", "-s", "-m", "5", cluster.config.apiserver_url + "/version"]
        ).returncode
        == 0
    )
    probe = cluster.in_laptop(["curl", "-s", "-m", "2", f"http://{pods[0].status.pod_ip}:8080/"])
    assert probe.returncode != 0


def test_node_reports_pod_cidrs(core: client.CoreV1Api, cluster: Cluster) -> None:
    nodes = core.list_node().items
    assert [n.spec.pod_cidrs for n in nodes] == [[str(cluster.config.node_pod_cidr)]]


def test_system_services_exist(core: client.CoreV1Api, cluster: Cluster) -> None:
    kubernetes = core.read_namespaced_service("kubernetes", "default")
    assert kubernetes.spec.cluster_ip == str(cluster.config.kubernetes_service_ip)
    dns = core.read_namespaced_service("kube-dns", "kube-system")
    assert dns.spec.cluster_ip == str(cluster.config.dns_service_ip)


def test_out_of_range_cluster_ip_names_the_range(core: client.CoreV1Api) -> None:
    body = {
        "metadata": {"name": "bad-ip"},
        "spec": {"clusterIP": "1.2.3.4", "ports": [{"port": 80}]},
    }
    with pytest.raises(ApiException) as err:
        core.create_namespaced_service("default", body)
    assert err.value.status == 422
    assert "The range of valid IPs is 10.96.0.0/12" in json.loads(err.value.body)["message"]


def test_crud_selectors_and_conflict(core: client.CoreV1Api) -> None:
    ns = "crud-" + os.urandom(3).hex()
    core.create_namespace({"metadata": {"name": ns}})
    try:
        for i, tier in enumerate(["web", "web", "db"]):
            core.create_namespaced_config_map(
                ns,
                {"metadata": {"name": f"cm{i}", "labels": {"tier": tier}}, "data": {"i": str(i)}},
            )
        names = [
            c.metadata.name
            for c in core.list_namespaced_config_map(ns, label_selector="tier=web").items
        ]
        assert names == ["cm0", "cm1"]
        names = [
            c.metadata.name
            for c in core.list_namespaced_config_map(ns, label_selector="tier notin (web)").items
        ]
        assert names == ["cm2"]
        cm = core.read_namespaced_config_map("cm0", ns)
        cm.data = {"i": "changed"}
        core.replace_namespaced_config_map("cm0", ns, cm)
        cm.data = {"i": "stale"}
        with pytest.raises(ApiException) as err:
            core.replace_namespaced_config_map("cm0", ns, cm)
        assert err.value.status == 409
        assert core.read_namespaced_config_map("cm0", ns).data == {"i": "changed"}
        core.delete_namespaced_config_map("cm1", ns)
        with pytest.raises(ApiException) as err:
            core.read_namespaced_config_map("cm1", ns)
        assert err.value.status == 404
    finally:
        core.delete_namespace(ns)


def test_three_patch_types(core: client.CoreV1Api) -> None:
    name = "patchme-" + os.urandom(3).hex()
    core.create_namespaced_service(
        "default",
        {
            "metadata": {"name": name, "labels": {"a": "1"}},
            "spec": {"selector": {"app": "nothing"}, "ports": [{"name": "http", "port": 80}]},
        },
    )
    try:
        # Strategic merge: the ports list is merged by its key (port).
        core.patch_namespaced_service(
            name, "default", {"spec": {"ports": [{"port": 81, "name": "alt"}]}}
        )
        ports = sorted(p.port for p in core.read_namespaced_service(name, "default").spec.ports)
        assert ports == [80, 81]
        # JSON merge patch: a list is replaced as a whole; null deletes a key.
        core.patch_namespaced_service(
            name,
            "default",
            {"metadata": {"labels": {"a": None, "b": "2"}}, "spec": {"selector": {"app": "echo"}}},
            _content_type="application/merge-patch+json",
        )
        svc = core.read_namespaced_service(name, "default")
        assert svc.metadata.labels == {"b": "2"}
        assert svc.spec.selector == {"app": "echo"}
        # JSON patch.
        core.patch_namespaced_service(
            name, "default", [{"op": "replace", "path": "/spec/selector", "value": {"app": "x"}}]
        )
        assert core.read_namespaced_service(name, "default").spec.selector == {"app": "x"}
    finally:
        core.delete_namespaced_service(name, "default")


def test_watch_resumes_from_resource_version(core: client.CoreV1Api) -> None:
    name = "watched-" + os.urandom(3).hex()
    created = core.create_namespaced_config_map(
        "default", {"metadata": {"name": name}, "data": {"v": "1"}}
    )
    start_rv = created.metadata.resource_version
    core.patch_namespaced_config_map(name, "default", {"data": {"v": "2"}})
    core.delete_namespaced_config_map(name, "default")
    seen = []
    w = watch.Watch()
    for event in w.stream(
        core.list_namespaced_config_map,
        "default",
        resource_version=start_rv,
        field_selector=f"metadata.name={name}",
        timeout_seconds=5,
    ):
        seen.append((event["type"], event["object"].data))
        if event["type"] == "DELETED":
            w.stop()
    assert seen == [("MODIFIED", {"v": "2"}), ("DELETED", {"v": "2"})]


def test_watch_too_old_is_gone(core: client.CoreV1Api) -> None:
    """Like a real API server's watch cache, only the latest events can be resumed from."""
    name = "churn-" + os.urandom(3).hex()
    first = core.create_namespaced_config_map("default", {"metadata": {"name": name}})
    for i in range(WATCH_HISTORY + 1):
        core.patch_namespaced_config_map(name, "default", {"data": {"i": str(i)}})
    core.delete_namespaced_config_map(name, "default")
    with pytest.raises(ApiException) as err:
        for _ in watch.Watch().stream(
            core.list_namespaced_config_map,
            "default",
            resource_version=first.metadata.resource_version,
            timeout_seconds=2,
        ):
            pass
    assert err.value.status == 410


def test_exec_stdout_stderr_exit_code(cluster: Cluster, core: client.CoreV1Api) -> None:
    pod = ready_pods(core, "default", "app=echo")[0].metadata.name
    out, err, code = exec_in_pod(
        cluster, "default", pod, ["sh", "-c", "echo out; echo err >&2; exit 3"]
    )
    assert (out, err, code) == ("out\n", "err\n", 3)
    out, _, code = exec_in_pod(cluster, "default", pod, ["sh", "-c", "echo ok"])
    assert (out, code) == ("ok\n", 0)


def test_port_forward_carries_a_megabyte_each_way(cluster: Cluster, core: client.CoreV1Api) -> None:
    """A pod running a TCP echo; 1 MB through the API server's port-forward comes back intact."""
    name = "pf-" + os.urandom(3).hex()
    script = (
        "import socket\n"
        "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('0.0.0.0', 9000)); s.listen()\n"
        "while True:\n"
        "    c,_=s.accept()\n"
        "    while (d:=c.recv(65536)): c.sendall(d)\n"
        "    c.close()\n"
    )
    core.create_namespaced_pod(
        "default",
        {
            "metadata": {"name": name},
            "spec": {
                "containers": [
                    {
                        "name": "echo",
                        "image": "python",
                        "command": ["python3", "-c", script],
                        "readinessProbe": {"tcpSocket": {"port": 9000}, "periodSeconds": 1},
                    }
                ]
            },
        },
    )
    try:
        wait_for(
            lambda: (
                ready_pods(core, "default", "")
                and any(p.metadata.name == name for p in ready_pods(core, "default", ""))
            ),
            what="pf pod ready",
        )
        payload = os.urandom(1 << 20)
        with inside_netns(cluster.config.laptop_netns):
            pf = portforward(
                core.connect_get_namespaced_pod_portforward, name, "default", ports="9000"
            )
        sock = pf.socket(9000)
        sock.setblocking(True)
        received = bytearray()

        def reader() -> None:
            while len(received) < len(payload):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received.extend(chunk)

        t = threading.Thread(target=reader)
        t.start()
        sock.sendall(payload)
        t.join(60)
        sock.close()
        pf.close()
        assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest()
    finally:
        core.delete_namespaced_pod(name, "default", grace_period_seconds=0)


def _curl_from_pod(cluster: Cluster, pod: str, url: str) -> dict[str, object]:
    out, err, code = exec_in_pod(cluster, "default", pod, ["curl", "-s", "-m", "5", url])
    assert code == 0, err
    return json.loads(out)


def _answering_pod(cluster: Cluster, pod: str, url: str) -> object:
    """The pod that answered ``url`` from inside ``pod``, or None while nothing answers."""
    out, _, code = exec_in_pod(cluster, "default", pod, ["curl", "-s", "-m", "2", url])
    return json.loads(out)["pod"] if code == 0 else None


def test_cluster_ip_and_selector_change(cluster: Cluster, core: client.CoreV1Api) -> None:
    pods = ready_pods(core, "default", "app=echo")
    client_pod = pods[0].metadata.name
    ip = core.read_namespaced_service("echo", "default").spec.cluster_ip
    answers = {_curl_from_pod(cluster, client_pod, f"http://{ip}/")["pod"] for _ in range(12)}
    assert answers == {p.metadata.name for p in pods}

    # Point a new service at one pod only, then re-point it at the other.
    name = "pick-" + os.urandom(3).hex()
    first, second = pods[0].metadata.name, pods[1].metadata.name
    core.patch_namespaced_pod(first, "default", {"metadata": {"labels": {"pick": "first"}}})
    core.patch_namespaced_pod(second, "default", {"metadata": {"labels": {"pick": "second"}}})
    svc = core.create_namespaced_service(
        "default",
        {
            "metadata": {"name": name},
            "spec": {"selector": {"pick": "first"}, "ports": [{"port": 80, "targetPort": 8080}]},
        },
    )
    try:
        url = f"http://{svc.spec.cluster_ip}/"
        wait_for(lambda: _answering_pod(cluster, client_pod, url) == first, what="first")
        core.patch_namespaced_service(name, "default", {"spec": {"selector": {"pick": "second"}}})
        t0 = time.monotonic()
        wait_for(lambda: _answering_pod(cluster, client_pod, url) == second, what="re-point")
        assert time.monotonic() - t0 < 5
    finally:
        core.delete_namespaced_service(name, "default")


def test_dns_resolves_services_from_a_pod(cluster: Cluster, core: client.CoreV1Api) -> None:
    pod = ready_pods(core, "default", "app=echo")[0].metadata.name
    ip = core.read_namespaced_service("echo", "default").spec.cluster_ip
    for name in ("echo", "echo.default", "echo.default.svc.cluster.local"):
        out, err, code = exec_in_pod(cluster, "default", pod, ["getent", "hosts", name])
        assert code == 0, (name, err)
        assert out.split()[0] == ip
    out, _, code = exec_in_pod(cluster, "default", pod, ["getent", "hosts", "kube-dns.kube-system"])
    assert code == 0 and out.split()[0] == str(cluster.config.dns_service_ip)
    # Names outside the cluster are forwarded to the outside world.
    out, _, code = exec_in_pod(cluster, "default", pod, ["getent", "hosts", "example.test"])
    assert code == 0 and out.split()[0] == "198.18.0.80"


def test_laptop_resolves_outside_names(cluster: Cluster) -> None:
    result = cluster.in_laptop(["getent", "hosts", "example.test"])
    assert result.returncode == 0 and result.stdout.split()[0] == "198.18.0.80"


def test_scaling_adds_and_removes_pods(apps: client.AppsV1Api, core: client.CoreV1Api) -> None:
    name = "scaled-" + os.urandom(3).hex()
    labels = {"app": name}
    apps.create_namespaced_deployment(
        "default",
        {
            "metadata": {"name": name},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "containers": [
                            {"name": "sleep", "image": "busybox", "command": ["sleep", "600"]}
                        ],
                        "terminationGracePeriodSeconds": 1,
                    },
                },
            },
        },
    )
    try:
        wait_for(lambda: len(ready_pods(core, "default", f"app={name}")) == 1, what="1 pod")
        apps.patch_namespaced_deployment_scale(name, "default", {"spec": {"replicas": 3}})
        wait_for(lambda: len(ready_pods(core, "default", f"app={name}")) == 3, what="3 pods")
        apps.patch_namespaced_deployment_scale(name, "default", {"spec": {"replicas": 1}})
        wait_for(
            lambda: (
                len(core.list_namespaced_pod("default", label_selector=f"app={name}").items) == 1
            ),
            what="back to 1",
        )
        assert apps.read_namespaced_deployment_scale(name, "default").spec.replicas == 1
    finally:
        apps.delete_namespaced_deployment(name, "default")
    wait_for(
        lambda: not core.list_namespaced_pod("default", label_selector=f"app={name}").items,
        what="gc",
    )


def test_second_sandbox_runs_beside_and_down_leaves_nothing(cluster: Cluster) -> None:
    name = f"u{os.getpid() % 100000}"
    env = dict(os.environ)
    result = subprocess.run(
        [venv_bin("kvpn-sandbox"), "up", "--name", name, "--apiserver-address", "10.96.0.50"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )
    try:
        assert result.returncode == 0, result.stderr
        lines = dict(line.split("=", 1) for line in result.stdout.splitlines())
        assert set(lines) == {"KUBECONFIG", "LAPTOP_NETNS", "NODE_NETNS"}
        config = SandboxConfig(name=name)
        assert lifecycle.is_running(config)
        # The first sandbox is unaffected.
        assert (
            cluster.in_laptop(
                ["curl", "-s", "-m", "5", cluster.config.apiserver_url + "/version"]
            ).returncode
            == 0
        )
        with inside_netns(lines["LAPTOP_NETNS"]):
            s = socket.create_connection(("10.96.0.50", 6443), timeout=5)
            s.close()
    finally:
        down = subprocess.run(
            [venv_bin("kvpn-sandbox"), "down", "--name", name],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert down.returncode == 0, down.stderr
    assert network.list_netns(f"kvpn-{name}-") == []
    assert not os.path.exists(f"/etc/netns/kvpn-{name}-laptop")
    assert not os.path.exists(f"/run/kvpn-sandbox/{name}")
    leftover = subprocess.run(
        ["pgrep", "-f", f"/run/kvpn-sandbox/{name}"], capture_output=True, check=False
    )
    assert leftover.returncode == 1


def test_sandbox_cli_lists_and_execs(cluster: Cluster, core: client.CoreV1Api) -> None:
    name = cluster.config.name
    listing = subprocess.run(
        [venv_bin("kvpn-sandbox"), "get", "pods", "--name", name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listing.returncode == 0, listing.stderr
    pod = ready_pods(core, "default", "app=echo")[0].metadata.name
    assert pod in listing.stdout
    result = subprocess.run(
        [
            venv_bin("kvpn-sandbox"),
            "exec",
            "--name",
            name,
            pod,
            "--",
            "sh",
            "-c",
            "echo hi; exit 4",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.stdout, result.returncode) == ("hi\n", 4)
