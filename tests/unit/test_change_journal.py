"""The change journal: record before change, replay from another process, never a live one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvpn.change_journal import (
    ChangeJournal,
    JournalHeader,
    JournalVerdict,
    Place,
    Undo,
    judge_journal,
    judge_journals,
    parse_journal,
    plan_replay,
    read_journals,
)
from kvpn.dns.session import DnsOwner
from kvpn.journal_replay import (
    offer_leftover_cleanup,
    replay,
    undo_delete_pod,
    undo_delete_tun,
    undo_remove_file,
    undo_restore_dns,
)
from kvpn.undo_stack import UndoStack
from tests.unit.tun.netns import ip, netns, requires_root, run_in

HERE = Place("boot-1", 4026531833, 3)
ELSEWHERE = Place("boot-1", 4026532999, 77)
AFTER_REBOOT = Place("boot-2", 4026531833, 3)


def header(session: str, *, user: str = "alice", pid: int = 4242, created: float = 1.0,
           place: Place = HERE, command: str = "connect") -> JournalHeader:  # fmt: skip
    return JournalHeader(session, command, user, DnsOwner(pid, 99, session), place, created)


def write(directory: Path, head: JournalHeader, *undos: tuple[str, Undo]) -> ChangeJournal:
    journal = ChangeJournal.create(directory, head)
    for what, undo in undos:
        journal.record(what, undo)
    return journal


def dead(pid: int, started: int) -> bool:
    return False


def alive(pid: int, started: int) -> bool:
    return True


# -- the file ----------------------------------------------------------------------------


def test_journal_is_private_append_only_and_removed_when_all_undone(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    journal = write(
        directory,
        header("s1"),
        ("create pod", undo_delete_pod({"kubeconfig": "/k", "context": "c"}, "ns", "p", "s1")),
        ("create file", undo_remove_file(tmp_path / "f")),
    )
    assert directory.stat().st_mode & 0o777 == 0o700
    assert journal.path.stat().st_mode & 0o777 == 0o600
    (contents,) = read_journals(directory)
    assert contents.header == header("s1")
    assert [e.what for e in contents.pending()] == ["create file", "create pod"]  # newest first
    journal.mark_done(1)
    assert [e.n for e in read_journals(directory)[0].pending()] == [0]
    journal.close()
    assert journal.path.exists()  # entry 0 not undone: kept for kvpn clean
    journal2 = write(directory, header("s2"), ("x", undo_remove_file(tmp_path / "g")))
    journal2.mark_done(0)
    journal2.close()
    assert not journal2.path.exists()


def test_a_torn_or_malformed_line_is_dropped_and_counted(tmp_path: Path) -> None:
    lines = [
        json.dumps(header("s1").to_json()),
        json.dumps({"n": 0, "do": "a", "undo": {"kind": "remove_file", "args": {"path": "/x"}}}),
        "[1, 2]",
        json.dumps({"n": 1, "do": "b", "undo": {"kind": 3}}),
        json.dumps({"n": 2, "do": "c", "undo": {"kind": "remove_file", "args": {}}}),
        '{"n": 3, "do": "torn by a cra',
    ]
    contents = parse_journal(tmp_path / "s1.journal", lines)
    assert [e.n for e in contents.entries] == [0, 2]
    assert contents.dropped == 3


def test_a_journal_without_header_is_unreadable(tmp_path: Path) -> None:
    contents = parse_journal(
        tmp_path / "zz.journal", ['{"n": 0, "do": "a", "undo": {"kind": "k"}}']
    )
    judged = judge_journal(contents, user="alice", here=HERE, alive=dead)
    assert judged.verdict == JournalVerdict.UNREADABLE
    assert contents.session == "zz"


# -- judging -------------------------------------------------------------------------------

JUDGE_CASES = [
    # why, journal header, the owner alive?, here, verdict
    ("a running session is never touched", header("s"), alive, HERE, JournalVerdict.LIVE),
    ("a dead session is replayed", header("s"), dead, HERE, JournalVerdict.DEAD),
    ("another user's dead session", header("s", user="bob"), dead, HERE, JournalVerdict.OTHER_USER),
    ("another network namespace", header("s"), dead, ELSEWHERE, JournalVerdict.OTHER_NETNS),
    (
        "a recycled netns inode is another namespace (cookie differs)",
        header("s"),
        dead,
        Place("boot-1", HERE.netns, 5),
        JournalVerdict.OTHER_NETNS,
    ),
    (
        "after a reboot no owner is alive, even with a matching pid and start time",
        header("s"),
        alive,
        AFTER_REBOOT,
        JournalVerdict.DEAD,
    ),
    (
        "after a reboot a namespace that is gone is still replayed (cluster steps)",
        header("s", place=ELSEWHERE),
        alive,
        AFTER_REBOOT,
        JournalVerdict.DEAD,
    ),
]


@pytest.mark.parametrize(
    ("why", "head", "owner", "here", "verdict"), JUDGE_CASES, ids=[c[0] for c in JUDGE_CASES]
)
def test_judge(why: str, head: JournalHeader, owner, here: Place, verdict) -> None:  # type: ignore[no-untyped-def]
    contents = parse_journal(
        Path("s.journal"),
        [json.dumps(head.to_json()), json.dumps({"n": 0, "do": "a", "undo": {"kind": "k"}})],
    )
    assert judge_journal(contents, user="alice", here=here, alive=owner).verdict == verdict


def test_a_dead_journal_with_nothing_pending_is_finished(tmp_path: Path) -> None:
    journal = write(tmp_path, header("s"), ("a", undo_remove_file(tmp_path / "f")))
    journal.mark_done(0)
    (judged,) = judge_journals(read_journals(tmp_path), user="alice", here=HERE, alive=dead)
    assert judged.verdict == JournalVerdict.FINISHED


# -- the replay plan -----------------------------------------------------------------------


def test_plan_is_newest_journal_first_newest_entry_first_and_respects_live_claims(
    tmp_path: Path,
) -> None:
    write(
        tmp_path,
        header("old", pid=1, created=1.0),
        ("create tun", undo_delete_tun("kvpn0", [])),
        ("create file", undo_remove_file(tmp_path / "old")),
    )
    write(
        tmp_path,
        header("new", pid=2, created=2.0),
        ("create file", undo_remove_file(tmp_path / "new")),
    )
    write(
        tmp_path, header("live", pid=3, created=3.0), ("create tun", undo_delete_tun("kvpn0", []))
    )
    judged = judge_journals(
        read_journals(tmp_path), user="alice", here=HERE, alive=lambda pid, _: pid == 3
    )
    plan = plan_replay(judged)
    assert [(s.session, s.entry.what, s.skip) for s in plan.steps] == [
        ("new", "create file", ""),
        ("old", "create file", ""),
        ("old", "create tun", "a running kvpn session now uses it"),
    ]


def test_local_steps_of_a_namespace_gone_with_a_reboot_are_skipped(tmp_path: Path) -> None:
    cluster = {"kubeconfig": "/k", "context": "c"}
    write(
        tmp_path,
        header("s", place=ELSEWHERE),
        ("create pod", undo_delete_pod(cluster, "ns", "p", "s")),
        ("create tun", undo_delete_tun("kvpn0", [])),
        ("change dns", undo_restore_dns(tmp_path / "dns")),
    )
    judged = judge_journals(read_journals(tmp_path), user="alice", here=AFTER_REBOOT, alive=dead)
    skips = {s.entry.undo.kind: s.skip for s in plan_replay(judged).steps}
    assert skips["delete_pod"] == ""
    assert "gone since a reboot" in skips["delete_tun"] and "gone" in skips["restore_dns"]


def test_other_namespaces_and_users_are_notes(tmp_path: Path) -> None:
    write(tmp_path, header("a", place=ELSEWHERE), ("x", undo_remove_file(tmp_path / "a")))
    write(tmp_path, header("b", user="bob"), ("x", undo_remove_file(tmp_path / "b")))
    plan = plan_replay(judge_journals(read_journals(tmp_path), user="alice", here=HERE, alive=dead))
    assert plan.steps == ()
    assert any("1 session journal(s) from other network namespaces" in n for n in plan.notes)
    assert any("not yours" in n for n in plan.notes)


# -- the undo stack writes the journal ----------------------------------------------------


async def test_undo_stack_journals_before_the_change_and_marks_done(tmp_path: Path) -> None:
    journal = ChangeJournal.create(tmp_path, JournalHeader.for_this_process("s", "connect", "a"))
    undo = UndoStack(journal=journal)
    made = tmp_path / "made"
    undone: list[str] = []

    async def remove() -> None:
        undone.append("file")
        made.unlink()

    undo.push("make a file", remove, undo_remove_file(made))
    # Before the change is made, the journal already says how to undo it.
    (contents,) = read_journals(tmp_path)
    assert [e.undo for e in contents.pending()] == [undo_remove_file(made)]
    made.write_text("x")

    async def local() -> None:
        undone.append("local")

    undo.push("a process-local thing", local)  # not journaled
    assert len(read_journals(tmp_path)[0].entries) == 1
    assert await undo.run() == []
    assert undone == ["local", "file"]
    assert not journal.path.exists()


async def test_a_failed_undo_stays_in_the_journal(tmp_path: Path) -> None:
    journal = ChangeJournal.create(tmp_path, JournalHeader.for_this_process("s", "connect", "a"))
    undo = UndoStack(journal=journal)

    async def fails() -> None:
        raise OSError("busy")

    async def works() -> None:
        return None

    undo.push("first", works, undo_remove_file(tmp_path / "a"))
    undo.push("second", fails, undo_remove_file(tmp_path / "b"))
    undo.push("never made", works, undo_remove_file(tmp_path / "c"))
    undo.discard()  # its change failed before it was made
    assert await undo.run() == ["second: busy"]
    (contents,) = read_journals(tmp_path)
    assert [e.what for e in contents.pending()] == ["second"]


# -- replay ----------------------------------------------------------------------------------


def _dead_process_journal(directory: Path, leftover: Path) -> None:
    """Another process journals a change, makes it, and is killed (kill -9)."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from kvpn.change_journal import ChangeJournal, JournalHeader
        from kvpn.cluster.locks import Identity
        from kvpn.journal_replay import undo_remove_file
        header = JournalHeader.for_this_process("k9", "connect", Identity.of_this_process().user)
        journal = ChangeJournal.create(Path({str(directory)!r}), header)
        journal.record("make {leftover.name}", undo_remove_file(Path({str(leftover)!r})))
        Path({str(leftover)!r}).write_text("left")
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


async def test_another_process_replays_a_killed_sessions_journal(tmp_path: Path) -> None:
    directory, leftover = tmp_path / "journal", tmp_path / "leftover"
    _dead_process_journal(directory, leftover)
    lines: list[str] = []
    here = Place.here()
    from kvpn.cluster.locks import Identity

    judged = judge_journals(
        read_journals(directory), user=Identity.of_this_process().user, here=here
    )
    assert [j.verdict for j in judged] == [JournalVerdict.DEAD]
    report = await replay(judged, lines.append, dry_run=True)
    assert leftover.exists() and lines == [
        "would undo: make leftover (session k9): undo by remove_file"
    ]
    report = await replay(judged, lines.append, dry_run=False)
    assert report.problems == [] and report.undone == 1
    assert not leftover.exists()
    assert list(directory.iterdir()) == []  # the journal is gone once replayed
    # Replaying again is harmless: nothing left.
    assert (await replay(judge_journals(read_journals(directory), user="x", here=here), print,
                         dry_run=False)).undone == 0  # fmt: skip


async def test_replay_is_idempotent_and_keeps_what_failed(tmp_path: Path) -> None:
    write(
        tmp_path,
        header("s"),
        ("already gone", undo_remove_file(tmp_path / "never-made")),
        ("from the future", Undo("teleport", {})),
        ("dns of nobody", undo_restore_dns(tmp_path / "no-dns")),
    )
    lines: list[str] = []
    judged = judge_journals(read_journals(tmp_path), user="alice", here=HERE, alive=dead)
    report = await replay(judged, lines.append, dry_run=False)
    assert report.undone == 0
    assert report.problems == [
        "from the future (session s): unknown undo kind 'teleport' (a newer kvpn's?)"
    ]
    assert "already gone: dns of nobody (session s)" in lines
    (left,) = read_journals(tmp_path)
    assert [e.what for e in left.pending()] == ["from the future"]


async def test_connect_tells_about_leftovers_without_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, leftover = tmp_path / "journal", tmp_path / "leftover"
    _dead_process_journal(directory, leftover)
    lines: list[str] = []
    await offer_leftover_cleanup(directory, lines.append, clean=None, interactive=False)
    assert leftover.exists()
    assert "session k9" in lines[0] and "left 1 change(s): make leftover" in lines[0]
    assert "run `kvpn clean`" in lines[-1]
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    await offer_leftover_cleanup(directory, lines.append, clean=None, interactive=True)
    assert not leftover.exists()
    lines.clear()
    await offer_leftover_cleanup(directory, lines.append, clean=True)
    assert lines == []  # nothing left to say


@requires_root
async def test_a_leftover_tun_and_its_routes_are_deleted_and_a_non_tun_is_kept(
    tmp_path: Path,
) -> None:
    with netns("journal") as name:
        ip("tuntap", "add", "dev", "kvpn0", "mode", "tun", netns=name)  # persistent: survives
        ip("link", "set", "kvpn0", "up", netns=name)
        ip("route", "add", "10.96.0.0/12", "dev", "kvpn0", netns=name)
        ip("link", "add", "kvpn1", "type", "veth", "peer", "name", "kvpn1p", netns=name)

        def scenario() -> list[str]:
            import asyncio

            here = Place.here()
            write(
                tmp_path,
                header("t", place=here),
                ("create kvpn1", undo_delete_tun("kvpn1", [])),
                ("create kvpn0", undo_delete_tun("kvpn0", ["10.96.0.0/12"])),
            )
            judged = judge_journals(read_journals(tmp_path), user="alice", here=here, alive=dead)
            lines: list[str] = []
            asyncio.run(replay(judged, lines.append, dry_run=False))
            return lines

        lines = run_in(name, scenario)
        links = ip("-o", "link", "show", netns=name)
        assert "kvpn0" not in links and "kvpn1" in links
        assert "10.96.0.0" not in ip("route", "show", netns=name)
        assert "undone: create kvpn0 (session t)" in lines
        assert any("kvpn1 is not a TUN device now (veth)" in line for line in lines)


async def test_a_cluster_whose_kubeconfig_is_gone_is_skipped_not_retried_forever(
    tmp_path: Path,
) -> None:
    gone = {"kubeconfig": str(tmp_path / "deleted-kubeconfig"), "context": "c"}
    write(tmp_path, header("s"), ("create pod", undo_delete_pod(gone, "ns", "p", "s")))
    lines: list[str] = []
    judged = judge_journals(read_journals(tmp_path), user="alice", here=HERE, alive=dead)
    report = await replay(judged, lines.append, dry_run=False)
    assert report.problems == []
    assert lines == [
        f"create pod (session s): skipped: its kubeconfig {gone['kubeconfig']} no longer exists"
    ]
    assert read_journals(tmp_path) == []


async def test_dns_left_by_a_session_before_a_reboot_is_restored_from_the_journal_copy(
    tmp_path: Path,
) -> None:
    from dataclasses import replace

    from kvpn.dns.os_config import DnsMode, DnsPaths, apply_dns_plan, plan_dns

    resolv = tmp_path / "resolv.conf"
    resolv.write_bytes(b"nameserver 192.0.2.53\n")
    dns_dir = tmp_path / "run" / "dns"  # under /run: a reboot empties it
    dns_dir.mkdir(parents=True)
    plan = plan_dns(DnsMode.RESOLV_CONF, nameserver="198.19.255.1", namespace="default")
    apply_dns_plan(plan, state_dir=dns_dir, paths=DnsPaths(resolv_conf=resolv))
    assert resolv.read_bytes() != b"nameserver 192.0.2.53\n"
    undo = undo_restore_dns(dns_dir, keep_state=True)
    undo = replace(undo, args={**undo.args, "boot": "before-the-reboot"})
    here = Place.here()
    journals = tmp_path / "journal"
    write(journals, header("r", place=replace(here, boot="before-the-reboot")), ("dns", undo))
    for leftover in dns_dir.iterdir():
        leftover.unlink()
    dns_dir.rmdir()  # the reboot
    judged = judge_journals(read_journals(journals), user="alice", here=here, alive=alive)
    assert [j.verdict for j in judged] == [JournalVerdict.DEAD]  # no owner survives a reboot
    lines: list[str] = []
    report = await replay(judged, lines.append, dry_run=False)
    assert report.problems == [] and lines == ["undone: dns (session r)"]
    assert resolv.read_bytes() == b"nameserver 192.0.2.53\n"
    assert not dns_dir.exists()


async def test_recover_retires_only_the_recovered_sessions_journal(tmp_path: Path) -> None:
    from kvpn.journal_replay import retire_sessions

    directory = tmp_path / "journal"
    _dead_process_journal(directory, tmp_path / "leftover")
    assert (await retire_sessions(directory, {"someone-else"}, print)).steps == 0
    assert len(read_journals(directory)) == 1
    lines: list[str] = []
    await retire_sessions(directory, {"k9"}, lines.append)
    assert read_journals(directory) == [] and lines == ["undone: make leftover (session k9)"]
