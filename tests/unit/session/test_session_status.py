"""kvpn status: judging sessions (dead, unresponsive, the session's own state), rendering,
and the status file's permissions."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from kvpn.cli.errors import UserError
from kvpn.cli.status_command import run_status
from kvpn.session_status import (
    STALE_AFTER,
    SessionStatus,
    Verdict,
    ensure_private_dir,
    judge,
    list_sessions,
    render_json,
    render_text,
    status_path,
    summarize_counters,
    write_status,
)

NOW = 1_800_000_000.0
RECORD = {
    "pid": 4242,
    "tun": "kvpn0",
    "namespace": "default",
    "context": "dev",
    "shadow_pod": "kvpn-shadow-abcd1234",
    "transport": "portforward",
    "routes": {"installed": ["10.96.0.0/12", "10.244.0.0/16"]},
    "dns": {"mode": "resolv.conf"},
}


def _status(**overrides: Any) -> dict[str, Any]:
    status = SessionStatus(
        session="abcd1234",
        pid=4242,
        pid_start=777,
        state="connected",
        since=NOW - 60,
        updated_at=NOW - 1,
        shadow_pod="default/kvpn-shadow-abcd1234",
        transport="portforward",
        tun="kvpn0",
        routes=("10.96.0.0/12", "10.244.0.0/16"),
        dns_mode="resolv.conf",
        counters=summarize_counters(
            {
                "tcp_flows_open": 3,
                "udp_flows_open": 1,
                "tcp_bytes_up": 2048,
                "tcp_bytes_down": 5 << 20,
                "udp_bytes_out": 10,
                "drop.tcp_no_flow": 2,
                "datagrams_dropped_tunnel_down": 4,
            },
            {"queries": 7, "cache_hits": 2},
        ),
    ).to_json()
    status.update(overrides)
    return status


def _alive(pid: int, started: int) -> bool:
    return True


def _dead(pid: int, started: int) -> bool:
    return False


CASES: list[tuple[str, dict[str, Any] | None, Any, Verdict, str]] = [
    ("connected", _status(), _alive, Verdict.CONNECTED, "since 2027-01-15 07:59:00 UTC"),
    (
        "reconnecting",
        _status(state="reconnecting", reason="pod deleted", last_error="404 Not Found"),
        _alive,
        Verdict.RECONNECTING,
        "since 2027-01-15 07:59:00 UTC; pod deleted; last error: 404 Not Found",
    ),
    (
        "degraded",
        _status(state="degraded", reason="UDP relay unavailable"),
        _alive,
        Verdict.DEGRADED,
        "since 2027-01-15 07:59:00 UTC; UDP relay unavailable",
    ),
    (
        "dead pid wins over a fresh file",
        _status(),
        _dead,
        Verdict.DEAD,
        "process 4242 is not running",
    ),
    (
        "stale file",
        _status(updated_at=NOW - STALE_AFTER - 2),
        _alive,
        Verdict.UNRESPONSIVE,
        "no update for 12 s",
    ),
    (
        "file from the future",
        _status(updated_at=NOW + STALE_AFTER + 5),
        _alive,
        Verdict.UNRESPONSIVE,
        "the status file's time is in the future",
    ),
    ("no status file", None, _alive, Verdict.UNRESPONSIVE, "no readable status file"),
    (
        "updated_at malformed",
        _status(updated_at="yesterday"),
        _alive,
        Verdict.UNRESPONSIVE,
        "no readable status file",
    ),
    (
        "unknown state",
        _status(state="great"),
        _alive,
        Verdict.UNRESPONSIVE,
        "unknown state in the status file",
    ),
    (
        "another session's status",
        _status(session="other"),
        _alive,
        Verdict.UNRESPONSIVE,
        "no readable status file",
    ),
    (
        "stopping",
        _status(state="stopped"),
        _alive,
        Verdict.STOPPING,
        "since 2027-01-15 07:59:00 UTC",
    ),
]


@pytest.mark.parametrize(
    ("status", "alive", "verdict", "detail"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_judge(status: dict[str, Any] | None, alive: Any, verdict: Verdict, detail: str) -> None:
    view = judge("abcd1234", Path("/x.json"), RECORD, status, now=NOW, alive=alive)
    assert view.verdict is verdict
    assert view.detail == detail


def test_dead_headline_says_what_to_do() -> None:
    view = judge("abcd1234", Path("/x.json"), RECORD, _status(), now=NOW, alive=_dead)
    assert view.headline == "dead (run kvpn clean)"


def test_liveness_check_gets_the_recorded_start_time() -> None:
    seen: list[tuple[int, int]] = []

    def alive(pid: int, started: int) -> bool:
        seen.append((pid, started))
        return True

    judge("abcd1234", Path("/x.json"), RECORD, _status(), now=NOW, alive=alive)
    assert seen == [(4242, 777)]


def test_summarize_counters() -> None:
    counters = _status()["counters"]
    assert counters["flows_open"] == 4
    assert counters["bytes_up"] == 2058 and counters["bytes_down"] == 5 << 20
    assert counters["drops"] == {"tcp_no_flow": 2, "tunnel_down": 4}
    assert counters["dns"] == {"queries": 7, "cache_hits": 2}


def _session_dir(tmp_path: Path) -> Path:
    sessions = tmp_path / "sessions"
    ensure_private_dir(sessions)
    (sessions / "abcd1234.json").write_text(json.dumps(RECORD))
    (sessions / "broken.json").write_text("{not json")
    (sessions / "nopid.json").write_text(json.dumps({"tun": "kvpn0"}))
    write_status(status_path(sessions, "abcd1234"), _from_json(_status()))
    return sessions


def _from_json(data: dict[str, Any]) -> SessionStatus:
    data = dict(data)
    data.pop("version")
    data["routes"] = tuple(data["routes"])
    return SessionStatus(**data)


def test_list_sessions_skips_malformed_and_status_files(tmp_path: Path) -> None:
    views = list_sessions(_session_dir(tmp_path), now=NOW, alive=_alive)
    assert [(v.session, v.verdict) for v in views] == [("abcd1234", Verdict.CONNECTED)]
    assert list_sessions(tmp_path / "missing", now=NOW, alive=_alive) == []


def test_render_text(tmp_path: Path) -> None:
    views = list_sessions(_session_dir(tmp_path), now=NOW, alive=_alive)
    text = render_text(views)
    assert text.splitlines()[0] == "session abcd1234: connected (since 2027-01-15 07:59:00 UTC)"
    assert "shadow pod   default/kvpn-shadow-abcd1234 (portforward)" in text
    assert "routes       10.96.0.0/12, 10.244.0.0/16 -> kvpn0" in text
    assert "dns          resolv.conf" in text
    assert "4 flows open, 2.0 KiB up, 5.0 MiB down; drops: tcp_no_flow 2, tunnel_down 4" in text
    assert render_text([]) == "no kvpn sessions on this machine"


def test_render_json(tmp_path: Path) -> None:
    views = list_sessions(_session_dir(tmp_path), now=NOW, alive=_alive)
    data = json.loads(render_json(views))
    (session,) = data["sessions"]
    assert session["state"] == "connected"
    assert session["shadow_pod"] == "default/kvpn-shadow-abcd1234"
    assert session["routes"] == ["10.96.0.0/12", "10.244.0.0/16"]
    assert session["dns_mode"] == "resolv.conf"
    assert session["counters"]["flows_open"] == 4
    assert session["status_age_s"] == pytest.approx(1.0)


def test_json_of_a_dead_session_falls_back_to_the_session_file(tmp_path: Path) -> None:
    sessions = _session_dir(tmp_path)
    status_path(sessions, "abcd1234").unlink()
    (session,) = json.loads(render_json(list_sessions(sessions, now=NOW, alive=_dead)))["sessions"]
    assert session["state"] == "dead" and session["summary"] == "dead (run kvpn clean)"
    assert session["shadow_pod"] == "default/kvpn-shadow-abcd1234"
    assert session["routes"] == ["10.96.0.0/12", "10.244.0.0/16"]


def test_files_are_private(tmp_path: Path) -> None:
    sessions = _session_dir(tmp_path)
    assert stat.S_IMODE(sessions.stat().st_mode) == 0o700
    assert stat.S_IMODE(status_path(sessions, "abcd1234").stat().st_mode) == 0o600
    assert not [p for p in sessions.iterdir() if p.name.endswith(".tmp")]
    wide = tmp_path / "wide"
    wide.mkdir(mode=0o755)
    os.chmod(wide, 0o755)
    ensure_private_dir(wide)
    assert stat.S_IMODE(wide.stat().st_mode) == 0o700


def test_cli_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _session_dir(tmp_path)
    assert run_status(output="json", state_dir=tmp_path) == 0
    (session,) = json.loads(capsys.readouterr().out)["sessions"]
    # the test's clock is real time: the file written for NOW is far in the past or future
    assert session["session"] == "abcd1234" and session["state"] in ("dead", "unresponsive")
    with pytest.raises(UserError):
        run_status(output="yaml", state_dir=tmp_path)


def test_cli_status_says_when_it_may_not_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _session_dir(tmp_path)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match="permission denied"):
        run_status(output="text", state_dir=tmp_path)
