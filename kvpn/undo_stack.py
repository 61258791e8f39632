"""The undo stack every session (connect, exchange, preview) registers its changes on.

Each step that changes something pushes its undo *before* the change is made; on exit the
stack runs newest first, and every step runs even when an earlier one failed, so a failure
anywhere, Ctrl-C or SIGTERM removes exactly what was made.

Given a :class:`kvpn.change_journal.ChangeJournal`, every push that carries a ``replay``
(:class:`kvpn.change_journal.Undo`: how *another* process undoes the change) is written to
the journal, fsync'd, before ``push`` returns - so before the change is made - and marked
done once its in-process undo succeeded. Pushes without ``replay`` are process-local (a
socket, a task, the SSH connection): they end with the process and are not journaled. The
journal file is removed when everything it recorded was undone; otherwise it stays for
``kvpn clean``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from kvpn.change_journal import ChangeJournal, Undo


async def _nothing() -> None:
    return None


@dataclass
class UndoStack:
    """Undo steps, run newest first; each one runs even if an earlier one failed."""

    steps: list[tuple[str, Callable[[], Awaitable[object]], int | None]] = field(
        default_factory=list
    )
    journal: ChangeJournal | None = None

    def push(
        self, what: str, step: Callable[[], Awaitable[object]], replay: Undo | None = None
    ) -> None:
        n = None
        if replay is not None and self.journal is not None:
            n = self.journal.record(what, replay)
        self.steps.append((what, step, n))

    def record(self, what: str, replay: Undo) -> None:
        """Journal a change whose in-process undo is pushed by someone else (later, so it
        runs first); this entry is marked done when the stack reaches it."""
        self.push(what, _nothing, replay)

    def discard(self) -> None:
        """The newest change was never made (it failed): forget its undo."""
        _what, _step, n = self.steps.pop()
        if n is not None and self.journal is not None:
            self.journal.mark_done(n)

    async def run(self) -> list[str]:
        """Run every step; return a line for each one that failed."""
        problems = []
        while self.steps:
            what, step, n = self.steps.pop()
            try:
                await asyncio.shield(step())
            except Exception as exc:
                problems.append(f"{what}: {exc}")
                continue
            if n is not None and self.journal is not None:
                try:
                    self.journal.mark_done(n)
                except OSError as exc:
                    problems.append(f"{what}: undone, but the journal could not say so: {exc}")
        if self.journal is not None:
            self.journal.close()
        return problems
