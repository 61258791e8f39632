"""The route plan: which prefixes go into the TUN, what is left out, and why.

Theory of operation
-------------------
:func:`plan_routes` is pure. It takes the cluster CIDRs (plus ``--include-cidr``), removes the
addresses that must never be captured, and reconciles what is left with the machine's own
routing table:

1. *Mandatory exclusions*, in this order: the API server address(es) from the kubeconfig and
   the SSH peer of the direct transport (so the tunnel can never route into itself), then
   every ``--exclude-cidr``. An exclusion may sit anywhere, including inside a routed CIDR:
   that CIDR is split into the minimal set of prefixes covering it minus the exclusion.
2. *Conflicts*: a local route (not on the kvpn TUN, not a default route) that overlaps what is
   left of a cluster CIDR, whether more or less specific. ``on_conflict`` decides:

   - ``keep`` (default): the overlap is excluded; the local route keeps its traffic.
   - ``override``: kvpn's prefixes are split until each one overlapping the local route is
     strictly more specific than it, so the kernel's longest-prefix match picks kvpn without
     touching the local route. A /32 host route cannot be beaten that way and is kept.
   - ``skip``: the whole cluster CIDR is left out.
   - ``fail``: nothing is installed; the plan is *refused* and connect must not start.

The plan is what connect installs, what ``kvpn routes`` prints and what the session file
records (``to_json``/``from_json``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from kvpn.routes.discovery import ClusterCidrs
from kvpn.routes.prefixes import exclude, intersection, is_default_like

__all__ = [
    "CidrKind",
    "ClusterCidr",
    "Conflict",
    "ConflictAction",
    "ConflictPolicy",
    "Exclusion",
    "ExclusionReason",
    "LocalRoute",
    "RoutePlan",
    "plan_routes",
]

DEFAULT_TUN = "kvpn0"
PLAN_FORMAT_VERSION = 1


class CidrKind(Enum):
    POD = "pod"
    SERVICE = "service"
    INCLUDE = "include"


class ExclusionReason(Enum):
    API_SERVER = "api-server"
    TUNNEL_PEER = "tunnel-peer"
    USER = "user"
    LOCAL_ROUTE = "local-route"


class ConflictPolicy(Enum):
    KEEP = "keep"
    OVERRIDE = "override"
    SKIP = "skip"
    FAIL = "fail"


class ConflictAction(Enum):
    KEPT_LOCAL = "kept-local-route"
    HOST_ROUTE_KEPT = "host-route-kept"
    OVERRIDDEN = "overridden"
    SKIPPED_CIDR = "skipped-cidr"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class LocalRoute:
    """One route of the machine's main routing table."""

    dst: IPv4Network
    dev: str | None
    gateway: IPv4Address | None = None
    metric: int = 0

    def describe(self) -> str:
        dst = "default" if self.dst.prefixlen == 0 else str(self.dst)
        parts = [dst]
        if self.gateway is not None:
            parts.append(f"via {self.gateway}")
        if self.dev is not None:
            parts.append(f"dev {self.dev}")
        if self.metric:
            parts.append(f"metric {self.metric}")
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "dst": str(self.dst),
            "dev": self.dev,
            "gateway": None if self.gateway is None else str(self.gateway),
            "metric": self.metric,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LocalRoute:
        gateway = data.get("gateway")
        dev = data.get("dev")
        metric = data.get("metric", 0)
        if not isinstance(metric, int) or (dev is not None and not isinstance(dev, str)):
            raise ValueError("malformed local route")
        return cls(
            IPv4Network(_text(data["dst"])),
            dev,
            None if gateway is None else IPv4Address(_text(gateway)),
            metric,
        )


@dataclass(frozen=True, slots=True)
class ClusterCidr:
    network: IPv4Network
    kind: CidrKind
    #: How it was found ("node.spec.podCIDRs", "--include-cidr", ...).
    source: str = ""


@dataclass(frozen=True, slots=True)
class Exclusion:
    network: IPv4Network
    reason: ExclusionReason
    detail: str
    #: The cluster CIDRs this exclusion cuts into; empty: it changes nothing.
    cuts: tuple[IPv4Network, ...] = ()


@dataclass(frozen=True, slots=True)
class Conflict:
    local: LocalRoute
    cluster_cidr: IPv4Network
    #: The addresses both claim (the more specific of the two prefixes).
    overlap: IPv4Network
    action: ConflictAction

    def describe(self) -> str:
        head = f"local route {self.local.describe()} overlaps {self.cluster_cidr}"
        return f"{head}: {_ACTION_TEXT[self.action].format(overlap=self.overlap)}"


_ACTION_TEXT: dict[ConflictAction, str] = {
    ConflictAction.KEPT_LOCAL: (
        "kept the local route, {overlap} does not go through kvpn "
        "(--on-conflict=override to take it)"
    ),
    ConflictAction.HOST_ROUTE_KEPT: (
        "kept the local host route, a /32 cannot be overridden by a more specific prefix"
    ),
    ConflictAction.OVERRIDDEN: "overridden, kvpn installs more specific prefixes for {overlap}",
    ConflictAction.SKIPPED_CIDR: "skipped the whole cluster CIDR",
    ConflictAction.REFUSED: "refused (--on-conflict=fail): nothing is installed",
}


@dataclass(frozen=True, slots=True)
class RoutePlan:
    cluster_cidrs: tuple[ClusterCidr, ...]
    installed: tuple[IPv4Network, ...]
    exclusions: tuple[Exclusion, ...]
    conflicts: tuple[Conflict, ...]
    on_conflict: ConflictPolicy = ConflictPolicy.KEEP
    notes: tuple[str, ...] = field(default=())
    tun: str = DEFAULT_TUN

    @property
    def refused(self) -> bool:
        """``--on-conflict=fail`` met a conflict: connect must not start."""
        return any(c.action is ConflictAction.REFUSED for c in self.conflicts)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PLAN_FORMAT_VERSION,
            "tun": self.tun,
            "on_conflict": self.on_conflict.value,
            "refused": self.refused,
            "cluster_cidrs": [
                {"cidr": str(c.network), "kind": c.kind.value, "source": c.source}
                for c in self.cluster_cidrs
            ],
            "installed": [str(n) for n in self.installed],
            "exclusions": [
                {
                    "cidr": str(e.network),
                    "reason": e.reason.value,
                    "detail": e.detail,
                    "cuts": [str(n) for n in e.cuts],
                }
                for e in self.exclusions
            ],
            "conflicts": [
                {
                    "local_route": c.local.to_json(),
                    "cluster_cidr": str(c.cluster_cidr),
                    "overlap": str(c.overlap),
                    "action": c.action.value,
                    "description": c.describe(),
                }
                for c in self.conflicts
            ],
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, data: Any) -> RoutePlan:
        """Parse what :meth:`to_json` wrote. Anything malformed raises ``ValueError``."""
        try:
            if not isinstance(data, Mapping):
                raise TypeError("not an object")
            if data.get("version", PLAN_FORMAT_VERSION) != PLAN_FORMAT_VERSION:
                raise ValueError(f"unknown route plan version {data.get('version')!r}")
            cluster_cidrs = _legacy_cidrs(data) if "cluster_cidrs" not in data else ()
            return cls(
                cluster_cidrs=cluster_cidrs
                + tuple(
                    ClusterCidr(
                        IPv4Network(_text(c["cidr"])),
                        CidrKind(c["kind"]),
                        _text(c.get("source", "")),
                    )
                    for c in _items(data, "cluster_cidrs")
                ),
                installed=tuple(IPv4Network(_text(n)) for n in _items(data, "installed")),
                exclusions=tuple(
                    Exclusion(
                        IPv4Network(_text(e["cidr"])),
                        ExclusionReason(e["reason"]),
                        _text(e.get("detail", "")),
                        tuple(IPv4Network(_text(n)) for n in e.get("cuts", [])),
                    )
                    for e in _items(data, "exclusions")
                ),
                conflicts=tuple(
                    Conflict(
                        LocalRoute.from_json(c["local_route"]),
                        IPv4Network(_text(c["cluster_cidr"])),
                        IPv4Network(_text(c["overlap"])),
                        ConflictAction(c["action"]),
                    )
                    for c in _items(data, "conflicts")
                ),
                on_conflict=ConflictPolicy(data.get("on_conflict", "keep")),
                notes=tuple(_text(n) for n in data.get("notes", [])),
                tun=_text(data.get("tun", DEFAULT_TUN)),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed route plan: {exc}") from None


def _legacy_cidrs(data: Mapping[str, Any]) -> tuple[ClusterCidr, ...]:
    """Session files written before the plan format: ``pod_cidrs``/``service_cidrs`` lists."""
    return tuple(
        ClusterCidr(IPv4Network(_text(n)), kind)
        for key, kind in (("pod_cidrs", CidrKind.POD), ("service_cidrs", CidrKind.SERVICE))
        for n in _items(data, key)
    )


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _items(data: Mapping[str, Any], key: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise TypeError(f"{key} is not a list")
    return value


# -- planning -------------------------------------------------------------------------------


def _wanted(cluster: ClusterCidrs, include_cidrs: Iterable[IPv4Network]) -> list[ClusterCidr]:
    wanted: list[ClusterCidr] = []
    for net in cluster.pod_cidrs:
        wanted.append(ClusterCidr(net, CidrKind.POD, cluster.pod_source))
    for net in cluster.service_cidrs:
        wanted.append(ClusterCidr(net, CidrKind.SERVICE, cluster.service_source))
    for net in include_cidrs:
        wanted.append(ClusterCidr(net, CidrKind.INCLUDE, "--include-cidr"))
    unique: list[ClusterCidr] = []
    for c in wanted:
        if all(c.network != u.network for u in unique):
            unique.append(c)
    return unique


def _mandatory_exclusions(
    wanted: Sequence[IPv4Network],
    exclude_cidrs: Iterable[IPv4Network],
    apiserver_addresses: Iterable[IPv4Address],
    tunnel_peer: IPv4Address | None,
    apiserver_name: str,
) -> list[Exclusion]:
    def cuts(net: IPv4Network) -> tuple[IPv4Network, ...]:
        return tuple(w for w in wanted if w.overlaps(net))

    found: list[Exclusion] = []
    api_detail = f"the API server ({apiserver_name})" if apiserver_name else "the API server"
    seen: set[tuple[IPv4Network, ExclusionReason]] = set()

    def add(net: IPv4Network, reason: ExclusionReason, detail: str) -> None:
        if (net, reason) not in seen:
            seen.add((net, reason))
            found.append(Exclusion(net, reason, detail, cuts(net)))

    for address in apiserver_addresses:
        add(IPv4Network(address), ExclusionReason.API_SERVER, api_detail)
    if tunnel_peer is not None:
        add(
            IPv4Network(tunnel_peer),
            ExclusionReason.TUNNEL_PEER,
            "the SSH peer of the direct transport",
        )
    for net in exclude_cidrs:
        add(net, ExclusionReason.USER, "--exclude-cidr")
    return found


def _beat_local_routes(
    prefixes: Iterable[IPv4Network], local: Sequence[IPv4Network]
) -> list[IPv4Network]:
    """Split prefixes until each one overlapping a local route is strictly more specific."""
    local = [dst for dst in local if dst.prefixlen < 32]  # a /32 cannot be beaten
    work = list(prefixes)
    result: list[IPv4Network] = []
    while work:
        prefix = work.pop()
        if any(prefix.overlaps(dst) and prefix.prefixlen <= dst.prefixlen for dst in local):
            work.extend(prefix.subnets(prefixlen_diff=1))
        else:
            result.append(prefix)
    return sorted(result)


def plan_routes(
    cluster: ClusterCidrs,
    *,
    include_cidrs: Iterable[IPv4Network] = (),
    exclude_cidrs: Iterable[IPv4Network] = (),
    apiserver_addresses: Iterable[IPv4Address] = (),
    tunnel_peer: IPv4Address | None = None,
    local_routes: Iterable[LocalRoute] = (),
    on_conflict: ConflictPolicy | str = ConflictPolicy.KEEP,
    apiserver_name: str = "",
    tun: str = DEFAULT_TUN,
    notes: Iterable[str] = (),
) -> RoutePlan:
    """Decide the prefixes to route into the TUN (pure; see the module docstring)."""
    policy = ConflictPolicy(on_conflict)
    wanted = _wanted(cluster, include_cidrs)
    wanted_nets = [c.network for c in wanted]
    exclusions = _mandatory_exclusions(
        wanted_nets, exclude_cidrs, apiserver_addresses, tunnel_peer, apiserver_name
    )
    mandatory = [e.network for e in exclusions]

    candidates = [r for r in local_routes if r.dev != tun and not is_default_like(r.dst)]
    pairs: list[tuple[LocalRoute, IPv4Network, IPv4Network]] = []
    for net in wanted_nets:
        remaining = exclude([net], mandatory)
        for route in candidates:
            overlap = intersection(route.dst, net)
            if overlap is not None and any(route.dst.overlaps(r) for r in remaining):
                pairs.append((route, net, overlap))

    conflicts: list[Conflict] = []
    installed: list[IPv4Network]
    if not pairs:
        installed = exclude(wanted_nets, mandatory)
    elif policy is ConflictPolicy.FAIL:
        conflicts = [Conflict(r, n, o, ConflictAction.REFUSED) for r, n, o in pairs]
        installed = []
    elif policy is ConflictPolicy.SKIP:
        skipped = {n for _, n, _ in pairs}
        conflicts = [Conflict(r, n, o, ConflictAction.SKIPPED_CIDR) for r, n, o in pairs]
        for net in wanted_nets:
            if net in skipped:
                routes = ", ".join(r.describe() for r, n, _ in pairs if n == net)
                exclusions.append(
                    Exclusion(
                        net,
                        ExclusionReason.LOCAL_ROUTE,
                        f"skipped: conflicts with local route {routes}",
                        (net,),
                    )
                )
        installed = exclude([n for n in wanted_nets if n not in skipped], mandatory)
    else:
        kept: list[IPv4Network] = []
        beaten: list[IPv4Network] = []
        for route, net, overlap in pairs:
            keep = policy is ConflictPolicy.KEEP or route.dst.prefixlen == 32
            if keep:
                action = (
                    ConflictAction.KEPT_LOCAL
                    if policy is ConflictPolicy.KEEP
                    else ConflictAction.HOST_ROUTE_KEPT
                )
                kept.append(overlap)
                exclusions.append(
                    Exclusion(
                        overlap,
                        ExclusionReason.LOCAL_ROUTE,
                        f"local route {route.describe()}",
                        (net,),
                    )
                )
            else:
                action = ConflictAction.OVERRIDDEN
                beaten.append(route.dst)
            conflicts.append(Conflict(route, net, overlap, action))
        installed = _beat_local_routes(exclude(wanted_nets, mandatory + kept), beaten)

    return RoutePlan(
        cluster_cidrs=tuple(wanted),
        installed=tuple(installed),
        exclusions=tuple(exclusions),
        conflicts=tuple(conflicts),
        on_conflict=policy,
        notes=tuple(cluster.notes) + tuple(notes),
        tun=tun,
    )
