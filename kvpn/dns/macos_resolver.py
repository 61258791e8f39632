"""macOS mode: one ``/etc/resolver/<domain>`` file per domain routed to kvpn (resolver(5)).

macOS sends a query to the servers of the most specific ``/etc/resolver`` file whose name is
a suffix of the name. Files are written for the cluster domain, for the namespaces chosen
(so ``echo.other`` reaches kvpn and is mapped there) and for the reverse zones of the pod and
service CIDRs. A file that already exists (the user's own) is snapshotted and restored like
any other managed file. Short single-label names (``echo``) need the system search list,
which lives in the SystemConfiguration store (``scutil``), not in these files: not done yet.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["resolver_files"]


def resolver_files(domains: Iterable[str], *, nameserver: str, port: int) -> dict[str, bytes]:
    """File name -> content for every domain (names must not contain a slash)."""
    body = (
        "# kvpn: written while `kvpn connect` runs; removed on exit or by `kvpn clean`\n"
        f"nameserver {nameserver}\n"
        f"port {port}\n"
    ).encode()
    files: dict[str, bytes] = {}
    for domain in domains:
        name = domain.strip(".").lower()
        if name and "/" not in name and not name.startswith("."):
            files[name] = body
    return files
