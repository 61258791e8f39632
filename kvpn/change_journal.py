"""The change journal: every change a session makes, written down (with its undo) first.

Theory of operation
-------------------
A session (``connect``, ``exchange``, ``preview``) opens one journal file,
``<journal dir>/<session>.journal`` (directory 0700, file 0600, see
:func:`default_journal_dir`). It is append-only JSON lines, each one fsync'd before the
change it describes is made::

    {"journal": 1, "session": "ab12cd34", "command": "connect", "user": "alice",
     "owner": {"pid": 4242, "started": 123456, "session": "ab12cd34"},
     "place": {"boot": "...", "netns": 4026531833, "cookie": 1}, "created": 1764099000.0}
    {"n": 0, "do": "create shadow pod default/kvpn-shadow-ab12cd34",
     "undo": {"kind": "delete_pod", "args": {"namespace": "default", ...}}}
    {"done": 0}

The undo is a :class:`Undo` - a kind and JSON arguments - that a *different process* can
carry out (after ``kill -9``, or after a reboot): :mod:`kvpn.journal_replay` holds the table
of kinds. :class:`kvpn.undo_stack.UndoStack` writes the entries: each ``push`` that carries an
:class:`Undo` is journaled before the step returns, and each undo that succeeds in-process
appends ``{"done": n}``. A session that undid everything removes its file.

Who owns a journal: the owner's pid *and* its start time (:class:`kvpn.dns.session.DnsOwner`,
the same liveness test as the DNS journal), so a recycled pid is not mistaken for the
session, and after a reboot every owner is dead. Where the local changes were made: the
network namespace (inode and cookie, :class:`Place`) and the boot; a journal written in
another network namespace is left to a ``kvpn clean`` run there, and after a reboot only
changes made in the namespace with the same inode (the machine's own) still exist.

This module is pure apart from reading and writing the journal files: the judgement of a
journal (:func:`judge_journal`) and the replay plan (:func:`plan_replay`) take the clock,
the liveness test and the current place as arguments. Journal files are untrusted input: a
torn or malformed line (a crash in the middle of a write) is dropped and counted.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvpn.dns.session import DnsOwner, process_alive

__all__ = [
    "JOURNAL_SUFFIX",
    "ChangeJournal",
    "JournalContents",
    "JournalEntry",
    "JournalHeader",
    "JournalVerdict",
    "JudgedJournal",
    "Place",
    "ReplayPlan",
    "ReplayStep",
    "Undo",
    "default_journal_dir",
    "judge_journal",
    "judge_journals",
    "parse_journal",
    "plan_replay",
    "read_journals",
]

JOURNAL_VERSION = 1
JOURNAL_SUFFIX = ".journal"
SO_NETNS_COOKIE = 71  # Linux >= 5.14
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
NETNS_LINK = Path("/proc/thread-self/ns/net")  # this thread's: setns(2) is per thread
ROOT_JOURNAL_DIR = Path("/var/lib/kvpn/journal")


def default_journal_dir() -> Path:
    """Where this user's journals live: ``/var/lib/kvpn/journal`` for root (it survives a
    reboot, like the changes it records), else ``$XDG_STATE_HOME/kvpn/journal``
    (``~/.local/state/kvpn/journal``). ``KVPN_JOURNAL_DIR`` overrides both."""
    override = os.environ.get("KVPN_JOURNAL_DIR")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return ROOT_JOURNAL_DIR
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "kvpn" / "journal"


# -- what is recorded ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Undo:
    """How to undo one change from any process: a kind (see kvpn.journal_replay) and its
    JSON arguments."""

    kind: str
    args: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "args": dict(self.args)}

    @classmethod
    def from_json(cls, data: object) -> Undo | None:
        if not isinstance(data, dict):
            return None
        kind, args = data.get("kind"), data.get("args", {})
        if not isinstance(kind, str) or not kind or not isinstance(args, dict):
            return None
        return cls(kind, args)


@dataclass(frozen=True, slots=True)
class Place:
    """Where local changes were made: the boot and the network namespace."""

    boot: str
    netns: int
    cookie: int = 0  # SO_NETNS_COOKIE, unique within a boot; 0 unknown

    @classmethod
    def here(cls) -> Place:
        try:
            boot = BOOT_ID.read_text().strip()
        except OSError:
            boot = ""
        netns = 0
        for link in (NETNS_LINK, Path("/proc/self/ns/net")):
            with contextlib.suppress(OSError):
                netns = os.stat(link).st_ino
                break
        cookie = 0
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            cookie = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
        return cls(boot, netns, cookie)

    def to_json(self) -> dict[str, Any]:
        return {"boot": self.boot, "netns": self.netns, "cookie": self.cookie}

    @classmethod
    def from_json(cls, data: object) -> Place | None:
        if not isinstance(data, dict):
            return None
        boot, netns, cookie = data.get("boot"), data.get("netns"), data.get("cookie", 0)
        if not isinstance(boot, str) or not isinstance(netns, int) or not isinstance(cookie, int):
            return None
        return cls(boot, netns, cookie)


class PlaceMatch(enum.Enum):
    SAME = "same"  # local changes are here
    OTHER = "other"  # another network namespace that still exists (same boot)
    GONE = "gone"  # that namespace went with a reboot: its TUN and routes are gone too


def compare_places(recorded: Place, here: Place) -> PlaceMatch:
    if recorded.boot and here.boot and recorded.boot != here.boot:
        # After a reboot only the machine's own namespace (same inode every boot) is back.
        return PlaceMatch.SAME if recorded.netns == here.netns else PlaceMatch.GONE
    if recorded.netns != here.netns:
        return PlaceMatch.OTHER
    if recorded.cookie and here.cookie and recorded.cookie != here.cookie:
        return PlaceMatch.OTHER  # a recycled inode: a different namespace
    return PlaceMatch.SAME


@dataclass(frozen=True, slots=True)
class JournalHeader:
    session: str
    command: str
    user: str
    owner: DnsOwner
    place: Place
    created: float

    def to_json(self) -> dict[str, Any]:
        return {
            "journal": JOURNAL_VERSION,
            "session": self.session,
            "command": self.command,
            "user": self.user,
            "owner": self.owner.to_json(),
            "place": self.place.to_json(),
            "created": self.created,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JournalHeader | None:
        place = Place.from_json(data.get("place"))
        owner_data = data.get("owner")
        strings = [data.get(k) for k in ("session", "command", "user")]
        created = data.get("created", 0.0)
        if place is None or not isinstance(owner_data, dict):
            return None
        if not all(isinstance(s, str) for s in strings):
            return None
        if not isinstance(created, int | float):
            return None
        try:
            owner = DnsOwner.from_json(owner_data)
        except (KeyError, TypeError, ValueError):
            return None
        session, command, user = (str(s) for s in strings)
        return cls(session, command, user, owner, place, float(created))

    @classmethod
    def for_this_process(cls, session: str, command: str, user: str) -> JournalHeader:
        return cls(
            session, command, user, DnsOwner.this_process(session), Place.here(), time.time()
        )


@dataclass(frozen=True, slots=True)
class JournalEntry:
    n: int
    what: str
    undo: Undo


@dataclass(frozen=True, slots=True)
class JournalContents:
    path: Path
    header: JournalHeader | None
    entries: tuple[JournalEntry, ...] = ()
    done: frozenset[int] = frozenset()
    dropped: int = 0  # malformed lines (a torn last line after a crash is normal)

    def pending(self) -> list[JournalEntry]:
        """The entries not undone yet, newest first (the order to undo them in)."""
        return [e for e in reversed(self.entries) if e.n not in self.done]

    @property
    def session(self) -> str:
        return self.header.session if self.header else self.path.name.removesuffix(JOURNAL_SUFFIX)


def parse_journal(path: Path, lines: Iterable[str]) -> JournalContents:
    """Read a journal's lines: the header, the entries, which are done; drop the rest."""
    header: JournalHeader | None = None
    entries: dict[int, JournalEntry] = {}
    done: set[int] = set()
    dropped = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if not isinstance(data, dict):
            dropped += 1
        elif "journal" in data and header is None:
            header = JournalHeader.from_json(data)
            dropped += header is None
        elif isinstance(data.get("done"), int):
            done.add(data["done"])
        elif isinstance(data.get("n"), int) and isinstance(data.get("do"), str):
            undo = Undo.from_json(data.get("undo"))
            if undo is None:
                dropped += 1
            else:
                entries[data["n"]] = JournalEntry(data["n"], data["do"], undo)
        else:
            dropped += 1
    ordered = tuple(entries[n] for n in sorted(entries))
    return JournalContents(path, header, ordered, frozenset(done), dropped)


def read_journals(directory: Path) -> list[JournalContents]:
    """Every journal in *directory* (missing: none), oldest first."""
    found = []
    try:
        paths = sorted(directory.glob(f"*{JOURNAL_SUFFIX}"))
    except OSError:
        return []
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        found.append(parse_journal(path, text.splitlines()))
    return sorted(found, key=lambda j: j.header.created if j.header else 0.0)


# -- the writer ------------------------------------------------------------------------------


class ChangeJournal:
    """One session's journal file, appended and fsync'd one line at a time."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._next = 0
        self._open: set[int] = set()

    @classmethod
    def create(cls, directory: Path, header: JournalHeader) -> ChangeJournal:
        _private_dir(directory)
        path = directory / f"{header.session}{JOURNAL_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        journal = cls(path, fd)
        journal._append(header.to_json())
        _fsync_dir(directory)  # the file's name is durable too
        return journal

    def record(self, what: str, undo: Undo) -> int:
        """Write down a change (and its undo) that is about to be made; its number."""
        n = self._next
        self._append({"n": n, "do": what, "undo": undo.to_json()})
        self._next += 1
        self._open.add(n)
        return n

    def mark_done(self, n: int) -> None:
        self._append({"done": n})
        self._open.discard(n)

    @property
    def all_done(self) -> bool:
        return not self._open

    def close(self) -> None:
        """Close the file; remove it when every change was undone, else leave it for
        ``kvpn clean``."""
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1
        if self.all_done:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def _append(self, record: Mapping[str, Any]) -> None:
        data = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
        os.write(self._fd, data)
        os.fsync(self._fd)


def _private_dir(directory: Path) -> None:
    from kvpn.session_status import ensure_private_dir

    ensure_private_dir(directory)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- judging journals and planning the replay (pure) ---------------------------------------


class JournalVerdict(enum.Enum):
    LIVE = "live"  # its session still runs: never touched
    DEAD = "dead"  # replay it here
    FINISHED = "finished"  # dead, nothing left to undo: only the file to remove
    OTHER_NETNS = "other network namespace"  # run kvpn clean there
    OTHER_USER = "another user's"
    UNREADABLE = "unreadable"


@dataclass(frozen=True, slots=True)
class JudgedJournal:
    contents: JournalContents
    verdict: JournalVerdict
    place: PlaceMatch = PlaceMatch.SAME

    def describe(self) -> str:
        header = self.contents.header
        if header is None:
            return f"journal {self.contents.path} is unreadable"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(header.created))
        return (
            f"kvpn {header.command} session {header.session} of {header.user} "
            f"(pid {header.owner.pid}, started {when})"
        )


def judge_journal(
    contents: JournalContents,
    *,
    user: str,
    here: Place,
    alive: Callable[[int, int], bool] = process_alive,
) -> JudgedJournal:
    header = contents.header
    if header is None:
        return JudgedJournal(contents, JournalVerdict.UNREADABLE)
    place = compare_places(header.place, here)
    same_boot = not (header.place.boot and here.boot and header.place.boot != here.boot)
    if place == PlaceMatch.SAME and same_boot and alive(header.owner.pid, header.owner.started):
        return JudgedJournal(contents, JournalVerdict.LIVE, place)
    if place == PlaceMatch.OTHER:
        # Its owner's pid means nothing here (another pid namespace, maybe): leave it alone.
        return JudgedJournal(contents, JournalVerdict.OTHER_NETNS, place)
    if header.user != user:
        return JudgedJournal(contents, JournalVerdict.OTHER_USER, place)
    if not contents.pending():
        return JudgedJournal(contents, JournalVerdict.FINISHED, place)
    return JudgedJournal(contents, JournalVerdict.DEAD, place)


def judge_journals(
    journals: Iterable[JournalContents],
    *,
    user: str,
    here: Place,
    alive: Callable[[int, int], bool] = process_alive,
) -> list[JudgedJournal]:
    return [judge_journal(j, user=user, here=here, alive=alive) for j in journals]


#: Kinds whose change is local to the machine: meaningless once its namespace is gone.
LOCAL_KINDS = frozenset({"delete_tun", "restore_dns", "remove_file"})


def claim_of(undo: Undo) -> tuple[str, ...]:
    """What an undo touches, to refuse undoing something a live session now holds (a TUN
    name, the DNS journal); cluster objects are named after their session, so never shared."""
    if undo.kind == "delete_tun":
        return ("link", str(undo.args.get("name", "")))
    if undo.kind == "restore_dns":
        return ("dns", str(undo.args.get("dir", "")))
    return ()


@dataclass(frozen=True, slots=True)
class ReplayStep:
    journal: Path
    session: str
    entry: JournalEntry
    skip: str = ""  # why it is not run (it is then marked done: nothing to undo)


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    steps: tuple[ReplayStep, ...] = ()
    journals: tuple[JudgedJournal, ...] = ()  # the dead ones, newest first
    notes: tuple[str, ...] = ()

    def describe(self) -> list[str]:
        lines = []
        for step in self.steps:
            line = f"{step.entry.what} (session {step.session}): undo by {step.entry.undo.kind}"
            lines.append(line + (f"; skipped: {step.skip}" if step.skip else ""))
        return lines


def plan_replay(judged: Sequence[JudgedJournal]) -> ReplayPlan:
    """The dead journals' pending undos, newest journal first and newest entry first;
    never anything a live session's journal claims."""
    live_claims = {
        claim
        for j in judged
        if j.verdict == JournalVerdict.LIVE
        for e in j.contents.pending()
        if (claim := claim_of(e.undo))
    }
    steps: list[ReplayStep] = []
    notes: list[str] = []
    dead = [j for j in judged if j.verdict in (JournalVerdict.DEAD, JournalVerdict.FINISHED)]
    dead.sort(key=lambda j: j.contents.header.created if j.contents.header else 0.0, reverse=True)
    for j in dead:
        for entry in j.contents.pending():
            skip = ""
            if entry.undo.kind in LOCAL_KINDS and j.place == PlaceMatch.GONE:
                skip = "made in a network namespace that is gone since a reboot"
            elif claim_of(entry.undo) in live_claims:
                skip = "a running kvpn session now uses it"
            steps.append(ReplayStep(j.contents.path, j.contents.session, entry, skip))
    elsewhere = sum(j.verdict == JournalVerdict.OTHER_NETNS for j in judged)
    if elsewhere:
        notes.append(
            f"{elsewhere} session journal(s) from other network namespaces left alone "
            "(run kvpn clean in the namespace where the session ran)"
        )
    for j in judged:
        if j.verdict == JournalVerdict.OTHER_USER:
            notes.append(f"{j.describe()}: not yours; run kvpn clean as that user")
        elif j.verdict == JournalVerdict.UNREADABLE:
            notes.append(f"{j.describe()}; left as it is")
    return ReplayPlan(tuple(steps), tuple(dead), tuple(notes))
