"""Programs the benchmark runs in the laptop namespace: measuring clients and tunnel processes.

* ``run_measure`` runs one ``python -m bench.measure ...`` with ``ip netns exec`` and returns
  its JSON (or ``{"ok": False, "error": ...}``), always within a time bound.
* ``Background`` is a long-running program (``ssh -L``, sshuttle, ``kvpn connect``) whose output
  lines are collected by a thread, so the caller can wait for a line with a timeout and stop
  it with SIGINT (then SIGKILL) - never leaving it behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MEASURE_SLACK_S = 90.0  # on top of a measurement's own time bound


def venv_bin(program: str) -> str:
    """Full path of a program installed beside the running interpreter."""
    return str(Path(sys.executable).parent / program)


def in_netns(netns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv]


def measure_argv(netns: str, kind: str, host: str, port: int, **options: object) -> list[str]:
    argv = [sys.executable, "-m", "bench.measure", kind, "--host", host, "--port", str(port)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return in_netns(netns, argv)


def parse_measure_output(stdout: str, stderr: str = "") -> dict[str, Any]:
    """The first JSON object line of a measurement's output, or an error result."""
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if isinstance(data, dict):
                return data
    detail = (stderr.strip().splitlines() or ["no output"])[-1]
    return {"ok": False, "error": detail}


def run_measure(
    netns: str, kind: str, host: str, port: int, *, bound_s: float, **options: object
) -> dict[str, Any]:
    """Run one measurement in ``netns``; it is killed after ``bound_s`` + slack seconds."""
    argv = measure_argv(netns, kind, host, port, **options)
    try:
        proc = subprocess.run(
            argv,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=bound_s + MEASURE_SLACK_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"{kind}: no result within {bound_s + MEASURE_SLACK_S:.0f} s"}
    return parse_measure_output(proc.stdout, proc.stderr)


class Background:
    """A program running in the background; its stdout and stderr lines are kept."""

    def __init__(self, argv: Sequence[str], *, stdin_pipe: bool = False) -> None:
        self.argv = list(argv)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv,
            cwd=REPO,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # our Ctrl-C handling stops it, in order
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> None:
        if self.proc.stdout is None:
            return
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def output(self, last: int = 20) -> str:
        with self._changed:
            return "\n".join(self.lines[-last:])

    def wait_for(self, matches: Callable[[str], bool], timeout: float) -> str | None:
        """The first output line that ``matches``; None if the program ended or time ran out."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((line for line in self.lines if matches(line)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    return None
                self._changed.wait(min(left, 0.5))

    def write_line(self, text: str) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(text + "\n")
                self.proc.stdin.flush()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGINT (what Ctrl-C sends), then SIGKILL after ``timeout``; the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        return self.proc.returncode


def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` in MB (VmRSS), or None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return None
