"""kube-proxy's pure part: Services + Endpoints -> plan -> nftables text; and its adapter."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox.apiserver.resources import CONFIGMAPS, ENDPOINTS, SERVICES, ResourceType
from sandbox.apiserver.store import Store
from sandbox.config import SandboxConfig
from sandbox.kube_proxy import (
    Backend,
    Frontend,
    KubeProxy,
    plan_ruleset,
    render_ruleset,
    stale_udp_flows,
)

CONFIG = SandboxConfig(name="unit", netns_prefix_base="kvpnt-")


def service(
    name: str,
    cluster_ip: str | None,
    ports: list[dict[str, Any]],
    *,
    type_: str = "ClusterIP",
    namespace: str = "default",
) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": type_, "ports": ports}
    if cluster_ip is not None:
        spec["clusterIP"] = cluster_ip
    return {"metadata": {"namespace": namespace, "name": name}, "spec": spec}


def endpoints(name: str, *subsets: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": name}, "subsets": list(subsets)}


def subset(
    ips: list[str],
    ports: list[dict[str, Any]],
    not_ready: list[str] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    out: dict[str, Any] = {"addresses": [{"ip": ip} for ip in ips], "ports": ports}
    if not_ready:
        out["notReadyAddresses"] = [{"ip": ip} for ip in not_ready]
    return out


def chain_body(text: str, chain: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(f"\tchain {chain} {{")
    end = lines.index("\t}", start)
    return [line.strip() for line in lines[start + 1 : end]]


def test_golden_single_backend_service() -> None:
    text = render_ruleset(
        CONFIG,
        [service("web", "10.96.0.50", [{"port": 80, "targetPort": 8080}])],
        [endpoints("web", subset(["10.244.0.5"], [{"port": 8080, "protocol": "TCP"}]))],
    )
    plan = plan_ruleset(
        CONFIG,
        [service("web", "10.96.0.50", [{"port": 80, "targetPort": 8080}])],
        [endpoints("web", subset(["10.244.0.5"], [{"port": 8080, "protocol": "TCP"}]))],
    )
    port = plan.ports[0]
    ep_chain = port.backend_chain(Backend(ipaddress.IPv4Address("10.244.0.5"), 8080))
    assert text == (
        "table ip kvpn_proxy\n"
        "delete table ip kvpn_proxy\n"
        "table ip kvpn_proxy {\n"
        "\tchain nat_prerouting {\n"
        "\t\ttype nat hook prerouting priority dstnat; policy accept;\n"
        "\t\tjump services\n"
        "\t}\n"
        "\tchain nat_output {\n"
        "\t\ttype nat hook output priority -100; policy accept;\n"
        "\t\tjump services\n"
        "\t}\n"
        "\tchain nat_postrouting {\n"
        "\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
        '\t\tmeta mark & 0x4000 == 0x4000 oifname != "lo" snat ip to 10.244.0.1\n'
        "\t}\n"
        "\tchain filter_forward {\n"
        "\t\ttype filter hook forward priority filter; policy accept;\n"
        "\t\tip daddr { 10.96.0.50 } jump reject_unserved\n"
        "\t}\n"
        "\tchain filter_output {\n"
        "\t\ttype filter hook output priority filter; policy accept;\n"
        "\t\tip daddr { 10.96.0.50 } jump reject_unserved\n"
        "\t}\n"
        "\tchain reject_unserved {\n"
        "\t\tmeta l4proto tcp reject with tcp reset\n"
        "\t\treject\n"
        "\t}\n"
        "\tchain services {\n"
        f'\t\tip daddr 10.96.0.50 tcp dport 80 goto {port.chain} comment "default/web/tcp"\n'
        "\t}\n"
        f"\tchain {port.chain} {{\n"
        f"\t\tgoto {ep_chain}\n"
        "\t}\n"
        f"\tchain {ep_chain} {{\n"
        "\t\tip saddr 10.244.0.5 meta mark set meta mark | 0x4000\n"
        "\t\tmeta l4proto tcp dnat ip to 10.244.0.5:8080\n"
        "\t}\n"
        "}\n"
    )


def test_two_ready_backends_random_pick_and_hairpin_marks() -> None:
    svcs = [service("echo", "10.96.0.20", [{"name": "http", "port": 80, "targetPort": "http"}])]
    eps = [
        endpoints(
            "echo",
            subset(
                ["10.244.0.6", "10.244.0.5"],
                [{"name": "http", "port": 8080, "protocol": "TCP"}],
                not_ready=["10.244.0.9"],
            ),
        )
    ]
    plan = plan_ruleset(CONFIG, svcs, eps)
    text = render_ruleset(CONFIG, svcs, eps)
    (port,) = plan.ports
    assert [str(b) for b in port.backends] == ["10.244.0.5:8080", "10.244.0.6:8080"]
    b5, b6 = port.backends
    assert chain_body(text, port.chain) == [
        f"numgen random mod 2 vmap {{ 0 : goto {port.backend_chain(b5)}, "
        f"1 : goto {port.backend_chain(b6)} }}"
    ]
    assert chain_body(text, port.backend_chain(b6)) == [
        "ip saddr 10.244.0.6 meta mark set meta mark | 0x4000",
        "meta l4proto tcp dnat ip to 10.244.0.6:8080",
    ]
    assert "10.244.0.9" not in text  # not ready: never a backend


def test_port_names_pick_the_matching_endpoint_port_and_protocol() -> None:
    svcs = [
        service(
            "kube-dns",
            "10.96.0.10",
            [
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                {"name": "metrics", "port": 9153, "protocol": "TCP"},
            ],
            namespace="kube-system",
        )
    ]
    eps = [
        endpoints(
            "kube-dns",
            subset(
                ["10.244.0.3"],
                [
                    {"name": "dns-tcp", "port": 5353, "protocol": "TCP"},
                    {"name": "dns", "port": 5354, "protocol": "UDP"},
                ],
            ),
            subset(["10.244.0.4"], [{"name": "metrics", "port": 9999}]),
            namespace="kube-system",
        )
    ]
    plan = plan_ruleset(CONFIG, svcs, eps)
    by_name = {p.port_name: p for p in plan.ports}
    assert [str(b) for b in by_name["dns"].backends] == ["10.244.0.3:5354"]
    assert [str(b) for b in by_name["dns-tcp"].backends] == ["10.244.0.3:5353"]
    assert [str(b) for b in by_name["metrics"].backends] == ["10.244.0.4:9999"]
    text = render_plan_text(svcs, eps)
    assert "ip daddr 10.96.0.10 udp dport 53 goto" in text
    assert "ip daddr 10.96.0.10 tcp dport 53 goto" in text
    assert "meta l4proto udp dnat ip to 10.244.0.3:5354" in text
    assert plan.problems == ()


def render_plan_text(svcs: list[dict[str, Any]], eps: list[dict[str, Any]]) -> str:
    return render_ruleset(CONFIG, svcs, eps)


def test_no_ready_endpoints_rejects_instead_of_dnat() -> None:
    svcs = [service("empty", "10.96.0.30", [{"port": 80}])]
    eps = [endpoints("empty", subset([], [{"port": 8080}], not_ready=["10.244.0.7"]))]
    text = render_ruleset(CONFIG, svcs, eps)
    assert chain_body(text, "services") == []
    assert "ip daddr { 10.96.0.30 } jump reject_unserved" in chain_body(text, "filter_forward")
    assert "ip daddr { 10.96.0.30 } jump reject_unserved" in chain_body(text, "filter_output")
    assert chain_body(text, "reject_unserved") == [
        "meta l4proto tcp reject with tcp reset",
        "reject",
    ]
    # Same with no Endpoints object at all.
    assert render_ruleset(CONFIG, svcs, []) == text


def test_headless_external_name_and_unallocated_services_are_skipped() -> None:
    svcs = [
        service("headless", "None", [{"port": 80}]),
        service("ext", None, [{"port": 80}], type_="ExternalName"),
        service("pending", "", [{"port": 80}]),
        service("sctp", "10.96.0.40", [{"port": 80, "protocol": "SCTP"}]),
    ]
    eps = [endpoints("headless", subset(["10.244.0.5"], [{"port": 80}]))]
    plan = plan_ruleset(CONFIG, svcs, eps)
    assert plan.ports == ()
    assert plan.problems == ()
    assert [str(ip) for ip in plan.cluster_ips] == ["10.96.0.40"]
    assert "jump reject_unserved" in render_ruleset(CONFIG, svcs, eps)
    # Nothing at all: no reject rule (an empty anonymous set is not valid nft).
    assert "jump reject_unserved" not in render_ruleset(CONFIG, [], [])


def test_node_port_also_served_on_the_node_address() -> None:
    svcs = [
        service(
            "np",
            "10.96.0.60",
            [{"name": "http", "port": 80, "nodePort": 30080}],
            type_="NodePort",
        ),
        # A nodePort on a ClusterIP service is not a NodePort.
        service("cip", "10.96.0.61", [{"port": 80, "nodePort": 30081}]),
    ]
    eps = [
        endpoints("np", subset(["10.244.0.5"], [{"name": "http", "port": 8080}])),
        endpoints("cip", subset(["10.244.0.5"], [{"port": 8080}])),
    ]
    text = render_ruleset(CONFIG, svcs, eps)
    services = chain_body(text, "services")
    assert any(line.startswith("ip daddr 172.31.255.1 tcp dport 30080 goto") for line in services)
    assert not any("30081" in line for line in services)
    assert len(services) == 3


def test_output_does_not_depend_on_input_order() -> None:
    svcs = [
        service("a", "10.96.0.2", [{"port": 80}]),
        service("b", "10.96.0.3", [{"port": 81}]),
    ]
    eps = [
        endpoints("a", subset(["10.244.0.5", "10.244.0.6"], [{"port": 8080}])),
        endpoints("b", subset(["10.244.0.7"], [{"port": 8081}])),
    ]
    forward = render_ruleset(CONFIG, svcs, eps)
    eps_reversed = [
        endpoints("b", subset(["10.244.0.7"], [{"port": 8081}])),
        endpoints("a", subset(["10.244.0.6", "10.244.0.5"], [{"port": 8080}])),
    ]
    assert render_ruleset(CONFIG, svcs[::-1], eps_reversed) == forward


def test_malformed_objects_are_skipped_and_reported() -> None:
    good = service("good", "10.96.0.2", [{"port": 80}])
    svcs: list[Any] = [
        good,
        service("bad-ip", "10.96.0.999", [{"port": 80}]),
        service("bad-port", "10.96.0.4", [{"port": 70000}, {"port": "x"}, {"port": 81}]),
        service("Bad_Name", "10.96.0.5", [{"port": 80}]),
        service("bad-proto", "10.96.0.6", [{"port": 80, "protocol": "ICMP"}]),
        service("quote", "10.96.0.7", [{"port": 80, "name": 'x" accept'}]),
        {"metadata": "nope"},
        "not even a dict",
        # The same frontend twice: the second is refused.
        service("dup", "10.96.0.2", [{"port": 80}]),
    ]
    eps: list[Any] = [
        endpoints("good", subset(["10.244.0.5", "bogus"], [{"port": 8080}])),
        endpoints("good2", {"addresses": "x"}),
        {"subsets": []},
    ]
    plan = plan_ruleset(CONFIG, svcs, eps)
    assert sorted(p.label for p in plan.ports) == ["default/bad-port/tcp", "default/good/tcp"]
    good_port = next(p for p in plan.ports if p.service == "good")
    assert [str(b) for b in good_port.backends] == ["10.244.0.5:8080"]  # only "bogus" is dropped
    assert len(plan.problems) >= 9
    assert "service default/bad-ip: spec.clusterIP '10.96.0.999' is not an IPv4 address" in (
        plan.problems
    )
    text = render_ruleset(CONFIG, svcs, eps)
    assert "accept" not in text.replace("policy accept;", "")
    assert "Bad_Name" not in text


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {"metadata": st.just({"namespace": "default", "name": "s"}), "spec": json_values}
        )
        | json_values,
        max_size=3,
    ),
    st.lists(
        st.fixed_dictionaries(
            {"metadata": st.just({"namespace": "default", "name": "s"}), "subsets": json_values}
        )
        | json_values,
        max_size=3,
    ),
)
def test_garbage_never_raises(services: list[Any], eps: list[Any]) -> None:
    text = render_ruleset(CONFIG, services, eps)
    assert text.startswith("table ip kvpn_proxy\n")


def test_stale_udp_flows_lists_removed_backends_only() -> None:
    def plan(ips: list[str]) -> Any:
        return plan_ruleset(
            CONFIG,
            [
                service("dns", "10.96.0.10", [{"port": 53, "protocol": "UDP", "name": "dns"}]),
                service("web", "10.96.0.11", [{"port": 80}]),
            ],
            [
                endpoints("dns", subset(ips, [{"port": 53, "protocol": "UDP", "name": "dns"}])),
                endpoints("web", subset(ips, [{"port": 80}])),
            ],
        )

    old, new = plan(["10.244.0.5", "10.244.0.6"]), plan(["10.244.0.6", "10.244.0.7"])
    frontend = Frontend(ipaddress.IPv4Address("10.96.0.10"), 53)
    assert stale_udp_flows(old, new) == [
        (frontend, Backend(ipaddress.IPv4Address("10.244.0.5"), 53))
    ]
    assert stale_udp_flows(None, new) == []
    assert stale_udp_flows(new, new) == []


# -- the adapter, with nft replaced by a recorder ------------------------------------------


class FakeApi:
    def __init__(self) -> None:
        self.store = Store()

    def list(self, rt: ResourceType, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.store.list(rt, namespace)[0]


class RecordingProxy(KubeProxy):
    def __init__(self, api: FakeApi, *, fail: int = 0) -> None:
        super().__init__(api, CONFIG, debounce_s=0.02)
        self.calls: list[tuple[list[str], str]] = []
        self.fail = fail
        self.applied = asyncio.Event()

    async def _run(self, argv: Any, stdin: str = "") -> tuple[bool, str]:
        self.calls.append((list(argv), stdin))
        if argv[0] == "nft" and self.fail:
            self.fail -= 1
            return False, "Error: boom"
        if argv[0] == "nft":
            self.applied.set()
        return True, ""


async def wait_applies(proxy: RecordingProxy, count: int) -> None:
    async with asyncio.timeout(5):
        while proxy.applies < count:
            await asyncio.sleep(0.01)


async def test_adapter_debounces_skips_unchanged_and_forgets_udp_flows() -> None:
    api = FakeApi()
    api.store.create(SERVICES, service("dns", "10.96.0.10", [{"port": 53, "protocol": "UDP"}]))
    proxy = RecordingProxy(api)
    task = asyncio.create_task(proxy.run())
    try:
        await wait_applies(proxy, 1)
        # A burst of changes -> one apply.
        ep = endpoints("dns", subset(["10.244.0.5"], [{"port": 53, "protocol": "UDP"}]))
        api.store.create(ENDPOINTS, ep)
        api.store.create(SERVICES, service("other", "10.96.0.11", [{"port": 80}]))
        await wait_applies(proxy, 2)
        await asyncio.sleep(0.1)
        assert proxy.applies == 2
        assert proxy.applied_text is not None and "10.244.0.5:53" in proxy.applied_text
        # Irrelevant kinds and no-op changes do not run nft again.
        api.store.create(CONFIGMAPS, {"metadata": {"namespace": "default", "name": "cm"}})
        stored = api.store.get(ENDPOINTS, "default", "dns")
        stored["metadata"]["annotations"] = {"x": "y"}
        api.store.update(ENDPOINTS, stored)
        await asyncio.sleep(0.15)
        assert proxy.applies == 2
        # The backend moves: the old one's UDP conntrack entries are deleted.
        stored = api.store.get(ENDPOINTS, "default", "dns")
        stored["subsets"][0]["addresses"] = [{"ip": "10.244.0.6"}]
        api.store.update(ENDPOINTS, stored)
        await wait_applies(proxy, 3)
        await asyncio.sleep(0.05)
        conntrack = [argv for argv, _ in proxy.calls if argv[0] == "conntrack"]
        assert conntrack == [
            [
                "conntrack", "-D", "-p", "udp",
                "--orig-dst", "10.96.0.10", "--orig-port-dst", "53",
                "--reply-src", "10.244.0.5", "--reply-port-src", "53",
            ]
        ]  # fmt: skip
    finally:
        await proxy.stop()
    assert task.done()  # stop() ends run(): no apply can come after the table is gone
    api.store.create(SERVICES, service("late", "10.96.0.12", [{"port": 80}]))
    await asyncio.sleep(0.1)
    argv, script = proxy.calls[-1]
    assert argv == ["nft", "-f", "-"]
    assert script == "table ip kvpn_proxy\ndelete table ip kvpn_proxy\n"


async def test_adapter_retries_after_nft_failure() -> None:
    api = FakeApi()
    proxy = RecordingProxy(api, fail=1)
    task = asyncio.create_task(proxy.run())
    try:
        async with asyncio.timeout(5):
            await proxy.applied.wait()
        assert proxy.failures == 1
        assert proxy.applies == 1
    finally:
        task.cancel()
