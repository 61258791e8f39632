"""``hosts`` mode: the services of chosen namespaces as a marked block at the end of /etc/hosts.

For systems where neither systemd-resolved nor resolv.conf can be used (or by choice). The
block is appended after the user's content and replaced whole on every update (the caller
keeps it current from a watch on services); removing it gives back the original bytes: the
newline kvpn added before the block, when the file did not end with one, goes too.
Headless services (no ClusterIP) cannot be listed: their addresses are the pods' and change.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "BLOCK_END",
    "HostsEntry",
    "ServiceAddress",
    "hosts_with_block",
    "hosts_without_block",
    "service_host_entries",
]

BLOCK_BEGIN = b"# BEGIN kvpn"
BLOCK_END = b"# END kvpn"
ADDED_NEWLINE_FLAG = b" +newline"


@dataclass(frozen=True, slots=True)
class ServiceAddress:
    name: str
    namespace: str
    cluster_ip: str  # "None" or "" for a headless service


@dataclass(frozen=True, slots=True)
class HostsEntry:
    address: str
    names: tuple[str, ...]


def service_host_entries(
    services: Iterable[ServiceAddress], *, connected_namespace: str, cluster_domain: str
) -> tuple[HostsEntry, ...]:
    """One line per service: short name (connected namespace only), ``svc.ns``, full name."""
    domain = cluster_domain.strip(".")
    entries: list[HostsEntry] = []
    for svc in sorted(
        services, key=lambda s: (s.namespace != connected_namespace, s.namespace, s.name)
    ):
        try:
            address = str(ipaddress.ip_address(svc.cluster_ip))
        except ValueError:
            continue
        names = [
            f"{svc.name}.{svc.namespace}",
            f"{svc.name}.{svc.namespace}.svc",
            f"{svc.name}.{svc.namespace}.svc.{domain}",
        ]
        if svc.namespace == connected_namespace:
            names.insert(0, svc.name)
        entries.append(HostsEntry(address, tuple(names)))
    return tuple(entries)


def _render_block(entries: Iterable[HostsEntry], session: str, *, added_newline: bool) -> bytes:
    flag = ADDED_NEWLINE_FLAG if added_newline else b""
    title = f" {session} (cluster services; removed when kvpn disconnects)".encode()
    lines = [BLOCK_BEGIN + flag + title]
    lines += [f"{e.address}\t{' '.join(e.names)}".encode() for e in entries]
    lines.append(BLOCK_END)
    return b"\n".join(lines) + b"\n"


def hosts_without_block(content: bytes) -> tuple[bytes, bool]:
    """*content* minus the kvpn block (and the newline kvpn added); whether one was found."""
    lines = content.splitlines(keepends=True)
    begin = next((i for i, line in enumerate(lines) if line.startswith(BLOCK_BEGIN)), None)
    if begin is None:
        return content, False
    end = next(
        (i for i in range(begin, len(lines)) if lines[i].rstrip(b"\r\n") == BLOCK_END),
        len(lines) - 1,
    )
    before = b"".join(lines[:begin])
    if lines[begin].startswith(BLOCK_BEGIN + ADDED_NEWLINE_FLAG) and before.endswith(b"\n"):
        before = before[:-1]
    return before + b"".join(lines[end + 1 :]), True


def hosts_with_block(content: bytes, entries: Iterable[HostsEntry], *, session: str) -> bytes:
    """*content* with the kvpn block (re)placed at the end."""
    base, _ = hosts_without_block(content)
    added_newline = bool(base) and not base.endswith(b"\n")
    separator = b"\n" if added_newline else b""
    return base + separator + _render_block(entries, session, added_newline=added_newline)
