"""Choosing the DNS mode, applying plans to files in a temporary folder, and restoring."""

from __future__ import annotations

import os
from collections.abc import Sequence
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from kvpn.dns.hosts_file import HostsEntry
from kvpn.dns.os_config import (
    DnsConfigError,
    DnsMode,
    DnsPaths,
    apply_dns_plan,
    choose_dns_mode,
    plan_dns,
    read_original_resolv_conf,
    restore_from_state,
    update_hosts_entries,
)
from kvpn.dns.resolved import CommandResult

ORIGINAL = b"# my resolver\nnameserver 198.18.0.53\nsearch corp.example\noptions ndots:1 rotate\n"
TUN = "198.19.255.1"


@pytest.fixture
def paths(tmp_path: Path) -> DnsPaths:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "resolv.conf").write_bytes(ORIGINAL)
    (etc / "hosts").write_bytes(b"127.0.0.1 localhost\n")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n")
    return DnsPaths(
        resolv_conf=etc / "resolv.conf",
        hosts=etc / "hosts",
        macos_resolver_dir=etc / "resolver",
        resolved_dir=tmp_path / "run" / "systemd" / "resolve",
        mountinfo=mountinfo,
    )


class FakeResolvectl:
    def __init__(self, fail_on: str = "") -> None:
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, argv: Sequence[str]) -> CommandResult:
        self.calls.append(list(argv))
        if self.fail_on and self.fail_on in argv:
            return CommandResult(1, "", "Failed to set DNS configuration: Link kvpn0 not known")
        return CommandResult(0)


def _plan(mode: DnsMode, **extra: object):  # type: ignore[no-untyped-def]
    return plan_dns(
        mode,
        nameserver=TUN,
        namespace="team",
        link="kvpn0",
        route_namespaces=["team", "other"],
        reverse_networks=[IPv4Network("10.96.0.0/12")],
        session="s1",
        **extra,  # type: ignore[arg-type]
    )


def test_resolv_conf_mode_round_trip(paths: DnsPaths, tmp_path: Path) -> None:
    state = tmp_path / "state"
    apply_dns_plan(_plan(DnsMode.RESOLV_CONF), state_dir=state, paths=paths)
    written = paths.resolv_conf.read_text()
    assert f"nameserver {TUN}\nnameserver 198.18.0.53\n" in written
    assert "search team.svc.cluster.local svc.cluster.local cluster.local corp.example\n" in written
    assert "rotate" not in written
    # connecting again before restoring is refused, not stacked
    with pytest.raises(DnsConfigError, match="kvpn clean"):
        apply_dns_plan(_plan(DnsMode.RESOLV_CONF), state_dir=state, paths=paths)
    # restore from the state folder alone, as `kvpn clean` does in a new process
    report = restore_from_state(state)
    assert report.ok and report.mode == "resolv.conf" and report.notes == ()
    assert paths.resolv_conf.read_bytes() == ORIGINAL
    assert list(state.iterdir()) == []
    assert restore_from_state(state).notes == ("no DNS change recorded",)


def test_resolv_conf_symlink_round_trip(paths: DnsPaths, tmp_path: Path) -> None:
    paths.resolved_dir.mkdir(parents=True)
    (paths.resolved_dir / "stub-resolv.conf").write_bytes(b"nameserver 127.0.0.53\n")
    paths.resolv_conf.unlink()
    link_text = os.path.relpath(paths.resolved_dir / "stub-resolv.conf", paths.resolv_conf.parent)
    os.symlink(link_text, paths.resolv_conf)
    apply_dns_plan(_plan(DnsMode.RESOLV_CONF), state_dir=tmp_path / "s", paths=paths)
    assert not paths.resolv_conf.is_symlink()
    assert restore_from_state(tmp_path / "s").ok
    assert os.readlink(paths.resolv_conf) == link_text


def test_file_written_by_another_program_meanwhile_is_left_and_original_kept(
    paths: DnsPaths, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    apply_dns_plan(_plan(DnsMode.RESOLV_CONF), state_dir=state, paths=paths)
    paths.resolv_conf.write_bytes(b"nameserver 10.9.9.9\n")  # DHCP renewal
    report = restore_from_state(state)
    assert report.ok and "changed by another program" in report.notes[0]
    assert paths.resolv_conf.read_bytes() == b"nameserver 10.9.9.9\n"
    assert (state / "resolv.conf.original").read_bytes() == ORIGINAL


def test_resolv_conf_left_by_kvpn_without_state_is_refused(paths: DnsPaths, tmp_path: Path) -> None:
    apply_dns_plan(_plan(DnsMode.RESOLV_CONF), state_dir=tmp_path / "a", paths=paths)
    with pytest.raises(DnsConfigError, match="written by kvpn"):
        apply_dns_plan(_plan(DnsMode.RESOLV_CONF), state_dir=tmp_path / "b", paths=paths)


def test_hosts_mode_round_trip_with_updates(paths: DnsPaths, tmp_path: Path) -> None:
    state = tmp_path / "state"
    entry = HostsEntry("10.96.0.20", ("echo", "echo.team"))
    apply_dns_plan(_plan(DnsMode.HOSTS, hosts_entries=[entry]), state_dir=state, paths=paths)
    assert b"10.96.0.20\techo echo.team" in paths.hosts.read_bytes()
    update_hosts_entries(state, [HostsEntry("10.96.0.21", ("web",))], mountinfo=paths.mountinfo)
    content = paths.hosts.read_bytes()
    assert b"10.96.0.21\tweb" in content and b"10.96.0.20" not in content
    assert restore_from_state(state).notes == ()
    assert paths.hosts.read_bytes() == b"127.0.0.1 localhost\n"


def test_hosts_edited_by_user_meanwhile_keeps_their_edit(paths: DnsPaths, tmp_path: Path) -> None:
    state = tmp_path / "state"
    apply_dns_plan(_plan(DnsMode.HOSTS, hosts_entries=[]), state_dir=state, paths=paths)
    with paths.hosts.open("ab") as f:
        f.write(b"10.0.0.7 mine\n")
    report = restore_from_state(state)
    assert report.ok and "kept the rest" in report.notes[0]
    assert paths.hosts.read_bytes() == b"127.0.0.1 localhost\n10.0.0.7 mine\n"


def test_resolved_mode_runs_resolvectl_and_reverts(paths: DnsPaths, tmp_path: Path) -> None:
    runner = FakeResolvectl()
    plan = _plan(DnsMode.RESOLVED)
    apply_dns_plan(plan, state_dir=tmp_path / "s", paths=paths, runner=runner)
    zones = [f"~{n}.10.in-addr.arpa" for n in range(96, 112)]
    assert runner.calls == [
        ["resolvectl", "dns", "kvpn0", TUN],
        [
            "resolvectl", "domain", "kvpn0",
            "team.svc.cluster.local", "svc.cluster.local", "cluster.local",
            "~cluster.local", "~team", "~other", *zones,
        ],
        ["resolvectl", "default-route", "kvpn0", "false"],
    ]  # fmt: skip
    assert paths.resolv_conf.read_bytes() == ORIGINAL  # no file edits
    assert any(line.startswith("run: resolvectl dns") for line in plan.describe())
    report = restore_from_state(tmp_path / "s", runner=runner)
    assert report.ok and runner.calls[-1] == ["resolvectl", "revert", "kvpn0"]


def test_resolved_failure_reverts_and_raises(paths: DnsPaths, tmp_path: Path) -> None:
    runner = FakeResolvectl(fail_on="domain")
    with pytest.raises(DnsConfigError, match="not known"):
        apply_dns_plan(
            _plan(DnsMode.RESOLVED), state_dir=tmp_path / "s", paths=paths, runner=runner
        )
    assert runner.calls[-1] == ["resolvectl", "revert", "kvpn0"]
    assert not (tmp_path / "s" / "dns-os-state.json").exists()


def test_resolved_revert_of_a_vanished_link_is_a_note(paths: DnsPaths, tmp_path: Path) -> None:
    apply_dns_plan(
        _plan(DnsMode.RESOLVED), state_dir=tmp_path / "s", paths=paths, runner=FakeResolvectl()
    )
    report = restore_from_state(tmp_path / "s", runner=FakeResolvectl(fail_on="revert"))
    assert report.ok and "gone with the TUN" in report.notes[0]


def test_macos_resolver_files_round_trip(paths: DnsPaths, tmp_path: Path) -> None:
    state = tmp_path / "state"
    apply_dns_plan(_plan(DnsMode.MACOS), state_dir=state, paths=paths)
    folder = paths.macos_resolver_dir
    names = sorted(p.name for p in folder.iterdir())
    assert names[:3] == ["100.10.in-addr.arpa", "101.10.in-addr.arpa", "102.10.in-addr.arpa"]
    assert {"cluster.local", "team", "other"} <= set(names)
    assert f"nameserver {TUN}\nport 53\n" in (folder / "cluster.local").read_text()
    assert restore_from_state(state).ok
    assert not folder.exists()


def test_macos_keeps_users_own_resolver_files(paths: DnsPaths, tmp_path: Path) -> None:
    folder = paths.macos_resolver_dir
    folder.mkdir()
    (folder / "cluster.local").write_bytes(b"nameserver 10.1.1.1\n")
    (folder / "corp.example").write_bytes(b"nameserver 10.2.2.2\n")
    apply_dns_plan(_plan(DnsMode.MACOS), state_dir=tmp_path / "s", paths=paths)
    assert restore_from_state(tmp_path / "s").ok
    assert sorted(p.name for p in folder.iterdir()) == ["cluster.local", "corp.example"]
    assert (folder / "cluster.local").read_bytes() == b"nameserver 10.1.1.1\n"


CHOICES = [
    # requested, platform, resolvectl found, resolv.conf kind, expected
    ("auto", "linux", True, "stub-symlink", DnsMode.RESOLVED),
    ("auto", "linux", True, "stub-nameserver", DnsMode.RESOLVED),
    ("auto", "linux", False, "stub-symlink", DnsMode.RESOLV_CONF),
    ("auto", "linux", True, "plain", DnsMode.RESOLV_CONF),
    ("auto", "darwin", False, "plain", DnsMode.MACOS),
    ("hosts", "linux", True, "stub-symlink", DnsMode.HOSTS),
    ("resolv.conf", "linux", True, "stub-symlink", DnsMode.RESOLV_CONF),
]


@pytest.mark.parametrize(("requested", "platform", "has_resolvectl", "kind", "expected"), CHOICES)
def test_choose_mode(
    paths: DnsPaths,
    requested: str,
    platform: str,
    has_resolvectl: bool,
    kind: str,
    expected: DnsMode,
) -> None:
    if kind == "stub-symlink":
        paths.resolved_dir.mkdir(parents=True)
        (paths.resolved_dir / "stub-resolv.conf").write_bytes(b"nameserver 127.0.0.53\n")
        paths.resolv_conf.unlink()
        os.symlink(paths.resolved_dir / "stub-resolv.conf", paths.resolv_conf)
    elif kind == "stub-nameserver":
        paths.resolv_conf.write_bytes(b"nameserver 127.0.0.53\n")
    which = (lambda name: "/usr/bin/" + name) if has_resolvectl else (lambda name: None)
    assert choose_dns_mode(requested, paths=paths, platform=platform, which=which) == expected


def test_unknown_mode_is_an_error(paths: DnsPaths) -> None:
    with pytest.raises(DnsConfigError, match="choose one of auto, resolved"):
        choose_dns_mode("dnsmasq", paths=paths)


def test_original_upstreams_under_resolved_skip_the_stub(paths: DnsPaths) -> None:
    paths.resolved_dir.mkdir(parents=True)
    (paths.resolved_dir / "resolv.conf").write_bytes(b"nameserver 192.168.1.1\n")
    paths.resolv_conf.write_bytes(b"nameserver 127.0.0.53\n")
    assert read_original_resolv_conf(DnsMode.RESOLVED, paths=paths).nameservers == ("192.168.1.1",)
    assert read_original_resolv_conf(DnsMode.RESOLV_CONF, paths=paths).nameservers == (
        "127.0.0.53",
    )


def test_unreadable_state_is_reported_not_raised(tmp_path: Path) -> None:
    (tmp_path / "dns-os-state.json").write_text("{not json")
    report = restore_from_state(tmp_path)
    assert not report.ok and "unreadable" in report.notes[0]
