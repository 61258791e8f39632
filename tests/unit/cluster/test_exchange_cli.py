"""exchange / preview / clean / recover on the command line: true help, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def kvpn(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "kvpn"), *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("command", "words"),
    [
        ("exchange", ["--expose", "--mode", "--skip-port-check", "--kubeconfig", "--namespace"]),
        ("preview", ["--expose", "--external", "--skip-port-check"]),
        ("clean", ["--dry-run", "--all-namespaces"]),
        ("recover", ["--dry-run", "service"]),
    ],
)
def test_help(command: str, words: list[str]) -> None:
    result = kvpn(command, "--help")
    assert result.returncode == 0
    for word in words:
        assert word in result.stdout
    assert "not built" not in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["exchange", "echo", "--expose", "abc"], "--expose LOCAL 'abc' is not a port number"),
        (["exchange", "echo", "--expose", "80", "--mode", "magic"], "--mode must be selector"),
        (["exchange", "echo", "--expose", "80", "--heartbeat", "0"], "--heartbeat must be"),
        (["exchange", "echo", "--expose", "80", "--skip-port-check"], "kubeconfig /nonexistent"),
        (["preview", "web", "--expose", "1:2:3"], "REMOTE '2:3' is not a port number"),
        (["clean"], "kubeconfig /nonexistent"),
        (["recover", "echo"], "kubeconfig /nonexistent"),
    ],
)
def test_bad_input_is_one_line(args: list[str], message: str) -> None:
    result = kvpn(*args, "--kubeconfig", "/nonexistent")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("kvpn: ")
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
