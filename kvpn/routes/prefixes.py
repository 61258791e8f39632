"""IPv4 prefix arithmetic used by route planning: parse, subtract, intersect, match.

Pure functions over :class:`ipaddress.IPv4Network`; nothing here touches the system.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network

__all__ = [
    "exclude",
    "intersection",
    "is_default_like",
    "longest_match",
    "parse_ipv4_cidr",
]

#: Routes that only say "everything else": the default route and the two halves that
#: OpenVPN/WireGuard install instead of it (``def1``). They never conflict with a cluster
#: CIDR, because any cluster prefix is more specific and wins in the kernel anyway.
DEFAULT_LIKE = frozenset(
    {IPv4Network("0.0.0.0/0"), IPv4Network("0.0.0.0/1"), IPv4Network("128.0.0.0/1")}
)


def parse_ipv4_cidr(text: str) -> IPv4Network:
    """``10.96.0.0/12`` or a bare address (a /32). Host bits must be zero.

    Raises ``ValueError`` with a message fit for the user.
    """
    candidate = text.strip()
    try:
        net = ipaddress.ip_network(candidate, strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            loose = ipaddress.ip_network(candidate, strict=False)
            raise ValueError(
                f"invalid CIDR {text!r}: host bits set (did you mean {loose}?)"
            ) from None
        raise ValueError(f"invalid CIDR {text!r}") from None
    if not isinstance(net, IPv4Network):
        raise ValueError(f"invalid CIDR {text!r}: only IPv4 is routed for now")
    return net


def is_default_like(network: IPv4Network) -> bool:
    return network in DEFAULT_LIKE


def intersection(a: IPv4Network, b: IPv4Network) -> IPv4Network | None:
    """Two prefixes either nest or are disjoint: the inner one, or None."""
    if not a.overlaps(b):
        return None
    return a if a.prefixlen >= b.prefixlen else b


def exclude(networks: Iterable[IPv4Network], excluded: Iterable[IPv4Network]) -> list[IPv4Network]:
    """``networks`` minus ``excluded``, as the minimal sorted list of disjoint prefixes."""
    result = list(ipaddress.collapse_addresses(networks))
    for ex in excluded:
        nxt: list[IPv4Network] = []
        for net in result:
            if not net.overlaps(ex):
                nxt.append(net)
            elif ex.supernet_of(net):
                continue
            else:
                nxt.extend(net.address_exclude(ex))
        result = nxt
    return sorted(ipaddress.collapse_addresses(result))


def longest_match(address: IPv4Address, candidates: Sequence[IPv4Network]) -> list[int]:
    """Indexes of the candidates with the longest prefix containing ``address`` (ties kept)."""
    best = -1
    found: list[int] = []
    for index, net in enumerate(candidates):
        if address in net:
            if net.prefixlen > best:
                best = net.prefixlen
                found = [index]
            elif net.prefixlen == best:
                found.append(index)
    return found
