"""TunDevice against a fake /dev/net/tun: os.open and ioctl mocked at the syscall boundary."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from kvpn.tun.device import (
    IFF_NO_PI,
    IFF_TUN,
    IFF_VNET_HDR,
    TUNSETOFFLOAD,
    TunDevice,
    TunOpenError,
)

TUNSETIFF = 0x400454CA


@dataclass
class FakeTun:
    """Plays the kernel: each open of /dev/net/tun is one end of a SEQPACKET pair."""

    refuse_vnet: bool = False
    refuse_offload: bool = False
    refuse_open: int | None = None
    setiff_flags: list[int] = field(default_factory=list)
    offload_calls: list[int] = field(default_factory=list)
    peers: list[socket.socket] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)

    def open(self, path: str, flags: int, *args: Any) -> int:
        if path != "/dev/net/tun":
            return real_open(path, flags, *args)
        if self.refuse_open is not None:
            raise OSError(self.refuse_open, os.strerror(self.refuse_open))
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.peers.append(peer)
        fd = ours.detach()
        self.fds.append(fd)
        return fd

    def ioctl(self, fd: int, request: int, arg: Any, *rest: Any) -> Any:
        if fd not in self.fds:
            return real_ioctl(fd, request, arg, *rest)
        if request == TUNSETIFF:
            flags = int(arg.ifr_ifru.ifr_flags) & 0xFFFF
            self.setiff_flags.append(flags)
            if self.refuse_vnet and flags & IFF_VNET_HDR:
                raise OSError(errno.EINVAL, "Invalid argument")
            if not arg.ifr_name:
                arg.ifr_name = b"tun7"
            return 0
        if request == TUNSETOFFLOAD:
            self.offload_calls.append(arg)
            if self.refuse_offload:
                raise OSError(errno.EINVAL, "Invalid argument")
            return 0
        raise AssertionError(f"unexpected ioctl {request:#x}")

    def is_open(self, index: int) -> bool:
        """Whether the descriptor of open number *index* is still open (its peer sees no EOF)."""
        peer = self.peers[index]
        peer.setblocking(False)
        try:
            return peer.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            return True
        finally:
            peer.setblocking(True)


real_open = os.open
real_ioctl = fcntl.ioctl


@pytest.fixture
def fake_tun(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTun]:
    fake = FakeTun()
    monkeypatch.setattr(os, "open", fake.open)
    monkeypatch.setattr(fcntl, "ioctl", fake.ioctl)
    yield fake
    for peer in fake.peers:
        peer.close()


def test_offload_mode_when_kernel_offers_it(fake_tun: FakeTun) -> None:
    with TunDevice.open("kvpn0") as tun:
        assert tun.vnet_header and tun.name == "kvpn0"
        assert fake_tun.setiff_flags == [IFF_TUN | IFF_NO_PI | IFF_VNET_HDR]
        assert fake_tun.offload_calls == [0x01 | 0x02 | 0x04]
        assert not os.get_blocking(tun.fileno())


def test_fallback_when_offload_ioctl_refused(fake_tun: FakeTun) -> None:
    fake_tun.refuse_offload = True
    with TunDevice.open("kvpn0") as tun:
        assert not tun.vnet_header and tun.offload_flags == 0
        assert fake_tun.setiff_flags == [IFF_TUN | IFF_NO_PI | IFF_VNET_HDR, IFF_TUN | IFF_NO_PI]
        assert not fake_tun.is_open(0)  # the offload attempt's descriptor was closed


def test_fallback_when_vnet_header_refused(fake_tun: FakeTun) -> None:
    fake_tun.refuse_vnet = True
    with TunDevice.open("kvpn0") as tun:
        assert not tun.vnet_header
        assert fake_tun.offload_calls == []


def test_offload_switch_off_skips_probe(fake_tun: FakeTun) -> None:
    with TunDevice.open("kvpn0", offload=False) as tun:
        assert not tun.vnet_header
    assert fake_tun.setiff_flags == [IFF_TUN | IFF_NO_PI] and fake_tun.offload_calls == []


def test_kernel_assigned_name(fake_tun: FakeTun) -> None:
    with TunDevice.open("", offload=False) as tun:
        assert tun.name == "tun7"


def test_permission_error_is_explained(fake_tun: FakeTun) -> None:
    fake_tun.refuse_open = errno.EPERM
    with pytest.raises(TunOpenError, match="CAP_NET_ADMIN"):
        TunDevice.open("kvpn0")


def test_read_write_one_packet_per_call(fake_tun: FakeTun) -> None:
    tun = TunDevice.open("kvpn0", offload=False)
    peer = fake_tun.peers[0]
    assert tun.read() is None  # non-blocking, nothing queued
    peer.send(b"\x45packet-one")
    peer.send(b"\x45packet-two")
    assert tun.read() == b"\x45packet-one"
    assert tun.read() == b"\x45packet-two"
    assert tun.write(memoryview(b"\x45out"))
    assert peer.recv(100) == b"\x45out"
    tun.close()
    assert tun.closed and not fake_tun.is_open(0)
    tun.close()  # idempotent


def test_write_when_queue_full_reports_drop(
    fake_tun: FakeTun, monkeypatch: pytest.MonkeyPatch
) -> None:
    tun = TunDevice.open("kvpn0", offload=False)

    def full(fd: int, data: object) -> int:
        raise BlockingIOError(errno.EAGAIN, "full")

    monkeypatch.setattr(os, "write", full)
    assert tun.write(b"x") is False
    tun.close()
