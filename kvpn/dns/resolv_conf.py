"""Reading the laptop's resolv.conf (its original upstreams) and writing kvpn's version.

Parsing follows glibc's ``res_init`` as documented in resolv.conf(5): lines starting with
``#`` or ``;`` are comments; the first three ``nameserver`` lines count and an address that
does not parse is skipped; ``domain`` and ``search`` replace each other (the last one wins);
``options`` tokens accumulate (``ndots`` capped at 15, ``timeout`` at 30, ``attempts`` at 5).
Without any ``nameserver`` line the resolver uses the local machine (127.0.0.1).

The file kvpn writes while connected names kvpn's resolver first, then up to two of the
original servers (a safety net if kvpn dies without restoring: lookups then still work, after
a timeout), the cluster search list followed by the original search domains, the original
``sortlist`` and ``options`` except ``rotate`` (which would send queries past kvpn). ``ndots``
stays what it was: raising it to the pod default of 5 would send every external name through
the search list, and so through the tunnel, before asking it as is.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from kvpn.dns.actions import UpstreamServer

__all__ = [
    "KVPN_MARKER",
    "ResolvConf",
    "cluster_search_list",
    "parse_resolv_conf",
    "render_resolv_conf",
]

KVPN_MARKER = "# kvpn: "
MAX_NAMESERVERS = 3
DEFAULT_NAMESERVER = "127.0.0.1"
OPTION_LIMITS = {"ndots": 15, "timeout": 30, "attempts": 5}


@dataclass(frozen=True, slots=True)
class ResolvConf:
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    sortlist: tuple[str, ...] = ()
    options: tuple[str, ...] = ()  # raw tokens, in order
    ndots: int = 1
    timeout: int = 5
    attempts: int = 2
    written_by_kvpn: bool = False

    def upstreams(self) -> tuple[UpstreamServer, ...]:
        return tuple(UpstreamServer(host) for host in self.nameservers or (DEFAULT_NAMESERVER,))


def _valid_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _option_value(token: str) -> tuple[str, int] | None:
    name, sep, value = token.partition(":")
    if not sep or name not in OPTION_LIMITS or not value.isdigit():
        return None
    return name, min(int(value), OPTION_LIMITS[name])


def parse_resolv_conf(data: bytes | str) -> ResolvConf:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    nameservers: list[str] = []
    search: list[str] = []
    sortlist: list[str] = []
    options: list[str] = []
    values = {"ndots": 1, "timeout": 5, "attempts": 2}
    written_by_kvpn = False
    for line in text.splitlines():
        if line.startswith(KVPN_MARKER):
            written_by_kvpn = True
        words = line.split()
        if not words or words[0][0] in "#;":
            continue
        keyword, args = words[0], words[1:]
        if keyword == "nameserver" and args:
            if len(nameservers) < MAX_NAMESERVERS and _valid_address(args[0]):
                nameservers.append(args[0])
        elif keyword in ("search", "domain"):
            search = args if keyword == "search" else args[:1]
        elif keyword == "sortlist":
            sortlist = args
        elif keyword == "options":
            for token in args:
                options.append(token)
                parsed = _option_value(token)
                if parsed is not None:
                    values[parsed[0]] = parsed[1]
    return ResolvConf(
        nameservers=tuple(nameservers),
        search=tuple(search),
        sortlist=tuple(sortlist),
        options=tuple(options),
        ndots=values["ndots"],
        timeout=values["timeout"],
        attempts=values["attempts"],
        written_by_kvpn=written_by_kvpn,
    )


def cluster_search_list(namespace: str, cluster_domain: str) -> tuple[str, ...]:
    """The search list of a pod in *namespace*: ``<ns>.svc.<domain> svc.<domain> <domain>``."""
    domain = cluster_domain.strip(".")
    return (f"{namespace}.svc.{domain}", f"svc.{domain}", domain)


def render_resolv_conf(
    original: ResolvConf,
    *,
    nameserver: str,
    search: Sequence[str],
    keep_original_nameservers: int = MAX_NAMESERVERS - 1,
) -> bytes:
    kept = [ns for ns in original.nameservers if ns != nameserver][:keep_original_nameservers]
    domains = list(dict.fromkeys([*search, *original.search]))
    lines = [
        f"{KVPN_MARKER}written while `kvpn connect` runs; the original is restored on exit",
        f"{KVPN_MARKER}(or by `kvpn clean` after a crash). Changes made here will be lost.",
        f"nameserver {nameserver}",
        *(f"nameserver {ns}" for ns in kept),
    ]
    if domains:
        lines.append("search " + " ".join(domains))
    if original.sortlist:
        lines.append("sortlist " + " ".join(original.sortlist))
    options = [token for token in original.options if token != "rotate"]
    if options:
        lines.append("options " + " ".join(options))
    return ("\n".join(lines) + "\n").encode()
