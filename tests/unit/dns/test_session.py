"""The DNS side of ``kvpn connect``: leftovers of crashed sessions, finding the cluster DNS,
namespaces with and without permission, and the refresh - with fakes at the API boundary."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kvpn.cli.errors import UserError
from kvpn.connect_session import ConnectOptions, choose_connect_dns_mode, recover_dns
from kvpn.dns.actions import UpstreamServer
from kvpn.dns.names import ClusterNames
from kvpn.dns.os_config import (
    DnsMode,
    DnsPaths,
    RestoreReport,
    apply_dns_plan,
    plan_dns,
    restore_from_state,
)
from kvpn.dns.resolver import DnsResolver, ResolverConfig
from kvpn.dns.session import (
    ClusterNamesRefresh,
    DnsOwner,
    DnsSetupError,
    LeftoverKind,
    claim_dns,
    find_cluster_dns,
    list_namespaces,
    machine_dns_dir,
    process_alive,
    recover_leftover_dns,
    restore_machine_dns,
)

ORIGINAL = b"# mine\nnameserver 192.0.2.53\noptions edns0"  # no final newline
SERVICE_CIDR = IPv4Network("10.96.0.0/12")


class FakeApiError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"({status}) {reason}")
        self.status = status
        self.reason = reason


def _items(*names: str, namespace: str = "default", cluster_ip: str = "") -> Any:
    return SimpleNamespace(
        items=[
            SimpleNamespace(
                metadata=SimpleNamespace(name=n, namespace=namespace),
                spec=SimpleNamespace(cluster_ip=cluster_ip or f"10.96.0.{i + 20}"),
            )
            for i, n in enumerate(names)
        ]
    )


class FakeCore:
    """The few CoreV1Api calls kvpn's DNS makes; each may be set to raise."""

    def __init__(self, **raises: Exception) -> None:
        self.raises = raises
        self.namespaces = ["default", "kube-system", "team-a"]
        self.services = ["echo", "db"]

    def _check(self, call: str) -> None:
        if call in self.raises:
            raise self.raises[call]

    def read_namespaced_service(self, name: str, namespace: str, **kw: Any) -> Any:
        self._check("read_namespaced_service")
        return SimpleNamespace(spec=SimpleNamespace(cluster_ip="10.96.0.10"))

    def list_namespace(self, **kw: Any) -> Any:
        self._check("list_namespace")
        return _items(*self.namespaces)

    def list_service_for_all_namespaces(self, **kw: Any) -> Any:
        self._check("list_service_for_all_namespaces")
        return _items(*self.services)

    def list_namespaced_service(self, namespace: str, **kw: Any) -> Any:
        return _items(*self.services, namespace=namespace)


@pytest.fixture
def paths(tmp_path: Path) -> DnsPaths:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "resolv.conf").write_bytes(ORIGINAL)
    (etc / "hosts").write_bytes(b"127.0.0.1 localhost\n")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n")
    return DnsPaths(resolv_conf=etc / "resolv.conf", hosts=etc / "hosts", mountinfo=mountinfo)


def _crash_after_apply(dns_dir: Path, paths: DnsPaths, owner: DnsOwner) -> None:
    """What a session killed with SIGKILL leaves: the owner, the journal, kvpn's file."""
    claim_dns(dns_dir, owner)
    plan = plan_dns(DnsMode.RESOLV_CONF, nameserver="198.19.255.1", namespace="default")
    apply_dns_plan(plan, state_dir=dns_dir, paths=paths)


def _dead_process() -> tuple[int, int]:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid, 0


# -- leftovers -----------------------------------------------------------------------------


def test_nothing_left_means_nothing_to_do(tmp_path: Path) -> None:
    assert recover_leftover_dns(tmp_path / "dns").kind == LeftoverKind.NONE


def test_a_dead_owners_change_is_restored_byte_for_byte(tmp_path: Path, paths: DnsPaths) -> None:
    dns_dir = tmp_path / "dns"
    pid, started = _dead_process()
    _crash_after_apply(dns_dir, paths, DnsOwner(pid, started, "abcd1234"))
    assert paths.resolv_conf.read_bytes() != ORIGINAL

    leftover = recover_leftover_dns(
        dns_dir, restore=partial(restore_from_state, mountinfo=paths.mountinfo)
    )
    assert leftover.kind == LeftoverKind.RESTORED
    assert paths.resolv_conf.read_bytes() == ORIGINAL
    assert not dns_dir.exists()  # journal and owner gone
    assert leftover.describe() == [
        f"restored the DNS settings left by kvpn session abcd1234 (pid {pid}), "
        "which is no longer running"
    ]


def test_a_live_owners_change_is_left_alone(tmp_path: Path, paths: DnsPaths) -> None:
    dns_dir = tmp_path / "dns"
    _crash_after_apply(dns_dir, paths, DnsOwner.this_process("live0001"))
    leftover = recover_leftover_dns(dns_dir)
    assert leftover.kind == LeftoverKind.LIVE_OWNER
    assert paths.resolv_conf.read_bytes() != ORIGINAL
    assert (dns_dir / "dns-os-state.json").exists()


def test_a_recycled_pid_does_not_count_as_the_owner(tmp_path: Path, paths: DnsPaths) -> None:
    dns_dir = tmp_path / "dns"
    me = DnsOwner.this_process("old00001")
    _crash_after_apply(dns_dir, paths, DnsOwner(me.pid, me.started + 1, me.session))
    leftover = recover_leftover_dns(
        dns_dir, restore=partial(restore_from_state, mountinfo=paths.mountinfo)
    )
    assert leftover.kind == LeftoverKind.RESTORED
    assert paths.resolv_conf.read_bytes() == ORIGINAL


def test_a_failed_restore_keeps_the_journal_and_says_where(tmp_path: Path) -> None:
    dns_dir = tmp_path / "dns"
    claim_dns(dns_dir, DnsOwner(*_dead_process(), "dead0001"))
    (dns_dir / "dns-os-state.json").write_text("{}")

    def failing(_: Path) -> RestoreReport:
        return RestoreReport("resolv.conf", False, ("cannot restore /etc/resolv.conf: EROFS",))

    leftover = recover_leftover_dns(dns_dir, restore=failing)
    assert leftover.kind == LeftoverKind.RESTORE_FAILED
    assert (dns_dir / "owner.json").exists()
    lines = leftover.describe()
    assert str(dns_dir / "dns-os-state.json") in lines[0]
    assert lines[1] == "note: cannot restore /etc/resolv.conf: EROFS"


def test_an_owner_that_died_before_applying_is_just_forgotten(tmp_path: Path) -> None:
    dns_dir = tmp_path / "dns"
    claim_dns(dns_dir, DnsOwner(*_dead_process(), "dead0002"))
    assert recover_leftover_dns(dns_dir).kind == LeftoverKind.NONE
    assert not dns_dir.exists()


def test_restore_on_exit_releases_ownership_only_when_done(tmp_path: Path) -> None:
    dns_dir = tmp_path / "dns"
    claim_dns(dns_dir, DnsOwner.this_process("s1"))
    report = restore_machine_dns(dns_dir, restore=lambda d: RestoreReport(None, False, ("x",)))
    assert not report.ok and (dns_dir / "owner.json").exists()
    assert restore_machine_dns(dns_dir).ok  # nothing journaled: fine, and released
    assert not dns_dir.exists()


def test_process_alive() -> None:
    me = DnsOwner.this_process("s")
    assert process_alive(me.pid, me.started)
    assert process_alive(me.pid, 0)
    assert not process_alive(me.pid, me.started + 1)
    assert not process_alive(*_dead_process())
    assert not process_alive(0, 0)


def test_one_journal_folder_per_network_namespace(tmp_path: Path) -> None:
    link = tmp_path / "net"
    link.write_text("")
    assert machine_dns_dir(tmp_path, netns_link=link) == (
        tmp_path / "dns" / f"netns-{os.stat(link).st_ino}"
    )
    assert machine_dns_dir(tmp_path, netns_link=tmp_path / "none") == tmp_path / "dns" / "local"


# -- what connect does with them ------------------------------------------------------------


def test_connect_refuses_to_share_dns_with_a_live_session(tmp_path: Path) -> None:
    options = ConnectOptions(state_dir=tmp_path)
    claim_dns(machine_dns_dir(tmp_path), DnsOwner.this_process("live0002"))
    with pytest.raises(UserError, match="live0002.*--dns-mode off"):
        recover_dns(options, lambda line: None)
    lines: list[str] = []
    recover_dns(ConnectOptions(state_dir=tmp_path, dns_mode="off"), lines.append)
    assert "is running and manages this machine's DNS" in lines[0]


def test_connect_dns_modes() -> None:
    assert choose_connect_dns_mode(ConnectOptions(dns_mode="off")) is None
    assert choose_connect_dns_mode(ConnectOptions(dns_mode="resolv.conf")) == DnsMode.RESOLV_CONF
    assert choose_connect_dns_mode(ConnectOptions(dns_mode="hosts")) == DnsMode.HOSTS
    if sys.platform != "darwin":
        with pytest.raises(UserError, match="macOS only"):
            choose_connect_dns_mode(ConnectOptions(dns_mode="macos"))


# -- the cluster DNS and the namespaces ----------------------------------------------------


async def test_the_kube_dns_service_is_used_when_readable() -> None:
    async def never(address: IPv4Address, domain: str) -> bool:
        raise AssertionError("no probe needed")

    found = await find_cluster_dns(FakeCore(), [SERVICE_CIDR], domain="cluster.local", probe=never)
    assert found.address == IPv4Address("10.96.0.10") and found.note == ""


async def test_namespace_only_rbac_falls_back_to_the_conventional_address() -> None:
    core = FakeCore(read_namespaced_service=FakeApiError(403, "Forbidden"))
    probed: list[tuple[IPv4Address, str]] = []

    async def answers(address: IPv4Address, domain: str) -> bool:
        probed.append((address, domain))
        return True

    found = await find_cluster_dns(core, [SERVICE_CIDR], domain="corp.local", probe=answers)
    assert probed == [(IPv4Address("10.96.0.10"), "corp.local")]
    assert found.address == IPv4Address("10.96.0.10")
    assert "kube-system/kube-dns is not readable (403 Forbidden)" in found.note

    async def silent(address: IPv4Address, domain: str) -> bool:
        return False

    with pytest.raises(DnsSetupError, match="403 Forbidden.*10.96.0.10 does not answer"):
        await find_cluster_dns(core, [SERVICE_CIDR], domain="cluster.local", probe=silent)


def test_namespaces_listed_or_the_fallback() -> None:
    listing = list_namespaces(FakeCore(), "team-a")
    assert listing.names == ("default", "kube-system", "team-a") and listing.complete
    forbidden = FakeCore(list_namespace=FakeApiError(403, "Forbidden"))
    listing = list_namespaces(forbidden, "team-b")
    assert listing.names == ("team-b", "default", "kube-system")
    assert not listing.complete and listing.reason == "403 Forbidden"
    with pytest.raises(FakeApiError):
        list_namespaces(FakeCore(list_namespace=FakeApiError(500, "Internal")), "x")


def _resolver() -> DnsResolver:
    return DnsResolver(
        ResolverConfig(upstreams=(UpstreamServer("192.0.2.53"),)),
        ClusterNames.build(namespace="default", namespaces=["default"]),
    )


async def test_refresh_adds_new_namespaces_to_the_resolver() -> None:
    core = FakeCore()
    resolver = _resolver()
    refresh = ClusterNamesRefresh(
        core, resolver, namespace="default", domain="cluster.local", reverse_networks=()
    )
    await refresh.refresh_once()
    assert resolver.names.namespaces == {b"default", b"kube-system", b"team-a"}
    core.namespaces.append("team-new")
    await refresh.refresh_once()
    assert b"team-new" in resolver.names.namespaces


async def test_refresh_in_hosts_mode_rewrites_the_block(tmp_path: Path, paths: DnsPaths) -> None:
    dns_dir = tmp_path / "dns"
    core = FakeCore()
    plan = plan_dns(DnsMode.HOSTS, nameserver="198.19.255.1", namespace="default")
    apply_dns_plan(plan, state_dir=dns_dir, paths=paths)
    refresh = ClusterNamesRefresh(
        core,
        _resolver(),
        namespace="default",
        domain="cluster.local",
        reverse_networks=(),
        hosts_state_dir=dns_dir,
    )
    await refresh.refresh_once()
    assert b"10.96.0.20\techo echo.default echo.default.svc" in paths.hosts.read_bytes()
    core.services.append("late")
    await refresh.refresh_once()
    assert b"\tlate late.default" in paths.hosts.read_bytes()
    restore_from_state(dns_dir, mountinfo=paths.mountinfo)
    assert paths.hosts.read_bytes() == b"127.0.0.1 localhost\n"
