"""Agent configuration, dial-error classification and the ``python -m kvpn.shadow`` entry."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys

import pytest

from kvpn.shadow.agent import AgentConfig, ConfigError, parse_authorized_key
from kvpn.shadow.dial_errors import DialFailure, classify_dial_error, format_reason, parse_reason
from kvpn.tunnel.keys import new_session_key, parse_public_key, public_key_text


def test_from_env_requires_authorized_key() -> None:
    with pytest.raises(ConfigError, match="KVPN_AUTHORIZED_KEY"):
        AgentConfig.from_env({})


def test_from_env_reads_settings() -> None:
    key = public_key_text(new_session_key())
    config = AgentConfig.from_env(
        {"KVPN_AUTHORIZED_KEY": key, "KVPN_LISTEN_PORT": "2300", "KVPN_DIAL_TIMEOUT": "3"}
    )
    assert config.listen_port == 2300
    assert config.listen_host == "0.0.0.0"
    assert config.dial_timeout == 3.0
    assert config.authorized_key == key


@pytest.mark.parametrize(
    "env",
    [
        {"KVPN_LISTEN_PORT": "ssh"},
        {"KVPN_LISTEN_PORT": "70000"},
        {"KVPN_DIAL_TIMEOUT": "-1"},
        {"KVPN_UDP_IDLE_TIMEOUT": "soon"},
    ],
)
def test_from_env_rejects_bad_values(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        AgentConfig.from_env({"KVPN_AUTHORIZED_KEY": "x", **env})


@pytest.mark.parametrize("text", ["", "garbage", "ssh-ed25519 AAAA", 'command="sh" ssh-ed25519 AAAA'])
def test_authorized_key_must_be_one_plain_public_key(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_authorized_key(text)


def test_keys_round_trip() -> None:
    key = new_session_key()
    text = public_key_text(key)
    assert text.startswith("ssh-ed25519 ") and "\n" not in text
    assert parse_public_key(text) == key.convert_to_public()
    with pytest.raises(ValueError):
        parse_public_key("not a key")


@pytest.mark.parametrize(
    ("exc", "failure"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), DialFailure.REFUSED),
        (OSError(errno.EHOSTUNREACH, "no route"), DialFailure.UNREACHABLE),
        (OSError(errno.ENETUNREACH, "net unreachable"), DialFailure.UNREACHABLE),
        (TimeoutError(), DialFailure.TIMEOUT),
        (OSError(errno.ETIMEDOUT, "timed out"), DialFailure.TIMEOUT),
        (socket.gaierror(socket.EAI_NONAME, "unknown"), DialFailure.NAME_NOT_FOUND),
        (OSError(errno.EMFILE, "too many files"), DialFailure.OTHER),
        (ValueError("odd"), DialFailure.OTHER),
    ],
)
def test_classify_dial_error(exc: BaseException, failure: DialFailure) -> None:
    assert classify_dial_error(exc) is failure


@pytest.mark.parametrize("failure", list(DialFailure))
def test_reason_round_trip(failure: DialFailure) -> None:
    assert parse_reason(format_reason(failure, "detail: with colon")) is failure


@pytest.mark.parametrize("reason", ["", "Connection refused", "kvpn-dial-bogus: x"])
def test_unknown_reason_is_other(reason: str) -> None:
    assert parse_reason(reason) is DialFailure.OTHER


def _agent_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVPN_")}
    env.update(extra)
    return env


def test_module_refuses_to_start_without_key() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kvpn.shadow"],
        env=_agent_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "KVPN_AUTHORIZED_KEY is not set" in proc.stderr
    assert proc.stdout == ""


def test_module_announces_host_key_and_stops_on_sigterm() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = _agent_env(
        KVPN_AUTHORIZED_KEY=public_key_text(new_session_key()),
        KVPN_LISTEN_HOST="127.0.0.1",
        KVPN_LISTEN_PORT=str(port),
    )
    with subprocess.Popen(
        [sys.executable, "-m", "kvpn.shadow"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        _check_running_agent(proc, port)


def _check_running_agent(proc: subprocess.Popen[str], port: int) -> None:
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("KVPN-HOST-KEY ssh-ed25519 ")
        parse_public_key(line.split(" ", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            assert conn.recv(64).startswith(b"SSH-2.0-")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert proc.stdout.read() == ""  # exactly one stdout line
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
