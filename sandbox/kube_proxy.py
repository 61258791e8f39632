"""The sandbox's kube-proxy: Services and Endpoints become one nftables table in the node netns.

Theory of operation
-------------------
Like kube-proxy's nftables mode, but for one node and IPv4 only. ``plan_ruleset`` turns the
Service and Endpoints objects (plain dicts, as the API serves them) into a ``ProxyPlan``: one
``ServicePortPlan`` per TCP or UDP service port, with its frontends (``ClusterIP:port`` and, for
NodePort and LoadBalancer services, ``node_address:nodePort``) and its ready backends
(``subsets[].addresses`` x the subset port whose *name* matches the service port's name; the
Endpoints object already holds resolved target port numbers). ``render_plan`` writes the
plan as an nftables script that replaces table ``ip kvpn_proxy`` in one transaction:

* ``nat_prerouting`` / ``nat_output`` (both at dstnat priority) jump to ``services``, which
  sends each frontend to its service chain; that picks a backend at random
  (``numgen random mod N vmap``) and goes to the backend's chain, which DNATs to it.
* Hairpin: a backend's chain marks (0x4000) a packet whose source *is* that backend; the
  ``nat_postrouting`` chain SNATs marked packets to the pod gateway, so a pod that reaches
  itself through its Service sees the node as the peer (else it would drop its own address as
  a martian source).
* Service ports without ready backends are left out of ``services``; such a packet keeps its
  ClusterIP destination and the ``filter_forward`` / ``filter_output`` chains reject whatever
  still goes to a ClusterIP after DNAT (TCP reset, else ICMP port unreachable), as kube-proxy
  does for services without endpoints and for unknown ports of a ClusterIP.

Input is untrusted: a malformed object or port is skipped and described in
``ProxyPlan.problems``; rendering never fails. ``KubeProxy`` is the thin asyncio adapter: it
follows the store, re-plans (debounced), runs ``nft -f -`` when the text changed, and deletes
UDP conntrack entries that still point at backends that went away, as kube-proxy does.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import ipaddress
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sandbox.apiserver.resources import ENDPOINTS, SERVICES, ResourceType
from sandbox.apiserver.store import Store
from sandbox.config import SandboxConfig

log = logging.getLogger("sandbox.kube_proxy")

TABLE = "kvpn_proxy"
HAIRPIN_MARK = 0x4000
DEBOUNCE_S = 0.05
RETRY_S = 1.0

Obj = Mapping[str, Any]
# Kubernetes names are DNS labels/subdomains; anything else never reaches an nft comment.
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


class L4Protocol(enum.Enum):
    TCP = "tcp"
    UDP = "udp"


PROTOCOLS: dict[str, L4Protocol] = {"TCP": L4Protocol.TCP, "UDP": L4Protocol.UDP}
# Tell apart "not for kube-proxy" (skipped silently) from "broken" (reported as a problem).
IGNORED_PROTOCOLS = frozenset({"SCTP"})
NODE_PORT_TYPES = frozenset({"NodePort", "LoadBalancer"})


@dataclass(frozen=True, slots=True, order=True)
class Backend:
    ip: ipaddress.IPv4Address
    port: int

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True, order=True)
class Frontend:
    ip: ipaddress.IPv4Address
    port: int

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServicePortPlan:
    namespace: str
    service: str
    port_name: str
    protocol: L4Protocol
    frontends: tuple[Frontend, ...]
    backends: tuple[Backend, ...]  # sorted, unique; empty = reject

    @property
    def label(self) -> str:
        port = f":{self.port_name}" if self.port_name else ""
        return f"{self.namespace}/{self.service}{port}/{self.protocol.value}"

    @property
    def chain(self) -> str:
        return "svc_" + _short_hash(self.label)

    def backend_chain(self, backend: Backend) -> str:
        return "ep_" + _short_hash(f"{self.label} {backend}")


@dataclass(frozen=True, slots=True)
class ProxyPlan:
    ports: tuple[ServicePortPlan, ...]
    cluster_ips: tuple[ipaddress.IPv4Address, ...]  # every ClusterIP, served or not
    snat_address: ipaddress.IPv4Address  # hairpin traffic leaves the node from here
    problems: tuple[str, ...] = ()  # malformed input that was skipped

    def udp_backends(self) -> dict[Frontend, frozenset[Backend]]:
        out: dict[Frontend, frozenset[Backend]] = {}
        for p in self.ports:
            if p.protocol is L4Protocol.UDP:
                for f in p.frontends:
                    out[f] = out.get(f, frozenset()) | frozenset(p.backends)
        return out


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


# -- planning (pure) -----------------------------------------------------------------------


class _Malformed(Exception):
    """One Service, Endpoints or port that cannot be used; becomes a ``problems`` line."""


def _ipv4(value: object, what: str) -> ipaddress.IPv4Address:
    if not isinstance(value, str):
        raise _Malformed(f"{what} is not a string")
    try:
        return ipaddress.IPv4Address(value)
    except ValueError as e:
        raise _Malformed(f"{what} {value!r} is not an IPv4 address") from e


def _port(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise _Malformed(f"{what} {value!r} is not a port number")
    return value


def _dict(value: object, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _Malformed(f"{what} is not an object")
    return value


def _list(value: object, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Malformed(f"{what} is not a list")
    return value


def _identity(obj: object) -> tuple[str, str]:
    meta = _dict(obj.get("metadata") if isinstance(obj, Mapping) else None, "metadata")
    namespace, name = meta.get("namespace"), meta.get("name")
    if not (isinstance(namespace, str) and _NAME_RE.match(namespace)):
        raise _Malformed(f"bad metadata.namespace {namespace!r}")
    if not (isinstance(name, str) and _NAME_RE.match(name)):
        raise _Malformed(f"bad metadata.name {name!r}")
    return namespace, name


def _protocol_name(value: object) -> str:
    return value if isinstance(value, str) else "TCP" if value is None else repr(value)


def _port_name(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or (value and not _NAME_RE.match(value)):
        raise _Malformed(f"bad port name {value!r}")
    return value


# Backends per (port name, protocol or "" if not given) for one Endpoints object.
_BackendIndex = dict[tuple[str, str], set[Backend]]


def _index_endpoints(endpoints: Obj, where: str, problems: list[str]) -> _BackendIndex:
    index: _BackendIndex = {}
    for i, subset in enumerate(_list(endpoints.get("subsets"), "subsets")):
        try:
            subset = _dict(subset, f"subsets[{i}]")
            ports: list[tuple[str, str, int]] = []
            for j, port in enumerate(_list(subset.get("ports"), f"subsets[{i}].ports")):
                port = _dict(port, f"subsets[{i}].ports[{j}]")
                protocol = port.get("protocol")
                ports.append(
                    (
                        _port_name(port.get("name")),
                        protocol if isinstance(protocol, str) else "",
                        _port(port.get("port"), f"subsets[{i}].ports[{j}].port"),
                    )
                )
            addresses = _list(subset.get("addresses"), f"subsets[{i}].addresses")
        except _Malformed as e:
            problems.append(f"endpoints {where}: {e}")
            continue
        ips = []
        for j, address in enumerate(addresses):
            try:
                address = _dict(address, f"subsets[{i}].addresses[{j}]")
                ips.append(_ipv4(address.get("ip"), f"subsets[{i}].addresses[{j}].ip"))
            except _Malformed as e:
                problems.append(f"endpoints {where}: {e}")
        for name, protocol, number in ports:
            index.setdefault((name, protocol), set()).update(Backend(ip, number) for ip in ips)
    return index


def _plan_service(
    config: SandboxConfig,
    key: tuple[str, str],
    service: Obj,
    backends: _BackendIndex,
    problems: list[str],
) -> tuple[ipaddress.IPv4Address | None, list[ServicePortPlan]]:
    namespace, name = key
    spec = _dict(service.get("spec"), "spec")
    if spec.get("type") == "ExternalName":
        return None, []
    cluster_ip_text = spec.get("clusterIP")
    if cluster_ip_text in (None, "", "None"):
        return None, []  # headless, or not allocated yet
    cluster_ip = _ipv4(cluster_ip_text, "spec.clusterIP")
    with_node_port = spec.get("type") in NODE_PORT_TYPES
    plans = []
    for i, port in enumerate(_list(spec.get("ports"), "spec.ports")):
        try:
            port = _dict(port, f"spec.ports[{i}]")
            protocol_name = _protocol_name(port.get("protocol"))
            if protocol_name in IGNORED_PROTOCOLS:
                continue
            protocol = PROTOCOLS.get(protocol_name)
            if protocol is None:
                raise _Malformed(f"spec.ports[{i}].protocol {protocol_name!r} is unknown")
            port_name = _port_name(port.get("name"))
            frontends = [Frontend(cluster_ip, _port(port.get("port"), f"spec.ports[{i}].port"))]
            if with_node_port and port.get("nodePort") is not None:
                node_port = _port(port.get("nodePort"), f"spec.ports[{i}].nodePort")
                frontends.append(Frontend(config.node_address, node_port))
        except _Malformed as e:
            problems.append(f"service {namespace}/{name}: {e}")
            continue
        plans.append(
            ServicePortPlan(
                namespace=namespace,
                service=name,
                port_name=port_name,
                protocol=protocol,
                frontends=tuple(frontends),
                # An Endpoints port without a protocol matches by name alone.
                backends=tuple(
                    sorted(
                        backends.get((port_name, protocol_name))
                        or backends.get((port_name, ""))
                        or ()
                    )
                ),
            )
        )
    return cluster_ip, plans


def plan_ruleset(
    config: SandboxConfig, services: Iterable[Obj], endpoints: Iterable[Obj]
) -> ProxyPlan:
    """What kube-proxy must program for these Services and Endpoints (pure, never raises)."""
    problems: list[str] = []
    index: dict[tuple[str, str], _BackendIndex] = {}
    for ep in endpoints:
        try:
            key = _identity(ep)
            index[key] = _index_endpoints(ep, "/".join(key), problems)
        except _Malformed as e:
            problems.append(f"endpoints: {e}")
    ports: list[ServicePortPlan] = []
    cluster_ips: set[ipaddress.IPv4Address] = set()
    seen_frontends: set[tuple[L4Protocol, Frontend]] = set()
    for svc in services:
        try:
            key = _identity(svc)
        except _Malformed as e:
            problems.append(f"service: {e}")
            continue
        try:
            cluster_ip, plans = _plan_service(config, key, svc, index.get(key, {}), problems)
        except _Malformed as e:
            problems.append(f"service {'/'.join(key)}: {e}")
            continue
        if cluster_ip is not None:
            cluster_ips.add(cluster_ip)
        for plan in plans:
            clash = [f for f in plan.frontends if (plan.protocol, f) in seen_frontends]
            if clash:
                problems.append(f"service {plan.label}: {clash[0]} is already taken")
                continue
            seen_frontends.update((plan.protocol, f) for f in plan.frontends)
            ports.append(plan)
    ports.sort(key=lambda p: p.label)
    return ProxyPlan(
        ports=tuple(ports),
        cluster_ips=tuple(sorted(cluster_ips)),
        snat_address=config.pod_gateway,
        problems=tuple(problems),
    )


# -- rendering (pure) ----------------------------------------------------------------------


def _render_services_chain(plan: ProxyPlan) -> list[str]:
    lines = ["\tchain services {"]
    for p in plan.ports:
        if not p.backends:
            continue
        for f in p.frontends:
            lines.append(
                f"\t\tip daddr {f.ip} {p.protocol.value} dport {f.port} goto {p.chain}"
                f' comment "{p.label}"'
            )
    lines.append("\t}")
    return lines


def _render_port_chains(p: ServicePortPlan) -> list[str]:
    if len(p.backends) == 1:
        pick = f"goto {p.backend_chain(p.backends[0])}"
    else:
        choices = ", ".join(f"{i} : goto {p.backend_chain(b)}" for i, b in enumerate(p.backends))
        pick = f"numgen random mod {len(p.backends)} vmap {{ {choices} }}"
    lines = [f"\tchain {p.chain} {{", f"\t\t{pick}", "\t}"]
    for b in p.backends:
        lines += [
            f"\tchain {p.backend_chain(b)} {{",
            f"\t\tip saddr {b.ip} meta mark set meta mark | {HAIRPIN_MARK:#x}",
            f"\t\tmeta l4proto {p.protocol.value} dnat ip to {b}",
            "\t}",
        ]
    return lines


def render_plan(plan: ProxyPlan) -> str:
    """The nftables script that atomically replaces table ``ip kvpn_proxy`` with ``plan``."""
    reject_unserved = []
    if plan.cluster_ips:
        ips = ", ".join(str(ip) for ip in plan.cluster_ips)
        reject_unserved = [f"\t\tip daddr {{ {ips} }} jump reject_unserved"]
    lines = [
        f"table ip {TABLE}",
        f"delete table ip {TABLE}",
        f"table ip {TABLE} {{",
        "\tchain nat_prerouting {",
        "\t\ttype nat hook prerouting priority dstnat; policy accept;",
        "\t\tjump services",
        "\t}",
        "\tchain nat_output {",
        "\t\ttype nat hook output priority -100; policy accept;",
        "\t\tjump services",
        "\t}",
        "\tchain nat_postrouting {",
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
        f'\t\tmeta mark & {HAIRPIN_MARK:#x} == {HAIRPIN_MARK:#x} oifname != "lo"'
        f" snat ip to {plan.snat_address}",
        "\t}",
        "\tchain filter_forward {",
        "\t\ttype filter hook forward priority filter; policy accept;",
        *reject_unserved,
        "\t}",
        "\tchain filter_output {",
        "\t\ttype filter hook output priority filter; policy accept;",
        *reject_unserved,
        "\t}",
        "\tchain reject_unserved {",
        "\t\tmeta l4proto tcp reject with tcp reset",
        "\t\treject",
        "\t}",
        *_render_services_chain(plan),
    ]
    for p in plan.ports:
        if p.backends:
            lines += _render_port_chains(p)
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_ruleset(config: SandboxConfig, services: Iterable[Obj], endpoints: Iterable[Obj]) -> str:
    """Services and Endpoints (dicts as the API serves them) -> nftables script (pure)."""
    return render_plan(plan_ruleset(config, services, endpoints))


def delete_table_script() -> str:
    """An nftables script that removes the table if present, and never fails."""
    return f"table ip {TABLE}\ndelete table ip {TABLE}\n"


def stale_udp_flows(old: ProxyPlan | None, new: ProxyPlan) -> list[tuple[Frontend, Backend]]:
    """UDP (frontend, backend) pairs whose conntrack entries must go: the backend was removed.

    UDP has no end, so without this a client that keeps its source port (a DNS resolver, a
    game) would go on talking to a backend that is gone, or not selected any more.
    """
    if old is None:
        return []
    new_udp = new.udp_backends()
    stale = []
    for frontend, backends in sorted(old.udp_backends().items()):
        for backend in sorted(backends - new_udp.get(frontend, frozenset())):
            stale.append((frontend, backend))
    return stale


# -- asyncio adapter -----------------------------------------------------------------------


class ProxyApi(Protocol):
    """The part of ``sandbox.apiserver.api.Api`` kube-proxy uses."""

    store: Store

    def list(self, rt: ResourceType, namespace: str | None = None) -> list[dict[str, Any]]: ...


WATCHED = frozenset({SERVICES.key, ENDPOINTS.key})


class KubeProxy:
    """Keeps table ``ip kvpn_proxy`` in the node netns in line with Services and Endpoints.

    ``netns``: run ``nft``/``conntrack`` through ``ip netns exec`` (tests); by default they run
    in the caller's own netns, which for the control plane is the node's.
    """

    def __init__(
        self,
        api: ProxyApi,
        config: SandboxConfig,
        *,
        netns: str | None = None,
        debounce_s: float = DEBOUNCE_S,
    ) -> None:
        self.api = api
        self.config = config
        self.debounce_s = debounce_s
        self._prefix: tuple[str, ...] = ("ip", "netns", "exec", netns) if netns else ()
        self.applied_text: str | None = None
        self.applied_plan: ProxyPlan | None = None
        self.applies = 0
        self.failures = 0
        self._reported_problems: tuple[str, ...] = ()
        self._stopped = False
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        self._task = asyncio.current_task()
        subscription = self.api.store.subscribe()  # before listing: no change can slip by
        try:
            dirty = True
            while not self._stopped:
                if dirty:
                    dirty = not await self.sync()
                timeout = RETRY_S if dirty else None
                try:
                    event = await asyncio.wait_for(subscription.queue.get(), timeout)
                except TimeoutError:
                    continue
                if event.resource.key not in WATCHED:
                    continue
                await asyncio.sleep(self.debounce_s)  # let a burst of changes land
                while not subscription.queue.empty():
                    subscription.queue.get_nowait()
                dirty = True
        finally:
            subscription.close()

    async def sync(self) -> bool:
        """Re-plan from the API and apply if the ruleset changed; False if ``nft`` failed."""
        if self._stopped:
            return True
        plan = plan_ruleset(self.config, self.api.list(SERVICES), self.api.list(ENDPOINTS))
        if plan.problems != self._reported_problems:
            for problem in plan.problems:
                log.warning("skipped: %s", problem)
            self._reported_problems = plan.problems
        text = render_plan(plan)
        if text == self.applied_text:
            return True
        ok, stderr = await self._run(["nft", "-f", "-"], text)
        if not ok:
            self.failures += 1
            log.error("nft failed: %s", stderr.strip())
            return False
        stale = stale_udp_flows(self.applied_plan, plan)
        self.applied_text, self.applied_plan = text, plan
        self.applies += 1
        for frontend, backend in stale:
            await self._forget_udp_flow(frontend, backend)
        return True

    async def stop(self) -> None:
        """Stop following changes, then remove the table (no apply can come after)."""
        self._stopped = True
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            await asyncio.wait([task])  # its outcome is its own; ours may still be cancelled
        ok, stderr = await self._run(["nft", "-f", "-"], delete_table_script())
        if not ok:
            log.error("could not remove table %s: %s", TABLE, stderr.strip())
        self.applied_text, self.applied_plan = None, None

    async def _forget_udp_flow(self, frontend: Frontend, backend: Backend) -> None:
        # Exit status 1 just means "no such entries".
        await self._run(
            [
                "conntrack", "-D", "-p", "udp",
                "--orig-dst", str(frontend.ip), "--orig-port-dst", str(frontend.port),
                "--reply-src", str(backend.ip), "--reply-port-src", str(backend.port),
            ]
        )  # fmt: skip

    async def _run(self, argv: Sequence[str], stdin: str = "") -> tuple[bool, str]:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._prefix,
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as e:
            return False, f"{argv[0]}: {e}"
        try:
            _, err = await proc.communicate(stdin.encode())
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        return proc.returncode == 0, err.decode(errors="replace")
