"""Which asyncio event loop kvpn's processes run on: uvloop when it is installed, else
asyncio's own; ``KVPN_EVENT_LOOP=asyncio|uvloop`` forces one (``auto``, or unset, is the
default).  Entry points call :func:`run` where they would call ``asyncio.run``.

uvloop (libuv) costs less CPU per packet than asyncio's selector loop, and kvpn's data path
is CPU-bound (``bench/RESULTS.md``).  Everything kvpn asks of a loop works on both, with one
exception handled here: pyroute2 gives its netlink socket to ``create_datagram_endpoint``,
which uvloop refuses for ``AF_NETLINK``; kvpn's uvloop subclass serves such sockets with
:func:`kvpn.tun.netlink.netlink_datagram_endpoint` (``loop.add_reader``) instead.

No global policy is installed: the loop comes from the ``asyncio.Runner`` factory, so code
that makes its own loop (pyroute2's synchronous ``IPRoute``) is unaffected.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import importlib.util
import os
import socket
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from kvpn.cli.errors import UserError

__all__ = [
    "ENV_VAR",
    "EventLoopChoiceError",
    "LoopKind",
    "choose_loop_kind",
    "new_event_loop",
    "run",
    "uvloop_available",
]

ENV_VAR = "KVPN_EVENT_LOOP"

_T = TypeVar("_T")


class LoopKind(enum.Enum):
    ASYNCIO = "asyncio"
    UVLOOP = "uvloop"


class EventLoopChoiceError(UserError, ValueError):
    """``KVPN_EVENT_LOOP`` names no loop, or names uvloop where it is not installed (one line
    from the CLI, like any :class:`~kvpn.cli.errors.UserError`)."""


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def choose_loop_kind(env: Mapping[str, str], *, have_uvloop: bool) -> LoopKind:
    """The loop to run: the one ``KVPN_EVENT_LOOP`` in *env* forces, else uvloop if present."""
    wanted = env.get(ENV_VAR, "").strip().lower()
    if wanted in ("", "auto"):
        return LoopKind.UVLOOP if have_uvloop else LoopKind.ASYNCIO
    try:
        kind = LoopKind(wanted)
    except ValueError:
        raise EventLoopChoiceError(
            f"{ENV_VAR}={wanted!r}: expected one of auto, asyncio, uvloop"
        ) from None
    if kind is LoopKind.UVLOOP and not have_uvloop:
        raise EventLoopChoiceError(f"{ENV_VAR}=uvloop but uvloop is not installed")
    return kind


def new_event_loop(kind: LoopKind) -> asyncio.AbstractEventLoop:
    if kind is LoopKind.UVLOOP:
        return _uvloop_class()()
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, _T], *, env: Mapping[str, str] | None = None) -> _T:
    """``asyncio.run(main)`` on the loop :func:`choose_loop_kind` picks from *env*
    (default ``os.environ``)."""
    try:
        kind = choose_loop_kind(os.environ if env is None else env, have_uvloop=uvloop_available())
    except EventLoopChoiceError:
        main.close()  # never awaited: no "coroutine was never awaited" warning
        raise
    with asyncio.Runner(loop_factory=functools.partial(new_event_loop, kind)) as runner:
        return runner.run(main)


@functools.cache
def _uvloop_class() -> Callable[[], asyncio.AbstractEventLoop]:
    import uvloop

    class KvpnUvloop(uvloop.Loop):
        """uvloop, with netlink sockets served on ``add_reader`` (see the module docstring)."""

        async def create_datagram_endpoint(  # type: ignore[override]
            self,
            protocol_factory: Callable[[], asyncio.DatagramProtocol],
            local_addr: Any = None,
            remote_addr: Any = None,
            *,
            sock: socket.socket | None = None,
            **kwargs: Any,
        ) -> tuple[Any, Any]:
            if sock is not None and sock.family == socket.AF_NETLINK:
                # imported here: the agent's image has no pyroute2 (and no netlink sockets)
                from kvpn.tun.netlink import netlink_datagram_endpoint

                return netlink_datagram_endpoint(self, protocol_factory, sock)
            return await super().create_datagram_endpoint(
                protocol_factory, local_addr, remote_addr, sock=sock, **kwargs
            )

    return KvpnUvloop
