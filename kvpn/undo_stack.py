"""The undo stack every session (connect, exchange, preview) registers its changes on.

Each step that changes something pushes its undo *before* the change is made; on exit the
stack runs newest first, and every step runs even when an earlier one failed, so a failure
anywhere, Ctrl-C or SIGTERM removes exactly what was made.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class UndoStack:
    """Undo steps, run newest first; each one runs even if an earlier one failed."""

    steps: list[tuple[str, Callable[[], Awaitable[object]]]] = field(default_factory=list)

    def push(self, what: str, step: Callable[[], Awaitable[object]]) -> None:
        self.steps.append((what, step))

    async def run(self) -> list[str]:
        """Run every step; return a line for each one that failed."""
        problems = []
        while self.steps:
            what, step = self.steps.pop()
            try:
                await asyncio.shield(step())
            except Exception as exc:
                problems.append(f"{what}: {exc}")
        return problems
