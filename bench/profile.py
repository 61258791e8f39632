"""Optional py-spy profile of the kvpn process while it is measured (``--py-spy DIR``).

py-spy samples the running ``kvpn connect`` from outside (``--nonblocking``: the target is not
paused), so kvpn needs no change. Its ``raw`` output is one line per distinct stack,
``frame;frame;...;frame COUNT``; ``top_functions`` turns that into where the CPU time went
(by function, line numbers dropped), both *self* (the innermost frame) and *total*.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.processes import REPO, Background, venv_bin

SAMPLE_RATE = 200
LINE_NUMBER_RE = re.compile(r":\d+\)$")
SITE_PACKAGES_RE = re.compile(r"\([^()]*/(?:site-packages|lib/python3\.\d+)/")


@dataclass(frozen=True)
class FunctionShare:
    function: str
    self_percent: float
    total_percent: float

    def render(self) -> str:
        return f"{self.self_percent:5.1f}% self {self.total_percent:5.1f}% total  {self.function}"


def _function(frame: str) -> str:
    """``handle (/x/venv/lib/python3.11/site-packages/asyncssh/channel.py:123)`` ->
    ``handle (asyncssh/channel.py)``."""
    frame = LINE_NUMBER_RE.sub(")", frame.strip())
    frame = SITE_PACKAGES_RE.sub("(", frame)
    return frame.replace(f"({REPO}/", "(")


def top_functions(raw: str, count: int = 15) -> list[FunctionShare]:
    """The functions with the most self time in py-spy ``raw`` output (malformed lines skipped)."""
    self_samples: Counter[str] = Counter()
    total_samples: Counter[str] = Counter()
    all_samples = 0
    for line in raw.splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        samples = int(number)
        functions = [_function(frame) for frame in stack.split(";") if frame.strip()]
        if not functions:
            continue
        all_samples += samples
        self_samples[functions[-1]] += samples
        for function in set(functions):
            total_samples[function] += samples
    if not all_samples:
        return []
    return [
        FunctionShare(
            function,
            100.0 * samples / all_samples,
            100.0 * total_samples[function] / all_samples,
        )
        for function, samples in self_samples.most_common(count)
    ]


def py_spy_path() -> str | None:
    program = venv_bin("py-spy")
    return program if Path(program).exists() else shutil.which("py-spy")


@dataclass(frozen=True)
class Profiler:
    """A running ``py-spy record`` and the file it writes when stopped."""

    program: Background
    output: Path

    def stop(self) -> list[FunctionShare]:
        """Stop sampling (SIGINT makes py-spy write its file); the top functions.

        Raises ``OSError`` if py-spy wrote nothing.
        """
        self.program.stop()
        return top_functions(self.output.read_text())


def start_profiler(pid: int, output: Path) -> Profiler | None:
    """``py-spy record`` of ``pid`` into ``output`` until stopped; None if py-spy is missing."""
    program = py_spy_path()
    if program is None:
        return None
    output.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        program, "record", "--pid", str(pid), "--rate", str(SAMPLE_RATE), "--nonblocking",
        "--format", "raw", "--output", str(output),
    ]  # fmt: skip
    return Profiler(Background(argv), output)
