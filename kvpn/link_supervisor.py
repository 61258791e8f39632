"""Keep a session's tunnel alive: notice it died, reconnect with backoff, swap it in.

The asyncio adapter around :class:`kvpn.link_state.LinkMachine`. It watches the current
tunnel (``wait_closed()``; the SSH keepalives, 2 s x 3 by default, close a silent
connection within about 8 s), and every ``tick`` seconds checks its health (keepalives
answered, UDP/ping relay open) and publishes the session's status. When the tunnel dies it
tells the data plane (:meth:`kvpn.dataplane.DataPlane.tunnel_lost`: flows reset, TUN, routes
and DNS stay), then runs ``reconnect()`` - which may recreate the shadow pod
(:mod:`kvpn.shadow_link`) - at the times the machine says, and hands the new tunnel to
:meth:`kvpn.dataplane.DataPlane.replace_tunnel`. State changes are printed as one line each
(``reconnecting: <reason>``, ``reconnected after 3.2 s``).

``kvpn exchange``, ``preview`` and ``mesh`` have no TUN: they pass :class:`NoDataPlane`, and
their ``reconnect()`` re-issues the remote forwards on the new tunnel
(:func:`kvpn.intercept_session.supervise`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kvpn.link_state import Backoff, LinkChange, LinkEvent, LinkMachine, LinkSnapshot

__all__ = [
    "LinkConfig",
    "LinkSupervisor",
    "NoDataPlane",
    "SupervisedTunnel",
    "keepalives_unanswered",
]

log = logging.getLogger(__name__)


class SupervisedTunnel(Protocol):
    async def wait_closed(self) -> None: ...

    async def close(self) -> None: ...


class SupervisedDataPlane(Protocol):
    @property
    def datagrams_ok(self) -> bool: ...

    def tunnel_lost(self) -> None: ...

    async def replace_tunnel(self, tunnel: Any) -> None: ...

    async def reopen_datagrams(self) -> None: ...


class NoDataPlane:
    """The data plane of a session with no TUN (``kvpn exchange``, ``preview``, ``mesh``):
    its connections come *from* the shadow pod as ``forwarded-tcpip`` channels, so a lost
    tunnel has no flows of ours to reset and a new one nothing to re-wire (the session's
    reconnect re-issues its remote forwards itself)."""

    @property
    def datagrams_ok(self) -> bool:
        return True

    def tunnel_lost(self) -> None:
        return None

    async def replace_tunnel(self, tunnel: Any) -> None:
        return None

    async def reopen_datagrams(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class LinkConfig:
    keepalive_interval: float = 2.0
    keepalive_count_max: int = 3
    #: health check and status file period
    tick: float = 2.0
    #: short waits: a reconnect attempt is one API request, and after a blip the user waits
    #: for at most one failed attempt (transport timeout, 5 s) plus one backoff (3 s)
    backoff: Backoff = Backoff(initial=0.5, factor=2.0, cap=3.0)
    #: one attempt, including recreating the shadow pod and waiting for it
    attempt_timeout: float = 90.0
    close_timeout: float = 5.0
    #: keepalives unanswered before the session says "degraded"
    late_keepalives: int = 2


def keepalives_unanswered(tunnel: object) -> int:
    """How many keepalive requests in a row the agent has not answered yet.

    asyncssh keeps this count privately (``_keepalive_count``, reset by each answer); it is
    read best effort so ``kvpn status`` can stop saying "connected" before the connection is
    declared dead. 0 when unknown.
    """
    count = getattr(getattr(tunnel, "connection", None), "_keepalive_count", 0)
    return count if isinstance(count, int) and not isinstance(count, bool) else 0


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text or type(exc).__name__


class LinkSupervisor:
    def __init__(
        self,
        dataplane: SupervisedDataPlane,
        tunnel: SupervisedTunnel,
        reconnect: Callable[[], Awaitable[SupervisedTunnel]],
        *,
        out: Callable[[str], None],
        publish: Callable[[], None] = lambda: None,
        config: LinkConfig | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._dataplane = dataplane
        self._tunnel = tunnel
        self._reconnect = reconnect
        self._out = out
        self._publish = publish
        self._config = config or LinkConfig()
        self._clock = clock or asyncio.get_running_loop().time
        self._machine = LinkMachine(now=self._clock(), backoff=self._config.backoff)
        self._late = 0
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def tunnel(self) -> SupervisedTunnel:
        return self._tunnel

    def snapshot(self) -> LinkSnapshot:
        return self._machine.snapshot()

    async def close_tunnel(self) -> None:
        """Close the current tunnel (the session's undo step)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._tunnel.close(), self._config.close_timeout)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def run(self, stop: asyncio.Event) -> None:
        """Supervise until *stop* is set."""
        stopped = asyncio.ensure_future(stop.wait())
        try:
            self._publish()
            while not stop.is_set():
                if self._machine.get_timer() is not None:
                    await self._reconnect_step(stopped)
                else:
                    await self._watch_step(stopped)
        finally:
            stopped.cancel()
            self._machine.handle(LinkEvent.STOP, now=self._clock())
            with contextlib.suppress(Exception):
                self._publish()  # "stopping" while the session undoes its changes

    # ------------------------------------------------------------------ while up

    async def _watch_step(self, stopped: asyncio.Future[Any]) -> None:
        closed = asyncio.ensure_future(self._tunnel.wait_closed())
        tick = asyncio.ensure_future(asyncio.sleep(self._config.tick))
        try:
            done, _ = await asyncio.wait(
                {closed, tick, stopped}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            closed.cancel()
            tick.cancel()
        if stopped in done:
            return
        if closed in done:
            self._lose(self._loss_reason())
        else:
            await self._check_health()
        self._publish()

    def _loss_reason(self) -> str:
        failure = getattr(getattr(self._tunnel, "transport", None), "failure", None)
        if failure is not None:
            return describe_error(failure)
        if self._late >= self._config.late_keepalives:
            return "the shadow agent stopped answering keepalives"
        return "the SSH connection to the shadow pod closed"

    def _lose(self, reason: str) -> None:
        self._dataplane.tunnel_lost()
        old = self._tunnel
        task = asyncio.ensure_future(self._close_quietly(old))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        self._late = 0
        self._apply(LinkEvent.LOST, reason)

    async def _close_quietly(self, tunnel: SupervisedTunnel) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(tunnel.close(), self._config.close_timeout)

    async def _check_health(self) -> None:
        problems = []
        self._late = keepalives_unanswered(self._tunnel)
        if self._late >= self._config.late_keepalives:
            problems.append("the shadow agent is not answering keepalives")
        problem = await self._ensure_datagrams()
        if problem:
            problems.append(problem)
        event = LinkEvent.PARTIAL if problems else LinkEvent.HEALTHY
        self._apply(event, "; ".join(problems))

    async def _ensure_datagrams(self) -> str:
        """ "" when UDP and ping can pass, else why not (after one try to reopen the relay)."""
        if self._dataplane.datagrams_ok:
            return ""
        try:
            await asyncio.wait_for(self._dataplane.reopen_datagrams(), self._config.tick * 2)
        except Exception as exc:
            return f"UDP and ping relay unavailable: {describe_error(exc)}"
        return "" if self._dataplane.datagrams_ok else "UDP and ping relay unavailable"

    # ------------------------------------------------------------------ while down

    async def _reconnect_step(self, stopped: asyncio.Future[Any]) -> None:
        when = self._machine.get_timer()
        now = self._clock()
        if when is not None and when > now:
            wait = min(when - now, self._config.tick)
            await asyncio.wait({stopped}, timeout=wait)
            self._publish()
            return
        if not self._machine.handle_timer(now=now):
            return
        attempt = asyncio.ensure_future(
            asyncio.wait_for(self._reconnect(), self._config.attempt_timeout)
        )
        try:
            while not attempt.done():
                await asyncio.wait(
                    {attempt, stopped},
                    timeout=self._config.tick,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if stopped.done():
                    attempt.cancel()
                    with contextlib.suppress(BaseException):
                        tunnel = await attempt
                        await self._close_quietly(tunnel)
                    return
                self._publish()
        except asyncio.CancelledError:
            attempt.cancel()
            raise
        try:
            tunnel = attempt.result()
        except Exception as exc:
            reason = (
                describe_error(exc)
                if not isinstance(exc, TimeoutError)
                else (f"no tunnel within {self._config.attempt_timeout:g} s")
            )
            self._apply(LinkEvent.ATTEMPT_FAILED, reason)
            snapshot = self._machine.snapshot()
            delay = (snapshot.next_attempt or now) - self._clock()
            self._out(
                f"kvpn: reconnect attempt {snapshot.attempts} failed: {reason}; "
                f"next in {max(0.0, delay):.0f} s"
            )
            self._publish()
            return
        self._tunnel = tunnel
        problem = ""
        try:
            await self._dataplane.replace_tunnel(tunnel)
        except Exception as exc:
            problem = f"UDP and ping relay unavailable: {describe_error(exc)}"
        self._apply(LinkEvent.PARTIAL if problem else LinkEvent.HEALTHY, problem)
        self._publish()

    # ------------------------------------------------------------------ helpers

    def _apply(self, event: LinkEvent, reason: str) -> None:
        change: LinkChange | None = self._machine.handle(event, now=self._clock(), reason=reason)
        if change is not None:
            self._out(change.describe())
            log.info("link: %s -> %s (%s)", change.old.value, change.new.value, change.reason)
