"""systemd-resolved mode: per-link DNS server and domains on the TUN link, set with resolvectl.

No file is edited. resolved sends a query to the TUN link's server when the name ends in one
of the link's domains; ``default-route false`` keeps every other name away from it, so
external lookups never touch kvpn. The domains are the pod search list
``<ns>.svc.<domain> svc.<domain> <domain>`` (search *and* routing domains: resolved appends
search domains to single-label names, so ``echo`` works), routing-only ``~<ns>`` for the
namespaces the caller chose (resolved does not search multi-label names, so ``echo.other``
reaches kvpn only this way; beware a namespace named like a public TLD such as ``dev``), and
``~<zone>.in-addr.arpa`` reverse zones covering the pod and service CIDRs.

The settings live as long as the link: deleting the TUN drops them. ``resolvectl revert``
on exit (and from ``kvpn clean``) covers a link that outlives kvpn.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network

__all__ = [
    "CommandResult",
    "CommandRunner",
    "apply_commands",
    "reverse_zones",
    "revert_command",
    "run_command",
]

MAX_REVERSE_ZONES = 256


@dataclass(frozen=True, slots=True)
class CommandResult:
    returncode: int
    stdout: str = ""
    stderr: str = ""


CommandRunner = Callable[[Sequence[str]], CommandResult]


def run_command(argv: Sequence[str]) -> CommandResult:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return CommandResult(127, "", str(exc))
    return CommandResult(done.returncode, done.stdout, done.stderr)


def reverse_zones(networks: Iterable[IPv4Network]) -> tuple[str, ...]:
    """``in-addr.arpa`` zones (whole octets) covering *networks*: 10.96.0.0/12 -> 16 zones."""
    zones: list[str] = []
    for network in networks:
        octets = min(3, max(1, -(-network.prefixlen // 8)))  # round the prefix up to an octet
        prefix = octets * 8
        subnets = (
            [network] if network.prefixlen >= prefix else list(network.subnets(new_prefix=prefix))
        )
        if len(subnets) > MAX_REVERSE_ZONES:
            octets -= 1
            subnets = [network.supernet(new_prefix=octets * 8)]
        for subnet in subnets:
            parts = str(subnet.network_address).split(".")[:octets]
            zones.append(".".join(reversed(parts)) + ".in-addr.arpa")
    return tuple(dict.fromkeys(zones))


def apply_commands(
    *,
    link: str,
    nameserver: str,
    port: int,
    search: Sequence[str],
    routing_domains: Sequence[str],
) -> list[list[str]]:
    server = nameserver if port == 53 else f"{nameserver}:{port}"
    domains = [*search, *(f"~{d}" for d in routing_domains)]
    return [
        ["resolvectl", "dns", link, server],
        ["resolvectl", "domain", link, *domains],
        ["resolvectl", "default-route", link, "false"],
    ]


def revert_command(link: str) -> list[str]:
    return ["resolvectl", "revert", link]
