"""kvpn clean and the heartbeat of kvpn connect shadow pods, as a table of cluster states."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kvpn.cluster.cleanup import CONNECT_STARTUP_GRACE, plan_clean
from kvpn.cluster.locks import Identity, format_time
from kvpn.cluster.pod_heartbeat import (
    HEARTBEAT_ANNOTATION,
    HEARTBEAT_TTL_ANNOTATION,
    HeartbeatState,
    PodHeartbeat,
    heartbeat_patch,
    heartbeat_state,
)

T0 = datetime(2026, 11, 25, 19, 30, 0, tzinfo=UTC)
ME = Identity("alice", "laptop")
BOB = Identity("bob", "desk")
OLD = T0 + CONNECT_STARTUP_GRACE + timedelta(minutes=5)  # every pod is past its grace


def connect_pod(
    session: str, who: Identity, *, beat: datetime | None, ttl: str = "30"
) -> dict[str, Any]:
    annotations = {"kvpn.dev/user": who.user, "kvpn.dev/started-at": format_time(T0)}
    if beat is not None:
        annotations[HEARTBEAT_ANNOTATION] = format_time(beat)
        annotations[HEARTBEAT_TTL_ANNOTATION] = ttl
    return {
        "metadata": {
            "name": f"kvpn-shadow-{session}",
            "namespace": "default",
            "annotations": annotations,
            "labels": {"app.kubernetes.io/managed-by": "kvpn", "kvpn.dev/session": session},
        }
    }


CASES = [
    # why, pod, sessions alive on this machine (None: unreadable), deleted?
    ("my pod beating from another machine is kept", connect_pod("c1", ME, beat=OLD), set(), False),
    (
        "my pod beating, session files unreadable, is kept",
        connect_pod("c1", ME, beat=OLD),
        None,
        False,
    ),
    (
        "my pod whose heartbeat expired is deleted",
        connect_pod("c1", ME, beat=OLD - timedelta(seconds=31)),
        set(),
        True,
    ),
    (
        "an expired heartbeat is enough even when session files are unreadable",
        connect_pod("c1", ME, beat=OLD - timedelta(seconds=31)),
        None,
        True,
    ),
    (
        "a live session on this machine wins over an expired heartbeat (API was away)",
        connect_pod("c1", ME, beat=OLD - timedelta(minutes=2)),
        {"c1"},
        False,
    ),
    (
        "another user's expired pod is never touched",
        connect_pod("c2", BOB, beat=OLD - timedelta(minutes=2)),
        set(),
        False,
    ),
    ("another user's beating pod is never touched", connect_pod("c2", BOB, beat=OLD), set(), False),
    (
        "a pod without heartbeat (older kvpn) and no session here: the old rule deletes it",
        connect_pod("c1", ME, beat=None),
        set(),
        True,
    ),
    (
        "a malformed heartbeat falls back to the old rule (a live session here keeps it)",
        connect_pod("c1", ME, beat=OLD, ttl="soon"),
        {"c1"},
        False,
    ),
]


@pytest.mark.parametrize(("why", "pod", "live", "deleted"), CASES, ids=[c[0] for c in CASES])
def test_connect_pod_rules(why: str, pod: Any, live: set[str] | None, deleted: bool) -> None:
    plan = plan_clean([], [pod], [], me=ME, now=OLD, live_connect_sessions=live)
    names = [a.name for a in plan.actions]
    assert names == ([pod["metadata"]["name"]] if deleted else [])


def test_the_reason_says_when_it_stopped() -> None:
    beat = OLD - timedelta(minutes=1)
    plan = plan_clean([], [connect_pod("c1", ME, beat=beat)], [], me=ME, now=OLD)
    assert f"stopped heartbeating at {format_time(beat)}" in plan.describe()[0]


def test_heartbeat_patch_round_trips() -> None:
    annotations = heartbeat_patch(T0, interval=10.0)["metadata"]["annotations"]
    assert annotations == {
        HEARTBEAT_ANNOTATION: "2026-11-25T19:30:00Z",
        HEARTBEAT_TTL_ANNOTATION: "30",
    }
    assert heartbeat_state(annotations, T0 + timedelta(seconds=30)) == HeartbeatState.ALIVE
    assert heartbeat_state(annotations, T0 + timedelta(seconds=31)) == HeartbeatState.EXPIRED
    assert heartbeat_state({}, T0) == HeartbeatState.NONE
    assert heartbeat_state({HEARTBEAT_ANNOTATION: "yesterday"}, T0) == HeartbeatState.MALFORMED
    bad_ttl = {HEARTBEAT_ANNOTATION: "2026-11-25T19:30:00Z", HEARTBEAT_TTL_ANNOTATION: "0"}
    assert heartbeat_state(bad_ttl, T0) == HeartbeatState.MALFORMED


class FakeCore:
    def __init__(self, fail: bool = False) -> None:
        self.patches: list[tuple[str, str, Any, str]] = []
        self.fail = fail

    def patch_namespaced_pod(
        self, name: str, namespace: str, body: Any, *, _content_type: str, _request_timeout: int
    ) -> None:
        if self.fail:
            raise RuntimeError("404 Not Found")
        self.patches.append((namespace, name, body, _content_type))


async def test_pod_heartbeat_beats_and_survives_a_missing_pod() -> None:
    core = FakeCore()
    heartbeat = PodHeartbeat(core, "default", "kvpn-shadow-c1", interval=0.01)
    await heartbeat.start()
    assert core.patches[0][:2] == ("default", "kvpn-shadow-c1")
    assert core.patches[0][3] == "application/merge-patch+json"
    assert HEARTBEAT_ANNOTATION in core.patches[0][2]["metadata"]["annotations"]
    core.fail = True  # the pod is being recreated: beats fail quietly
    while heartbeat.failures == 0:
        await asyncio.sleep(0.01)
    await heartbeat.stop()
    assert heartbeat.beats >= 1
