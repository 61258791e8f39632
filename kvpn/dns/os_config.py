"""Pointing the operating system at kvpn's resolver, and putting everything back.

Theory of operation
-------------------
``choose_dns_mode`` picks how (``--dns-mode`` overrides ``auto``):

==============  ========================================================================
``resolved``    auto when /etc/resolv.conf points at systemd-resolved (a symlink into
                /run/systemd/resolve, or nameserver 127.0.0.53) and ``resolvectl`` exists:
                per-link DNS and domains on the TUN link (:mod:`kvpn.dns.resolved`)
``macos``       auto on macOS: ``/etc/resolver/<domain>`` files
``resolv.conf`` auto otherwise: kvpn's nameserver first and the pod search list, the
                original kept and restored byte for byte (symlinks and bind mounts handled
                by :mod:`kvpn.dns.managed_files`)
``hosts``       only on request: a marked block of service names in /etc/hosts
==============  ========================================================================

A change is first built as a plain :class:`DnsOsPlan` (printable for ``--dry-run``), then
applied. Applying journals first: the state file (``dns-os-state.json`` in the session's
state folder) records every file's original - bytes, mode or symlink target - *before* the
file is touched, so a crash at any point leaves enough to undo it. ``restore_from_state``
reads only that file, so ``kvpn clean`` can run it after a crash, in a new process. The state
file is deleted once everything is back; when something cannot be restored it stays, and the
report says why.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from kvpn.dns import resolved
from kvpn.dns.hosts_file import HostsEntry, hosts_with_block, hosts_without_block
from kvpn.dns.macos_resolver import resolver_files
from kvpn.dns.managed_files import (
    MOUNTINFO,
    FileKind,
    FileSnapshot,
    RestoreOutcome,
    restore_file,
    sha256,
    snapshot_file,
    write_file,
)
from kvpn.dns.resolv_conf import (
    ResolvConf,
    cluster_search_list,
    parse_resolv_conf,
    render_resolv_conf,
)
from kvpn.dns.resolved import CommandRunner, run_command

__all__ = [
    "DNS_MODE_CHOICES",
    "DnsConfigError",
    "DnsMode",
    "DnsOsPlan",
    "DnsPaths",
    "RestoreReport",
    "apply_dns_plan",
    "choose_dns_mode",
    "plan_dns",
    "read_original_resolv_conf",
    "restore_from_state",
    "update_hosts_entries",
]

STATE_FILE = "dns-os-state.json"
STATE_VERSION = 1
RESOLVED_STUB = "127.0.0.53"


class DnsMode(enum.Enum):
    RESOLVED = "resolved"
    RESOLV_CONF = "resolv.conf"
    HOSTS = "hosts"
    MACOS = "macos"


DNS_MODE_CHOICES = ("auto", *(mode.value for mode in DnsMode))


class DnsConfigError(Exception):
    """The system's DNS configuration could not be changed or inspected as needed."""


@dataclass(frozen=True, slots=True)
class DnsPaths:
    """Every system path this module touches; tests point them into a temporary folder."""

    resolv_conf: Path = Path("/etc/resolv.conf")
    hosts: Path = Path("/etc/hosts")
    macos_resolver_dir: Path = Path("/etc/resolver")
    resolved_dir: Path = Path("/run/systemd/resolve")
    mountinfo: Path = MOUNTINFO


@dataclass(frozen=True, slots=True)
class DnsOsPlan:
    mode: DnsMode
    nameserver: str  # the TUN address kvpn's resolver listens on
    port: int = 53
    link: str = ""  # the TUN interface (resolved mode)
    search: tuple[str, ...] = ()
    routing_domains: tuple[str, ...] = ()  # resolved (as ~domain) and macOS files
    hosts_entries: tuple[HostsEntry, ...] = ()
    session: str = ""

    def describe(self) -> list[str]:
        """What applying the plan will do, one line each (for ``--dry-run``)."""
        lines = [f"DNS mode: {self.mode.value}; resolver {self.nameserver}:{self.port}"]
        if self.mode == DnsMode.RESOLVED:
            for argv in resolved.apply_commands(
                link=self.link,
                nameserver=self.nameserver,
                port=self.port,
                search=self.search,
                routing_domains=self.routing_domains,
            ):
                lines.append("run: " + " ".join(argv))
        elif self.mode == DnsMode.RESOLV_CONF:
            lines.append(f"rewrite resolv.conf: nameserver first, search {' '.join(self.search)}")
        elif self.mode == DnsMode.MACOS:
            lines += [f"write /etc/resolver/{d}" for d in self.routing_domains]
        else:
            lines.append(f"add {len(self.hosts_entries)} service names to /etc/hosts")
        return lines


@dataclass(frozen=True, slots=True)
class RestoreReport:
    mode: str | None
    ok: bool
    notes: tuple[str, ...] = ()


# -- choosing and planning -----------------------------------------------------------------


def _points_at_resolved(paths: DnsPaths) -> bool:
    path = paths.resolv_conf
    with contextlib.suppress(OSError):
        if path.is_symlink():
            target = Path(os.path.normpath(path.parent / os.readlink(path)))
            if target.parent == paths.resolved_dir:
                return True
    try:
        return RESOLVED_STUB in parse_resolv_conf(path.read_bytes()).nameservers
    except OSError:
        return False


def choose_dns_mode(
    requested: str = "auto",
    *,
    paths: DnsPaths = DnsPaths(),
    platform: str = sys.platform,
    which: Callable[[str], str | None] = shutil.which,
) -> DnsMode:
    if requested != "auto":
        try:
            return DnsMode(requested)
        except ValueError:
            raise DnsConfigError(
                f"unknown DNS mode {requested!r}; choose one of {', '.join(DNS_MODE_CHOICES)}"
            ) from None
    if platform == "darwin":
        return DnsMode.MACOS
    if which("resolvectl") and _points_at_resolved(paths):
        return DnsMode.RESOLVED
    return DnsMode.RESOLV_CONF


def plan_dns(
    mode: DnsMode,
    *,
    nameserver: str,
    namespace: str,
    cluster_domain: str = "cluster.local",
    port: int = 53,
    link: str = "",
    route_namespaces: Iterable[str] = (),
    reverse_networks: Iterable[IPv4Network] = (),
    hosts_entries: Iterable[HostsEntry] = (),
    session: str = "",
) -> DnsOsPlan:
    """*route_namespaces*: namespaces whose ``svc.ns`` names resolved/macOS send to kvpn."""
    if mode == DnsMode.RESOLVED and not link:
        raise DnsConfigError("resolved mode needs the TUN link name")
    domain = cluster_domain.strip(".")
    routing = [domain, *route_namespaces, *resolved.reverse_zones(reverse_networks)]
    return DnsOsPlan(
        mode=mode,
        nameserver=nameserver,
        port=port,
        link=link,
        search=cluster_search_list(namespace, domain),
        routing_domains=tuple(dict.fromkeys(routing)),
        hosts_entries=tuple(hosts_entries),
        session=session,
    )


def read_original_resolv_conf(mode: DnsMode, *, paths: DnsPaths = DnsPaths()) -> ResolvConf:
    """The laptop's own resolver settings: where kvpn sends every non-cluster name.

    Under systemd-resolved the real upstreams are in ``/run/systemd/resolve/resolv.conf``
    (``/etc/resolv.conf`` names the stub, which could route names back to kvpn).
    """
    candidates = [paths.resolv_conf]
    if mode == DnsMode.RESOLVED:
        candidates.insert(0, paths.resolved_dir / "resolv.conf")
    for path in candidates:
        try:
            return parse_resolv_conf(path.read_bytes())
        except OSError:
            continue
    return ResolvConf()


# -- state ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _State:
    mode: str
    session: str = ""
    files: list[tuple[FileSnapshot, str]] = field(default_factory=list)  # before, sha written
    resolved_link: str = ""
    created_dirs: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "mode": self.mode,
            "session": self.session,
            "files": [{"before": b.to_json(), "written_sha256": w} for b, w in self.files],
            "resolved_link": self.resolved_link,
            "created_dirs": self.created_dirs,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _State:
        return cls(
            mode=str(data["mode"]),
            session=str(data.get("session", "")),
            files=[
                (FileSnapshot.from_json(f["before"]), str(f["written_sha256"]))
                for f in data.get("files", [])
            ],
            resolved_link=str(data.get("resolved_link", "")),
            created_dirs=[str(d) for d in data.get("created_dirs", [])],
        )


def _state_path(state_dir: Path) -> Path:
    return state_dir / STATE_FILE


def _save_state(state_dir: Path, state: _State) -> None:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = _state_path(state_dir)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(state.to_json(), indent=1))
    with open(temporary, "rb") as f:
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _load_state(state_dir: Path) -> _State | None:
    try:
        return _State.from_json(json.loads(_state_path(state_dir).read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise DnsConfigError(f"unreadable DNS state in {_state_path(state_dir)}: {exc}") from exc


# -- applying ------------------------------------------------------------------------------


def _write_files(
    state_dir: Path, state: _State, changes: list[tuple[Path, bytes]], paths: DnsPaths
) -> None:
    """Journal every original, then write every file; on failure undo what was done."""
    for path, data in changes:
        state.files.append((snapshot_file(path), sha256(data)))
    _save_state(state_dir, state)
    try:
        for path, data in changes:
            write_file(path, data, mountinfo=paths.mountinfo)
    except OSError as exc:
        report = restore_from_state(state_dir)
        raise DnsConfigError(
            f"cannot write {exc.filename or ''}: {exc}; " + "; ".join(report.notes)
        ) from exc


def _apply_resolv_conf(
    plan: DnsOsPlan, state_dir: Path, paths: DnsPaths, runner: CommandRunner
) -> None:
    if plan.port != 53:
        raise DnsConfigError("resolv.conf cannot name a port other than 53")
    before = snapshot_file(paths.resolv_conf)
    original = parse_resolv_conf(before.content)
    if original.written_by_kvpn:
        raise DnsConfigError(
            f"{paths.resolv_conf} was written by kvpn and no record of the original is left; "
            "restore it by hand (or from your network manager) before connecting"
        )
    data = render_resolv_conf(original, nameserver=plan.nameserver, search=plan.search)
    _write_files(
        state_dir, _State(plan.mode.value, plan.session), [(paths.resolv_conf, data)], paths
    )


def _apply_hosts(plan: DnsOsPlan, state_dir: Path, paths: DnsPaths, runner: CommandRunner) -> None:
    current = snapshot_file(paths.hosts).content
    data = hosts_with_block(current, plan.hosts_entries, session=plan.session)
    _write_files(state_dir, _State(plan.mode.value, plan.session), [(paths.hosts, data)], paths)


def _apply_macos(plan: DnsOsPlan, state_dir: Path, paths: DnsPaths, runner: CommandRunner) -> None:
    state = _State(plan.mode.value, plan.session)
    folder = paths.macos_resolver_dir
    if not folder.exists():
        state.created_dirs.append(str(folder))
        _save_state(state_dir, state)
        folder.mkdir(parents=True, mode=0o755)
    files = resolver_files(plan.routing_domains, nameserver=plan.nameserver, port=plan.port)
    _write_files(state_dir, state, [(folder / name, data) for name, data in files.items()], paths)


def _apply_resolved(
    plan: DnsOsPlan, state_dir: Path, paths: DnsPaths, runner: CommandRunner
) -> None:
    _save_state(state_dir, _State(plan.mode.value, plan.session, resolved_link=plan.link))
    commands = resolved.apply_commands(
        link=plan.link,
        nameserver=plan.nameserver,
        port=plan.port,
        search=plan.search,
        routing_domains=plan.routing_domains,
    )
    for argv in commands:
        result = runner(argv)
        if result.returncode != 0:
            restore_from_state(state_dir, runner=runner)
            raise DnsConfigError(f"`{' '.join(argv)}` failed: {result.stderr.strip()}")


_APPLY = {
    DnsMode.RESOLV_CONF: _apply_resolv_conf,
    DnsMode.HOSTS: _apply_hosts,
    DnsMode.MACOS: _apply_macos,
    DnsMode.RESOLVED: _apply_resolved,
}


def apply_dns_plan(
    plan: DnsOsPlan,
    *,
    state_dir: Path,
    paths: DnsPaths = DnsPaths(),
    runner: CommandRunner = run_command,
) -> None:
    """Make the change; the originals are journaled in *state_dir* before anything is touched."""
    if _state_path(state_dir).exists():
        raise DnsConfigError(
            f"an earlier DNS change is still recorded in {_state_path(state_dir)}; "
            "run `kvpn clean` to restore it first"
        )
    _APPLY[plan.mode](plan, state_dir, paths, runner)


def update_hosts_entries(
    state_dir: Path, entries: Iterable[HostsEntry], *, mountinfo: Path = MOUNTINFO
) -> None:
    """Hosts mode: replace the block with *entries* (called from the caller's service watch)."""
    state = _load_state(state_dir)
    if state is None or state.mode != DnsMode.HOSTS.value or not state.files:
        raise DnsConfigError("hosts mode is not active")
    before, _ = state.files[0]
    path = Path(before.path)
    data = hosts_with_block(snapshot_file(path).content, entries, session=state.session)
    state.files[0] = (before, sha256(data))
    _save_state(state_dir, state)
    write_file(path, data, mountinfo=mountinfo)


# -- restoring -----------------------------------------------------------------------------


def _restore_one(
    before: FileSnapshot, written: str, state: _State, state_dir: Path, mountinfo: Path
) -> str | None:
    """Put one file back; return a note when it needed attention."""
    outcome = restore_file(before, written, mountinfo=mountinfo)
    if outcome != RestoreOutcome.CHANGED_BY_OTHERS:
        return None
    path = Path(before.path)
    if state.mode == DnsMode.HOSTS.value:
        stripped, found = hosts_without_block(snapshot_file(path).content)
        if found:
            write_file(path, stripped, mountinfo=mountinfo)
        return f"{path} was edited while connected: removed kvpn's block, kept the rest"
    kept = state_dir / f"{path.name}.original"
    if before.kind == FileKind.SYMLINK:
        kept.write_text(before.link_target + "\n")
    elif before.kind == FileKind.REGULAR:
        kept.write_bytes(before.content)
    return (
        f"{path} was changed by another program while connected; left as it is "
        f"(the original is kept in {kept})"
    )


def restore_from_state(
    state_dir: Path, *, runner: CommandRunner = run_command, mountinfo: Path = MOUNTINFO
) -> RestoreReport:
    """Undo the DNS change journaled in *state_dir* (on exit, or from ``kvpn clean``)."""
    try:
        state = _load_state(state_dir)
    except DnsConfigError as exc:
        return RestoreReport(None, False, (str(exc),))
    if state is None:
        return RestoreReport(None, True, ("no DNS change recorded",))
    notes: list[str] = []
    ok = True
    for before, written in state.files:
        try:
            note = _restore_one(before, written, state, state_dir, mountinfo)
        except OSError as exc:
            ok = False
            note = f"cannot restore {before.path}: {exc}"
        if note:
            notes.append(note)
    for folder in state.created_dirs:
        with contextlib.suppress(OSError):
            os.rmdir(folder)  # only when empty: never removes the user's files
    if state.resolved_link:
        result = runner(resolved.revert_command(state.resolved_link))
        if result.returncode != 0:
            notes.append(
                f"resolvectl revert {state.resolved_link}: {result.stderr.strip() or 'failed'}"
                " (the link is gone with the TUN, which drops its settings)"
            )
    if ok:
        _state_path(state_dir).unlink(missing_ok=True)
    return RestoreReport(state.mode, ok, tuple(notes))
