"""The TUN device: opened with pytun-pmd3, with virtio-net offload when the kernel has it.

Offload mode opens the device with ``IFF_TUN | IFF_NO_PI | IFF_VNET_HDR`` and enables
``TUNSETOFFLOAD`` with ``TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6``: every packet then
carries a 10-byte virtio-net header (kvpn/net/vnet.py) and TCP arrives as GSO
super-packets of up to 64 KiB with partial checksums.  If either step fails the device
is reopened in plain mode (``IFF_TUN | IFF_NO_PI``); ``offload=False`` skips the probe.

The descriptor is non-blocking, for ``loop.add_reader``; the hot path uses
``os.read``/``os.write`` on it directly (pytun-pmd3's ``write`` copies every packet).
Addresses, MTU and routes are set through netlink (netlink.py), because pytun-pmd3's
Linux address setters are IPv6-only.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from dataclasses import dataclass

from pytun_pmd3 import TunTapDevice

__all__ = [
    "IFF_NO_PI",
    "IFF_TUN",
    "IFF_VNET_HDR",
    "TUNSETOFFLOAD",
    "TUN_F_CSUM",
    "TUN_F_TSO4",
    "TUN_F_TSO6",
    "TunDevice",
    "TunInfo",
    "TunOpenError",
]

log = logging.getLogger(__name__)

IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
OFFLOAD_FLAGS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6

#: Largest read: a 64 KiB GSO super-packet plus its virtio-net header.
READ_SIZE = 65536 + 10


class TunOpenError(OSError):
    """The TUN device could not be opened (no /dev/net/tun, no CAP_NET_ADMIN, ...)."""


@dataclass(frozen=True, slots=True)
class TunInfo:
    name: str
    vnet_header: bool
    offload_flags: int


class TunDevice:
    """An open TUN device.  ``vnet_header`` says whether packets carry a virtio-net header."""

    def __init__(self, device: TunTapDevice, *, vnet_header: bool, offload_flags: int) -> None:
        self._device = device
        self._fd: int = device.fileno()
        self.name: str = device.name
        self.vnet_header = vnet_header
        self.offload_flags = offload_flags
        os.set_blocking(self._fd, False)

    @classmethod
    def open(cls, name: str = "kvpn0", *, offload: bool = True) -> TunDevice:
        """Open *name*; try offload first unless *offload* is False, else plain mode."""
        if offload:
            device = _open(name, IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
            if device is not None:
                try:
                    fcntl.ioctl(device.fileno(), TUNSETOFFLOAD, OFFLOAD_FLAGS)
                except OSError as exc:
                    log.info("TUN offload unavailable (%s); using plain mode", exc)
                    device.close()
                else:
                    return cls(device, vnet_header=True, offload_flags=OFFLOAD_FLAGS)
        device = _open(name, IFF_TUN | IFF_NO_PI, final=True)
        if device is None:  # pragma: no cover - _open(final=True) raises instead
            raise TunOpenError(errno.ENODEV, "cannot open TUN device")
        return cls(device, vnet_header=False, offload_flags=0)

    @property
    def info(self) -> TunInfo:
        return TunInfo(self.name, self.vnet_header, self.offload_flags)

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def read(self) -> bytes | None:
        """One packet, or None when none is waiting (the descriptor is non-blocking)."""
        try:
            return os.read(self._fd, READ_SIZE)
        except BlockingIOError:
            return None

    def write(self, packet: bytes | bytearray | memoryview) -> bool:
        """Write one packet; False if the device queue is full (the packet is dropped)."""
        try:
            os.write(self._fd, packet)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        if self._fd >= 0:
            self._device.close()
            self._fd = -1

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _open(name: str, flags: int, *, final: bool = False) -> TunTapDevice | None:
    try:
        return TunTapDevice(name=name, flags=flags)
    except OSError as exc:
        if final:
            hint = (
                " (needs root or CAP_NET_ADMIN)" if exc.errno in (errno.EPERM, errno.EACCES) else ""
            )
            raise TunOpenError(
                exc.errno or errno.EIO, f"cannot open TUN {name!r}: {exc}{hint}"
            ) from exc
        log.info("TUN open with flags %#x failed: %s", flags, exc)
        return None
