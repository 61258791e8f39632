"""The command line: help is true, bad input is one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def run(program: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / program), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_help_lists_every_command() -> None:
    result = run("kvpn", "--help")
    assert result.returncode == 0
    for command in ("connect", "up", "exchange", "mesh", "preview", "routes", "status", "clean"):
        assert command in result.stdout


def test_kubectl_plugin_is_the_same_program() -> None:
    plugin = run("kubectl-kvpn", "--help")
    assert plugin.returncode == 0
    assert "Usage: kubectl kvpn [OPTIONS] COMMAND" in plugin.stdout
    own = run("kvpn", "--help").stdout
    assert plugin.stdout.replace("kubectl kvpn", "kvpn").split() == own.split()


@pytest.mark.parametrize(
    "args",
    [
        ["connect", "--kubeconfig", "/nonexistent/kubeconfig"],
        ["connect", "--transport", "carrier-pigeon", "--kubeconfig", "/nonexistent"],
        ["routes", "--kubeconfig", "/nonexistent/kubeconfig"],
        ["routes", "--exclude-cidr", "not-a-cidr", "--kubeconfig", "/nonexistent"],
    ],
)
def test_bad_input_is_one_line(args: list[str]) -> None:
    result = run("kvpn", *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["up", "--name", "Bad_Name"],
        ["up", "--name", "ok", "--pod-cidr", "10.0.0.0/33"],
        ["up", "--name", "ok", "--pod-cidr", "10.96.0.0/16"],
        ["up", "--name", "ok", "--apiserver-address", "nonsense"],
    ],
)
def test_sandbox_bad_input_is_one_line(args: list[str]) -> None:
    result = run("kvpn-sandbox", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
