"""run_routes: plan and live views, --explain, --output json, and one-line errors."""

from __future__ import annotations

import json
import os
import socket
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from kvpn.cli import routes_command
from kvpn.cli.errors import UserError
from kvpn.cli.routes_command import run_routes
from kvpn.routes.discovery import ClusterCidrs
from kvpn.routes.plan import LocalRoute, RoutePlan, plan_routes
from kvpn.routes.session_file import find_live_session, read_session, write_session

N = IPv4Network
A = IPv4Address

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {{server: "{server}"}}
users:
- name: u
  user: {{token: abc}}
contexts:
- name: sandbox
  context: {{cluster: c, user: u, namespace: team}}
current-context: sandbox
"""
CLUSTER = ClusterCidrs(
    (N("10.244.0.0/24"),),
    (N("10.96.0.0/12"),),
    ("a discovery note",),
    pod_source="node.spec.podCIDRs",
    service_source="the API server's range error",
)
LOCAL = [
    LocalRoute(N("0.0.0.0/0"), "eth0", A("172.31.255.1")),
    LocalRoute(N("172.31.255.0/30"), "eth0"),
    LocalRoute(N("10.96.0.50/32"), "eth0", A("172.31.255.1")),
    LocalRoute(N("10.244.0.128/25"), "docker0"),
]


@pytest.fixture
def kubeconfig(tmp_path: Path) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(KUBECONFIG.format(server="http://10.96.0.50:6443"))
    return str(path)


@pytest.fixture
def sessions(tmp_path: Path) -> Path:
    return tmp_path / "sessions"


@pytest.fixture
def fake_cluster(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    asked: list[str] = []

    def discover(core: Any, namespace: str) -> ClusterCidrs:
        asked.append(namespace)
        return CLUSTER

    monkeypatch.setattr(routes_command, "discover", discover)
    monkeypatch.setattr(routes_command, "read_local_routes", lambda skip_dev=None: list(LOCAL))
    return asked


def run(kubeconfig: str, sessions: Path, **kw: Any) -> int:
    options: dict[str, Any] = {"context": None, "namespace": None}
    options.update(kw)
    return run_routes(kubeconfig=kubeconfig, sessions_dir=sessions, **options)


def test_plan_text(
    kubeconfig: str, sessions: Path, fake_cluster: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(kubeconfig, sessions) == 0
    out = capsys.readouterr().out
    assert fake_cluster == ["team"]
    assert "plan for context sandbox, namespace team (not connected)" in out
    assert "10.96.0.0/12   service  the API server's range error" in out
    assert "To install on kvpn0 (21 prefixes):" in out
    assert (
        "10.96.0.50/32    api-server   the API server (http://10.96.0.50:6443); cuts 10.96.0.0/12"
        in out
    )
    assert "local route 10.244.0.128/25 dev docker0 overlaps 10.244.0.0/24: kept" in out
    assert "- a discovery note" in out


def test_plan_json_with_options(
    kubeconfig: str, sessions: Path, fake_cluster: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(
        kubeconfig,
        sessions,
        namespace="other",
        include_cidrs=["192.168.50.0/24"],
        exclude_cidrs=["10.96.5.0/24"],
        on_conflict="override",
        output="json",
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "plan" and data["namespace"] == "other"
    plan = RoutePlan.from_json(data["plan"])
    assert [e.reason.value for e in plan.exclusions] == ["api-server", "user"]
    assert plan.conflicts[0].action.value == "overridden"
    assert N("192.168.50.0/24") in plan.installed


def test_explain_text_and_json(
    kubeconfig: str, sessions: Path, fake_cluster: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    run(kubeconfig, sessions, explain="10.96.0.50")
    text = capsys.readouterr().out.strip()
    assert text.startswith("10.96.0.50 does not go through kvpn")
    assert "the API server (http://10.96.0.50:6443)" in text
    assert "10.96.0.50/32 via 172.31.255.1 dev eth0" in text

    run(kubeconfig, sessions, explain="10.244.0.200", output="json")
    data = json.loads(capsys.readouterr().out)
    assert data["verdict"] == "local-route" and data["via_kvpn"] is False
    assert data["route"]["dev"] == "docker0"


def test_fail_policy_returns_1(
    kubeconfig: str, sessions: Path, fake_cluster: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(kubeconfig, sessions, on_conflict="fail") == 1
    assert "none: the plan is refused" in capsys.readouterr().out


def live_plan() -> RoutePlan:
    return plan_routes(
        CLUSTER,
        apiserver_addresses=[A("10.96.0.50")],
        local_routes=LOCAL,
        apiserver_name="http://10.96.0.50:6443",
    )


def test_live_session_is_shown_and_checked_against_the_tun(
    kubeconfig: str,
    sessions: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    plan = live_plan()
    write_session(
        "s-live", pid=os.getpid(), tun="kvpn0", namespace="team", context="sandbox",
        routes=plan, directory=sessions,
    )  # fmt: skip
    # Everything installed except the first prefix is on the TUN.
    on_tun = [LocalRoute(n, "kvpn0") for n in plan.installed[1:]]

    def no_discovery(*a: Any) -> Any:
        raise AssertionError("live mode must not ask the cluster")

    monkeypatch.setattr(routes_command, "discover", no_discovery)
    monkeypatch.setattr(
        routes_command, "read_local_routes", lambda skip_dev=None: [*LOCAL, *on_tun]
    )
    assert run(kubeconfig, sessions, exclude_cidrs=["10.1.0.0/16"]) == 0
    out = capsys.readouterr().out
    assert f"live session s-live (pid {os.getpid()}, kvpn0)" in out
    assert f"missing on kvpn0 right now: {plan.installed[0]}" in out
    assert "--exclude-cidr apply to a new plan" in out

    # --explain uses what is really on the TUN: the missing prefix is not routed.
    missing = plan.installed[0].network_address
    run(kubeconfig, sessions, explain=str(missing), output="json")
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "live" and data["via_kvpn"] is False
    run(kubeconfig, sessions, explain=str(plan.installed[-1].network_address), output="json")
    assert json.loads(capsys.readouterr().out)["via_kvpn"] is True


def test_dead_or_foreign_sessions_are_ignored(
    kubeconfig: str, sessions: Path, fake_cluster: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    dead = write_session(
        "s-dead", pid=2**22 + 12345, tun="kvpn0", namespace="team", context="sandbox",
        routes=live_plan(), directory=sessions,
    )  # fmt: skip
    write_session(
        "s-other", pid=os.getpid(), tun="kvpn1", namespace="team", context="prod",
        routes=live_plan(), directory=sessions,
    )  # fmt: skip
    (sessions / "garbage.json").write_text("{not json")
    (sessions / "wrong.json").write_text(json.dumps({"pid": "1", "routes": {}}))
    assert read_session(dead) is not None
    assert find_live_session("sandbox", sessions) is None
    run(kubeconfig, sessions)
    assert "(not connected)" in capsys.readouterr().out


def test_session_file_round_trip(sessions: Path) -> None:
    path = write_session(
        "abc", pid=os.getpid(), tun="kvpn0", namespace="n", context="c", routes=live_plan(),
        directory=sessions, extra={"shadow_pod": "kvpn-abc"},
    )  # fmt: skip
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert json.loads(path.read_text())["shadow_pod"] == "kvpn-abc"
    session = find_live_session("c", sessions)
    assert session is not None and session.routes == live_plan()
    with pytest.raises(ValueError):
        write_session(
            "../x", pid=1, tun="t", namespace="n", context="c", routes=live_plan(),
            directory=sessions,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"include_cidrs": ["10.0.0.300/8"]}, "--include-cidr: invalid CIDR '10.0.0.300/8'"),
        ({"exclude_cidrs": ["10.1.2.3/16"]}, "host bits set (did you mean 10.1.0.0/16?)"),
        ({"exclude_cidrs": ["fd00::/8"]}, "only IPv4"),
        ({"on_conflict": "maybe"}, "--on-conflict must be one of keep, override, skip, fail"),
        ({"output": "yaml"}, "--output must be one of text, json"),
        ({"context": "nope"}, "unknown context 'nope'"),
        ({"explain": "no-such-host.invalid"}, "--explain: cannot resolve no-such-host.invalid"),
    ],
)
def test_bad_input_is_one_line(
    kubeconfig: str,
    sessions: Path,
    fake_cluster: list[str],
    monkeypatch: pytest.MonkeyPatch,
    options: dict[str, Any],
    message: str,
) -> None:
    def no_dns(*a: Any, **kw: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(UserError) as info:
        run(kubeconfig, sessions, **options)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unreachable_api_server_is_one_line(
    tmp_path: Path, sessions: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = tmp_path / "closed"
    path.write_text(KUBECONFIG.format(server=f"http://127.0.0.1:{port}"))
    monkeypatch.setattr(routes_command, "read_local_routes", lambda skip_dev=None: list(LOCAL))
    with pytest.raises(UserError) as info:
        run(str(path), sessions)
    text = str(info.value)
    assert text.startswith(f"http://127.0.0.1:{port}: cannot reach the API server")
    assert "\n" not in text
