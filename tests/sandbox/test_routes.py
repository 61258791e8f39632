"""Route discovery, planning and `kvpn routes` against sandbox clusters, end to end.

The test thread runs inside the session sandbox's laptop namespace (see conftest.py); the
second sandbox (API server inside the service CIDR) is entered with ``inside_netns``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes import client
from kubernetes import config as kube_config
from kubernetes.client.exceptions import ApiException

from kvpn.cli.routes_command import run_routes
from kvpn.routes.discovery import discover, list_all
from kvpn.routes.explain import Verdict, explain
from kvpn.routes.local_routes import read_local_routes
from kvpn.routes.plan import ExclusionReason, RoutePlan, plan_routes
from sandbox import lifecycle
from sandbox.config import NODE_LINK_ADDRESS, SandboxConfig
from sandbox.inside_netns import inside_netns
from tests.sandbox.support import Cluster

pytestmark = pytest.mark.sandbox

SERVICE_CIDR = IPv4Network("10.96.0.0/12")
API_INSIDE = IPv4Address("10.96.0.50")


@pytest.fixture(scope="module")
def host_network_pod(core: Any) -> Iterator[str]:
    """A running hostNetwork pod: its IP is the node's address, 172.31.255.1."""
    name = "routes-hostnet-" + os.urandom(3).hex()
    core.create_namespaced_pod(
        "default",
        {
            "metadata": {"name": name},
            "spec": {
                "hostNetwork": True,
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "c", "image": "busybox", "command": ["sleep", "600"]}],
            },
        },
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pod = core.read_namespaced_pod(name, "default")
            if pod.status.pod_ip:
                assert pod.status.pod_ip == str(NODE_LINK_ADDRESS)
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"hostNetwork pod {name} got no IP")
        yield name
    finally:
        try:
            core.delete_namespaced_pod(name, "default", grace_period_seconds=0)
        except ApiException as exc:
            if exc.status != 404:
                raise


class NodesWithoutPodCidrs:
    """A CoreV1Api whose nodes hide spec.podCIDRs (as with many CNIs), or are forbidden."""

    def __init__(self, core: client.CoreV1Api, *, forbid_nodes: bool) -> None:
        self._core = core
        self._forbid = forbid_nodes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)

    def list_node(self, **kw: Any) -> Any:
        if self._forbid:
            raise ApiException(status=403, reason="Forbidden")
        listed = self._core.list_node(**kw)
        items = [
            SimpleNamespace(spec=SimpleNamespace(pod_cidrs=None, pod_cidr=None), status=n.status)
            for n in listed.items
        ]
        return SimpleNamespace(items=items, metadata=listed.metadata)


def test_discovery_finds_the_node_pod_cidr_and_the_service_cidr(
    cluster: Cluster, core: client.CoreV1Api, host_network_pod: str
) -> None:
    found = discover(core, "default")
    assert found.pod_cidrs == (cluster.config.node_pod_cidr,)
    assert found.service_cidrs == (SERVICE_CIDR,)
    assert found.pod_source == "node.spec.podCIDRs"
    assert found.service_source == "the API server's range error"
    assert found.notes == ()


@pytest.mark.parametrize("forbid_nodes", [False, True], ids=["no-podCIDRs", "nodes-forbidden"])
def test_host_network_pods_do_not_leak_into_the_pod_cidr_fallback(
    cluster: Cluster, core: client.CoreV1Api, host_network_pod: str, forbid_nodes: bool
) -> None:
    found = discover(NodesWithoutPodCidrs(core, forbid_nodes=forbid_nodes), "default", page_size=2)
    (pod_cidr,) = found.pod_cidrs
    assert NODE_LINK_ADDRESS not in pod_cidr
    assert cluster.config.node_pod_cidr.supernet_of(pod_cidr)
    assert "hostNetwork pods left out" in found.pod_source


def test_lists_follow_continue_tokens(core: Any, host_network_pod: str) -> None:
    everything = core.list_pod_for_all_namespaces().items
    assert len(everything) >= 3
    paged = list_all(core.list_pod_for_all_namespaces, page_size=1)
    assert isinstance(paged, list)
    assert sorted(p.metadata.uid for p in paged) == sorted(p.metadata.uid for p in everything)


def test_plan_and_explain_in_the_session_sandbox(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kubeconfig = str(cluster.config.kubeconfig_path)
    assert (
        run_routes(kubeconfig=kubeconfig, context=None, namespace=None, sessions_dir=tmp_path) == 0
    )
    out = capsys.readouterr().out
    assert f"{cluster.config.node_pod_cidr}  pod" in out
    assert "10.96.0.0/12   service" in out
    assert f"{NODE_LINK_ADDRESS}/32  api-server" in out and "nothing to split" in out

    service_ip = cluster.config.dns_service_ip
    run_routes(
        kubeconfig=kubeconfig,
        context=None,
        namespace=None,
        explain=str(service_ip),
        sessions_dir=tmp_path,
    )
    assert capsys.readouterr().out.strip() == (
        f"{service_ip} goes through kvpn: it is inside service CIDR 10.96.0.0/12, and the "
        "kernel would pick 10.96.0.0/12 dev kvpn0, one of the prefixes kvpn installs."
    )


@pytest.fixture(scope="module")
def apiserver_in_service_cidr(cluster: Cluster) -> Iterator[SandboxConfig]:
    """A second sandbox whose API server listens on 10.96.0.50, inside its service CIDR."""
    config = SandboxConfig(
        name=f"rt{os.getpid() % 100000}",
        apiserver_address=API_INSIDE,
        netns_prefix_base="kvpnt-",
    )
    try:
        lifecycle.start(config)
        yield config
    finally:
        lifecycle.stop(config)


def test_apiserver_inside_the_service_cidr_is_excluded(
    apiserver_in_service_cidr: SandboxConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = apiserver_in_service_cidr
    kubeconfig = str(config.kubeconfig_path)
    with inside_netns(config.laptop_netns):
        api = kube_config.new_client_from_config(kubeconfig)  # type: ignore[no-untyped-call]
        try:
            found = discover(client.CoreV1Api(api), "default")
        finally:
            api.close()
        local = read_local_routes()
        code = run_routes(
            kubeconfig=kubeconfig, context=None, namespace=None, output="json",
            sessions_dir=tmp_path,
        )  # fmt: skip
        plan_json = json.loads(capsys.readouterr().out)
        run_routes(
            kubeconfig=kubeconfig, context=None, namespace=None, explain=str(API_INSIDE),
            sessions_dir=tmp_path,
        )  # fmt: skip
        explained = capsys.readouterr().out.strip()

    assert found.service_cidrs == (SERVICE_CIDR,)
    # The laptop reaches this API server through a host route inside the service CIDR.
    assert any(r.dst == IPv4Network(API_INSIDE) and r.dev == "eth0" for r in local)

    plan = plan_routes(found, apiserver_addresses=[API_INSIDE], local_routes=local)
    assert list(plan.installed) == sorted(
        [config.node_pod_cidr, *SERVICE_CIDR.address_exclude(IPv4Network(API_INSIDE))]
    )
    assert plan.conflicts == ()  # the host route covers only what is excluded anyway
    (exclusion,) = plan.exclusions
    assert exclusion.reason is ExclusionReason.API_SERVER
    assert exclusion.cuts == (SERVICE_CIDR,)
    explanation = explain(API_INSIDE, plan, local)
    assert explanation.verdict is Verdict.API_SERVER and not explanation.via_kvpn

    assert code == 0
    assert RoutePlan.from_json(plan_json["plan"]).installed == plan.installed
    assert plan_json["plan"]["exclusions"][0]["reason"] == "api-server"
    assert explained == (
        "10.96.0.50 does not go through kvpn: it is inside service CIDR 10.96.0.0/12 but "
        "excluded because it is the API server (http://10.96.0.50:6443): routing it into the "
        "tunnel would cut the tunnel itself. The kernel would pick 10.96.0.50/32 via "
        "172.31.255.1 dev eth0."
    )


class CountingProbeForbidden:
    """A CoreV1Api that may not create Services (no range probe) and counts list pages."""

    def __init__(self, core: client.CoreV1Api) -> None:
        self._core = core
        self.service_pages = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)

    def create_namespaced_service(self, *args: Any, **kw: Any) -> Any:
        raise ApiException(status=403, reason="Forbidden")

    def list_service_for_all_namespaces(self, **kw: Any) -> Any:
        self.service_pages += 1
        return self._core.list_service_for_all_namespaces(**kw)


def test_more_than_a_thousand_services_are_paged_through(
    apiserver_in_service_cidr: SandboxConfig,
) -> None:
    config = apiserver_in_service_cidr
    count = 1005
    with inside_netns(config.laptop_netns):
        api = kube_config.new_client_from_config(  # type: ignore[no-untyped-call]
            str(config.kubeconfig_path)
        )
        core: Any = client.CoreV1Api(api)
        try:
            for i in range(count):  # headless: no ClusterIP, nothing for kube-proxy to do
                core.create_namespaced_service(
                    "default",
                    {"metadata": {"name": f"many-{i}"},
                     "spec": {"clusterIP": "None", "ports": [{"port": 80}]}},
                )  # fmt: skip
            counting = CountingProbeForbidden(core)
            found = discover(counting, "default", page_size=400)
            everything = list_all(core.list_service_for_all_namespaces, page_size=400)
        finally:
            for i in range(count):
                try:
                    core.delete_namespaced_service(f"many-{i}", "default")
                except ApiException as exc:
                    if exc.status != 404:
                        raise
            api.close()
    assert isinstance(everything, list) and len(everything) > count
    assert counting.service_pages == 3
    (cover,) = found.service_cidrs
    assert SERVICE_CIDR.supernet_of(cover)
    assert "cannot probe the service range in namespace default (403 Forbidden)" in found.notes[0]
