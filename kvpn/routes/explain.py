"""Why does an address (or name) go, or not go, through kvpn?

:func:`explain` is pure: it runs the kernel's choice (longest prefix match, then the lowest
metric) over the local routes plus the plan's installed prefixes, then finds the plan's
reason when the answer is "not through kvpn". :func:`resolve_target` turns a name into an
address with the system resolver (while connected, kvpn's DNS answers cluster names).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from kvpn.routes.plan import (
    ClusterCidr,
    Conflict,
    ConflictAction,
    Exclusion,
    ExclusionReason,
    LocalRoute,
    RoutePlan,
)
from kvpn.routes.prefixes import longest_match

__all__ = ["Explanation", "KernelChoice", "Verdict", "explain", "kernel_choice", "resolve_target"]


class Verdict(Enum):
    ROUTED = "routed"
    API_SERVER = "api-server"
    TUNNEL_PEER = "tunnel-peer"
    USER_EXCLUDED = "user-excluded"
    LOCAL_ROUTE = "local-route"
    OUTSIDE = "outside-cluster-cidrs"
    REFUSED = "refused"
    NO_ROUTE = "no-route"


_VERDICT_OF_EXCLUSION: dict[ExclusionReason, Verdict] = {
    ExclusionReason.API_SERVER: Verdict.API_SERVER,
    ExclusionReason.TUNNEL_PEER: Verdict.TUNNEL_PEER,
    ExclusionReason.USER: Verdict.USER_EXCLUDED,
    ExclusionReason.LOCAL_ROUTE: Verdict.LOCAL_ROUTE,
}


@dataclass(frozen=True, slots=True)
class KernelChoice:
    """The route the kernel would use for the address."""

    route: LocalRoute
    via_kvpn: bool


@dataclass(frozen=True, slots=True)
class Explanation:
    target: str
    address: IPv4Address
    choice: KernelChoice | None
    verdict: Verdict
    cluster_cidr: ClusterCidr | None
    exclusion: Exclusion | None
    conflict: Conflict | None
    text: str

    @property
    def via_kvpn(self) -> bool:
        return self.choice is not None and self.choice.via_kvpn

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "address": str(self.address),
            "via_kvpn": self.via_kvpn,
            "verdict": self.verdict.value,
            "route": None if self.choice is None else self.choice.route.to_json(),
            "cluster_cidr": None
            if self.cluster_cidr is None
            else {"cidr": str(self.cluster_cidr.network), "kind": self.cluster_cidr.kind.value},
            "exclusion": None
            if self.exclusion is None
            else {
                "cidr": str(self.exclusion.network),
                "reason": self.exclusion.reason.value,
                "detail": self.exclusion.detail,
            },
            "conflict": None if self.conflict is None else self.conflict.describe(),
            "explanation": self.text,
        }


def kernel_choice(
    address: IPv4Address, plan: RoutePlan, local_routes: Sequence[LocalRoute]
) -> KernelChoice | None:
    """Longest prefix match over local routes + installed prefixes; then the lowest metric.

    Local routes on the kvpn TUN are ignored (the plan's prefixes stand for them). On a
    complete tie the local route is preferred: the kernel would refuse to add kvpn's.
    """
    table: list[tuple[LocalRoute, bool]] = [
        (r, False) for r in local_routes if r.dev != plan.tun
    ] + [(LocalRoute(net, plan.tun), True) for net in plan.installed]
    best = longest_match(address, [route.dst for route, _ in table])
    if not best:
        return None
    lowest = min(table[i][0].metric for i in best)
    candidates = [table[i] for i in best if table[i][0].metric == lowest]
    candidates.sort(key=lambda entry: entry[1])  # local routes (False) first
    route, via_kvpn = candidates[0]
    return KernelChoice(route, via_kvpn)


def _containing(address: IPv4Address, nets: Sequence[IPv4Network]) -> IPv4Network | None:
    found = [n for n in nets if address in n]
    return max(found, key=lambda n: n.prefixlen) if found else None


def _cidr_list(plan: RoutePlan) -> str:
    return ", ".join(f"{c.kind.value} {c.network}" for c in plan.cluster_cidrs) or "none found"


def _route_sentence(choice: KernelChoice | None) -> str:
    if choice is None:
        return "The kernel has no route for it."
    route = choice.route
    if route.dst.prefixlen == 0:
        return f"The kernel would pick the default route ({route.describe()})."
    return f"The kernel would pick {route.describe()}."


_REASON_TEXT: dict[Verdict, str] = {
    Verdict.API_SERVER: (
        "excluded because it is {detail}: routing it into the tunnel would cut the tunnel itself"
    ),
    Verdict.TUNNEL_PEER: (
        "excluded because it is {detail}: routing it into the tunnel would cut the tunnel itself"
    ),
    Verdict.USER_EXCLUDED: "excluded by --exclude-cidr {network}",
}


def explain(
    target_ip: IPv4Address | str,
    plan: RoutePlan,
    local_routes: Sequence[LocalRoute],
    *,
    name: str | None = None,
) -> Explanation:
    """Answer, in one short paragraph, where the kernel sends ``target_ip`` and why."""
    address = IPv4Address(target_ip)
    label = f"{name} ({address})" if name else str(address)
    choice = kernel_choice(address, plan, local_routes)
    cidr_match = _containing(address, [c.network for c in plan.cluster_cidrs])
    cluster_cidr = next((c for c in plan.cluster_cidrs if c.network == cidr_match), None)
    where = (
        f"it is inside {cluster_cidr.kind.value} CIDR {cluster_cidr.network}"
        if cluster_cidr is not None
        else "it is covered by kvpn's prefixes"
    )
    route_text = _route_sentence(choice)

    def done(
        verdict: Verdict,
        text: str,
        exclusion: Exclusion | None = None,
        conflict: Conflict | None = None,
    ) -> Explanation:
        return Explanation(
            target=name or str(address),
            address=address,
            choice=choice,
            verdict=verdict,
            cluster_cidr=cluster_cidr,
            exclusion=exclusion,
            conflict=conflict,
            text=text,
        )

    if choice is not None and choice.via_kvpn:
        return done(
            Verdict.ROUTED,
            f"{label} goes through kvpn: {where}, and the kernel would pick "
            f"{choice.route.dst} dev {plan.tun}, one of the prefixes kvpn installs.",
        )

    exclusion = next((e for e in plan.exclusions if address in e.network), None)
    if exclusion is not None and cluster_cidr is not None:
        verdict = _VERDICT_OF_EXCLUSION[exclusion.reason]
        if verdict is Verdict.LOCAL_ROUTE:
            conflict = _conflict_for(address, plan)
            reason = (
                f"it conflicts with the local route {conflict.local.describe()}, "
                f"which was {_conflict_outcome(conflict)}"
                if conflict is not None
                else f"it conflicts with a local route ({exclusion.detail})"
            )
            return done(
                verdict,
                f"{label} does not go through kvpn: {where} but {reason}. {route_text}",
                exclusion,
                conflict,
            )
        reason = _REASON_TEXT[verdict].format(detail=exclusion.detail, network=exclusion.network)
        return done(
            verdict,
            f"{label} does not go through kvpn: {where} but {reason}. {route_text}",
            exclusion,
        )

    if cluster_cidr is None:
        also = (
            f" It is also {exclusion.detail}, which kvpn never routes into the tunnel."
            if exclusion is not None
            and exclusion.reason in (ExclusionReason.API_SERVER, ExclusionReason.TUNNEL_PEER)
            else ""
        )
        return done(
            Verdict.OUTSIDE,
            f"{label} does not go through kvpn: it is outside every cluster CIDR "
            f"({_cidr_list(plan)}). {route_text}{also}",
            exclusion,
        )

    if plan.refused:
        return done(
            Verdict.REFUSED,
            f"{label} does not go through kvpn: {where} but the plan is refused "
            f"(--on-conflict=fail met {len(plan.conflicts)} conflicting local route(s)), so "
            f"nothing is installed. {route_text}",
            conflict=_conflict_for(address, plan),
        )

    if choice is None:
        return done(
            Verdict.NO_ROUTE,
            f"{label} does not go through kvpn: {where} but no installed prefix covers it. "
            f"{route_text}",
        )
    # Inside a cluster CIDR and not excluded, yet a local route wins: it appeared after the
    # plan was made, or it is more specific than what kvpn installed.
    return done(
        Verdict.LOCAL_ROUTE,
        f"{label} does not go through kvpn: {where} but the local route "
        f"{choice.route.describe()} is more specific than kvpn's prefixes. {route_text}",
        conflict=_conflict_for(address, plan),
    )


def _conflict_for(address: IPv4Address, plan: RoutePlan) -> Conflict | None:
    found = [c for c in plan.conflicts if address in c.overlap]
    return max(found, key=lambda c: c.local.dst.prefixlen) if found else None


_OUTCOME_TEXT: dict[ConflictAction, str] = {
    ConflictAction.KEPT_LOCAL: "kept (--on-conflict=override routes it through kvpn)",
    ConflictAction.HOST_ROUTE_KEPT: "kept (a /32 host route cannot be overridden)",
    ConflictAction.OVERRIDDEN: "overridden",
    ConflictAction.SKIPPED_CIDR: "kept by skipping the whole cluster CIDR (--on-conflict=skip)",
    ConflictAction.REFUSED: "refused (--on-conflict=fail)",
}


def _conflict_outcome(conflict: Conflict) -> str:
    return _OUTCOME_TEXT[conflict.action]


Resolver = Callable[..., list[Any]]


def resolve_target(
    target: str, *, resolver: Resolver = socket.getaddrinfo
) -> tuple[IPv4Address, str | None]:
    """An IPv4 address, or a name resolved by the system resolver: (address, name or None).

    Raises ``ValueError`` with a message fit for the user.
    """
    text = target.strip()
    try:
        parsed = ipaddress.ip_address(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, ipaddress.IPv6Address):
        raise ValueError(f"{target}: only IPv4 is routed for now")
    if isinstance(parsed, IPv4Address):
        return parsed, None
    if not text or len(text) > 253:
        raise ValueError(f"invalid target {target!r}: give an IPv4 address or a host name")
    try:
        infos = resolver(text, None, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ValueError(
            f"cannot resolve {text}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    for info in infos:
        try:
            return IPv4Address(info[4][0]), text
        except (ValueError, IndexError, TypeError):
            continue
    raise ValueError(f"cannot resolve {text}: no IPv4 address")
