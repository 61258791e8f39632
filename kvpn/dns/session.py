"""The DNS side of a ``kvpn connect`` session: the cluster's DNS address, its namespaces, and
who owns this machine's DNS change.

Theory of operation
-------------------
``kvpn connect`` (:mod:`kvpn.connect_session`) calls these in order, registering each undo
before the change it undoes:

1. :func:`recover_leftover_dns` before anything else. The machine's DNS change is journaled
   in one folder per network namespace (:func:`machine_dns_dir`: ``/run/kvpn/dns/netns-<inode>``;
   resolv.conf belongs to the machine, so one session at a time may own it). ``owner.json``
   names the owning process (pid and start time, so a recycled pid does not count as alive).
   A journal whose owner is gone is a crashed session's: it is restored there and then with
   :func:`kvpn.dns.os_config.restore_from_state`. A live owner means another session
   manages DNS: the caller refuses to change DNS too.
2. :func:`find_cluster_dns`: the ClusterIP of ``kube-system/kube-dns``. Users with
   namespace-only RBAC cannot read it; then the conventional address (the tenth of the
   service CIDR, what kubeadm, kind, k3s and minikube use) is used if it answers a test
   query for ``kubernetes.default.svc.<domain>`` - the query goes through the tunnel, like
   every later cluster query.
3. :func:`list_namespaces` (all namespaces, or the connected namespace plus ``default`` and
   ``kube-system`` when listing is forbidden) and, in hosts mode, :func:`list_service_entries`;
   :class:`ClusterNamesRefresh` repeats both every ``interval`` seconds while connected.
4. :func:`claim_dns` writes ``owner.json`` before the OS change is applied; on exit
   :func:`restore_machine_dns` restores and then releases it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from dnslib import DNSRecord

from kvpn.dns.actions import UpstreamServer
from kvpn.dns.exchange import DnsExchangeError, udp_exchange
from kvpn.dns.hosts_file import HostsEntry, ServiceAddress, service_host_entries
from kvpn.dns.names import ClusterNames
from kvpn.dns.os_config import STATE_FILE, RestoreReport, restore_from_state, update_hosts_entries
from kvpn.dns.resolver import DnsResolver

__all__ = [
    "ClusterDns",
    "ClusterNamesRefresh",
    "DnsOwner",
    "DnsSetupError",
    "DnsStatus",
    "Leftover",
    "LeftoverKind",
    "NamespaceListing",
    "claim_dns",
    "find_cluster_dns",
    "list_namespaces",
    "list_service_entries",
    "machine_dns_dir",
    "process_alive",
    "recover_leftover_dns",
    "restore_machine_dns",
]

log = logging.getLogger("kvpn.dns.session")

CLUSTER_DNS_SERVICE = ("kube-system", "kube-dns")
CONVENTIONAL_DNS_OFFSET = 10
PROBE_TIMEOUT = 2.0
FALLBACK_NAMESPACES = ("default", "kube-system")
REFRESH_INTERVAL = 15.0
API_TIMEOUT = 10
OWNER_FILE = "owner.json"
NETNS_LINK = Path("/proc/self/ns/net")
FORBIDDEN = (401, 403)


class DnsSetupError(Exception):
    """The cluster's DNS cannot be used (not found, not answering)."""


def _api_reason(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if status is None:
        return str(exc) or type(exc).__name__
    return f"{status} {reason or ''}".strip()


# -- the cluster's DNS ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClusterDns:
    address: IPv4Address
    note: str = ""  # how it was found, when not from the kube-dns service


async def answers_dns(address: IPv4Address, domain: str, *, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether *address* answers a query for ``kubernetes.default.svc.<domain>`` at all."""
    query = DNSRecord.question(f"kubernetes.default.svc.{domain.strip('.')}")
    try:
        answer = await udp_exchange(UpstreamServer(str(address)), query.pack(), timeout=timeout)
    except DnsExchangeError:
        return False
    return len(answer) >= 12 and answer[2] & 0x80 != 0  # QR set: a response


def read_cluster_dns_service(core: Any) -> IPv4Address:
    """The ClusterIP of kube-system/kube-dns; :class:`DnsSetupError` saying why not."""
    namespace, name = CLUSTER_DNS_SERVICE
    try:
        service = core.read_namespaced_service(name, namespace, _request_timeout=API_TIMEOUT)
    except Exception as exc:  # ApiException, or the connection failing
        raise DnsSetupError(f"{namespace}/{name} is not readable ({_api_reason(exc)})") from None
    cluster_ip = getattr(getattr(service, "spec", None), "cluster_ip", None)
    try:
        return IPv4Address(str(cluster_ip))
    except ValueError:
        raise DnsSetupError(f"{namespace}/{name} has no IPv4 ClusterIP ({cluster_ip})") from None


async def find_cluster_dns(
    core: Any,
    service_cidrs: Iterable[IPv4Network],
    *,
    domain: str,
    probe: Callable[[IPv4Address, str], Awaitable[bool]] = answers_dns,
) -> ClusterDns:
    """Where the cluster's DNS listens; call once the service CIDR is routed into the TUN."""
    try:
        return ClusterDns(await asyncio.to_thread(read_cluster_dns_service, core))
    except DnsSetupError as exc:
        problem = str(exc)
    for cidr in service_cidrs:
        if cidr.num_addresses <= CONVENTIONAL_DNS_OFFSET:
            continue
        guess = cidr.network_address + CONVENTIONAL_DNS_OFFSET
        if await probe(guess, domain):
            return ClusterDns(guess, f"{problem}; using {guess}, which answers DNS queries")
        problem += f"; {guess} does not answer DNS queries"
    raise DnsSetupError(f"cannot find the cluster DNS: {problem}")


# -- namespaces and services ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NamespaceListing:
    names: tuple[str, ...]
    complete: bool  # False: listing was forbidden, these are the connected ns + defaults
    reason: str = ""


def list_namespaces(core: Any, connected: str) -> NamespaceListing:
    """Every namespace; with namespace-only RBAC the connected one, default and kube-system."""
    try:
        items = core.list_namespace(_request_timeout=API_TIMEOUT).items or []
    except Exception as exc:
        if getattr(exc, "status", None) not in FORBIDDEN:
            raise
        names = tuple(dict.fromkeys((connected, *FALLBACK_NAMESPACES)))
        return NamespaceListing(names, complete=False, reason=_api_reason(exc))
    return NamespaceListing(tuple(sorted(str(item.metadata.name) for item in items)), True)


def list_service_entries(core: Any, connected: str, domain: str) -> tuple[HostsEntry, ...]:
    """Hosts mode: lines for every service the user may list (else the connected namespace)."""
    try:
        items = core.list_service_for_all_namespaces(_request_timeout=API_TIMEOUT).items or []
    except Exception as exc:
        if getattr(exc, "status", None) not in FORBIDDEN:
            raise
        items = core.list_namespaced_service(connected, _request_timeout=API_TIMEOUT).items or []
    services = [
        ServiceAddress(
            str(item.metadata.name), str(item.metadata.namespace), str(item.spec.cluster_ip or "")
        )
        for item in items
    ]
    return service_host_entries(services, connected_namespace=connected, cluster_domain=domain)


@dataclass
class ClusterNamesRefresh:
    """Keeps the resolver's namespace set (and, in hosts mode, the hosts block) current."""

    core: Any
    resolver: DnsResolver
    namespace: str
    domain: str
    reverse_networks: tuple[IPv4Network, ...]
    hosts_state_dir: Path | None = None  # set in hosts mode
    hosts_entries: tuple[HostsEntry, ...] = ()
    interval: float = REFRESH_INTERVAL
    failures: int = 0

    def names_for(self, namespaces: Iterable[str]) -> ClusterNames:
        return ClusterNames.build(
            domain=self.domain,
            namespace=self.namespace,
            namespaces=namespaces,
            reverse_networks=self.reverse_networks,
        )

    async def refresh_once(self) -> None:
        listing = await asyncio.to_thread(list_namespaces, self.core, self.namespace)
        self.resolver.update_names(self.names_for(listing.names))  # no-op when unchanged
        if self.hosts_state_dir is None:
            return
        entries = await asyncio.to_thread(
            list_service_entries, self.core, self.namespace, self.domain
        )
        if entries != self.hosts_entries:
            await asyncio.to_thread(update_hosts_entries, self.hosts_state_dir, entries)
            self.hosts_entries = entries

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.refresh_once()
            except Exception as exc:  # the API server away for a moment: keep what we have
                self.failures += 1
                log.debug("refreshing cluster names failed: %r", exc)


# -- the machine's DNS change and its owner -------------------------------------------------


def machine_dns_dir(state_dir: Path, *, netns_link: Path = NETNS_LINK) -> Path:
    """The journal folder for this machine's DNS: one per network namespace."""
    try:
        return state_dir / "dns" / f"netns-{os.stat(netns_link).st_ino}"
    except OSError:  # no /proc (macOS): one machine, one folder
        return state_dir / "dns" / "local"


def _process_start(pid: int, proc: Path) -> int:
    """Start time of *pid* in clock ticks since boot (field 22 of /proc/PID/stat); 0 unknown."""
    try:
        text = (proc / str(pid) / "stat").read_text()
        return int(text[text.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def process_alive(pid: int, started: int, *, proc: Path = Path("/proc")) -> bool:
    """Whether *pid* runs and is the same process (same start time, when known)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _process_start(pid, proc)
    return not (started and now and now != started)


@dataclass(frozen=True, slots=True)
class DnsOwner:
    pid: int
    started: int  # see _process_start
    session: str

    @classmethod
    def this_process(cls, session: str) -> DnsOwner:
        return cls(os.getpid(), _process_start(os.getpid(), Path("/proc")), session)

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "started": self.started, "session": self.session}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DnsOwner:
        return cls(int(data["pid"]), int(data.get("started", 0)), str(data.get("session", "")))


def _read_owner(dns_dir: Path) -> DnsOwner | None:
    try:
        return DnsOwner.from_json(json.loads((dns_dir / OWNER_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def claim_dns(dns_dir: Path, owner: DnsOwner) -> None:
    """Record *owner* before its DNS change is applied (atomic, so never half written)."""
    dns_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = dns_dir / f".{OWNER_FILE}.tmp"
    temporary.write_text(json.dumps(owner.to_json()))
    os.replace(temporary, dns_dir / OWNER_FILE)


def _release(dns_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (dns_dir / OWNER_FILE).unlink()
    with contextlib.suppress(OSError):
        dns_dir.rmdir()  # only when empty


def restore_machine_dns(
    dns_dir: Path, *, restore: Callable[[Path], RestoreReport] = restore_from_state
) -> RestoreReport:
    """Put the journaled DNS change back; release the ownership once nothing is left."""
    report = restore(dns_dir)
    if report.ok:
        _release(dns_dir)
    return report


class LeftoverKind(enum.Enum):
    NONE = "none"
    RESTORED = "restored"  # a crashed session's change, now undone
    LIVE_OWNER = "live_owner"  # another running session manages DNS
    RESTORE_FAILED = "restore_failed"


@dataclass(frozen=True, slots=True)
class Leftover:
    kind: LeftoverKind
    owner: DnsOwner | None = None
    notes: tuple[str, ...] = ()
    journal: Path | None = None

    def describe(self) -> list[str]:
        """What happened, for the user, one line each."""
        who = (
            f"kvpn session {self.owner.session or '?'} (pid {self.owner.pid})"
            if self.owner is not None
            else "a kvpn session that left no owner record"
        )
        lines: dict[LeftoverKind, list[str]] = {
            LeftoverKind.NONE: [],
            LeftoverKind.RESTORED: [
                f"restored the DNS settings left by {who}, which is no longer running"
            ],
            LeftoverKind.LIVE_OWNER: [f"{who} is running and manages this machine's DNS"],
            LeftoverKind.RESTORE_FAILED: [
                f"could not restore the DNS settings left by {who}, which is no longer "
                f"running; the originals are recorded in {self.journal} (README: DNS, "
                "restoring by hand)"
            ],
        }
        return lines[self.kind] + [f"note: {note}" for note in self.notes]


def recover_leftover_dns(
    dns_dir: Path,
    *,
    alive: Callable[[int, int], bool] = process_alive,
    restore: Callable[[Path], RestoreReport] = restore_from_state,
) -> Leftover:
    """Find a DNS change journaled in *dns_dir*; undo it when its owner is dead."""
    owner = _read_owner(dns_dir)
    journal = dns_dir / STATE_FILE
    if owner is not None and alive(owner.pid, owner.started):
        return Leftover(LeftoverKind.LIVE_OWNER, owner)
    if not journal.exists():
        if owner is not None:  # died between claiming and applying: nothing to undo
            _release(dns_dir)
        return Leftover(LeftoverKind.NONE)
    report = restore_machine_dns(dns_dir, restore=restore)
    kind = LeftoverKind.RESTORED if report.ok else LeftoverKind.RESTORE_FAILED
    return Leftover(kind, owner, report.notes, journal)


# -- what the session reports --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DnsStatus:
    mode: str  # "off" or a DnsMode value
    resolver: str = ""  # "198.19.255.1:53"
    cluster_dns: str = ""
    journal_dir: str = ""
    reason: str = ""  # why DNS is off, when it is

    def summary(self) -> str:
        if self.mode == "off":
            return "off" + (f" ({self.reason})" if self.reason else "")
        return f"{self.mode}, resolver {self.resolver}"

    def to_json(self) -> dict[str, str]:
        return {
            "mode": self.mode,
            "resolver": self.resolver,
            "cluster_dns": self.cluster_dns,
            "journal_dir": self.journal_dir,
            "reason": self.reason,
        }
