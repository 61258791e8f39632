"""The lock annotation: encoding, verdicts, expiry, and its JSON patch operations."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonpatch
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvpn.cluster.locks import (
    LOCK_ANNOTATION,
    Identity,
    Lock,
    LockVerdict,
    acquire_ops,
    format_time,
    judge_lock,
    read_lock,
    refresh_ops,
    release_ops,
)

T0 = datetime(2026, 11, 25, 19, 30, 0, tzinfo=UTC)
ME = Identity("alice", "laptop")
BOB = Identity("bob", "desk")


def lock_of(who: Identity, *, at: datetime = T0, session: str = "s1", hb: float = 10) -> Lock:
    return Lock.new(
        "exchange", mode="selector", identity=who, session=session, now=at, heartbeat_seconds=hb
    )


names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)


@given(
    names,
    names,
    names,
    st.integers(1, 10_000),
    st.datetimes(datetime(2000, 1, 1), datetime(2200, 1, 1), timezones=st.just(UTC)),
)
def test_lock_round_trips_through_its_annotation(
    user: str, host: str, session: str, hb: int, when: datetime
) -> None:
    lock = Lock.new(
        "exchange",
        mode="scale",
        identity=Identity(user, host),
        session=session,
        now=when,
        heartbeat_seconds=hb,
    )
    assert Lock.from_json(lock.to_json()) == lock


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        '{"kind": "exchange"}',
        lock_of(ME).to_json().replace('"ttl":30', '"ttl":0'),
        lock_of(ME).to_json().replace('"ttl":30', '"ttl":true'),
        lock_of(ME).to_json().replace('"ttl":30', '"ttl":"30"'),
        lock_of(ME).to_json().replace(format_time(T0), "yesterday"),
        lock_of(ME).to_json().replace('"user":"alice"', '"user":7'),
    ],
)
def test_malformed_locks_are_not_trusted(text: str) -> None:
    assert Lock.from_json(text) is None
    assert judge_lock(text, None, me=ME, now=T0) == LockVerdict.MALFORMED


def test_ttl_is_three_heartbeats() -> None:
    assert lock_of(ME, hb=10).ttl == 30
    assert lock_of(ME, hb=1).ttl == 3


@pytest.mark.parametrize(
    ("holder", "age", "session", "verdict"),
    [
        (None, 0, "", LockVerdict.FREE),
        (ME, 0, "s1", LockVerdict.OURS_LIVE),
        (ME, 0, "other", LockVerdict.MINE_LIVE),
        (ME, 30, "", LockVerdict.MINE_LIVE),  # exactly at the TTL: still alive
        (ME, 31, "", LockVerdict.MINE_EXPIRED),
        (BOB, 5, "", LockVerdict.OTHERS_LIVE),
        (BOB, 31, "", LockVerdict.OTHERS_EXPIRED),
        (Identity("alice", "other-host"), 31, "", LockVerdict.MINE_EXPIRED),  # same user
    ],
)
def test_verdicts(holder: Identity | None, age: int, session: str, verdict: LockVerdict) -> None:
    lock = lock_of(holder) if holder else None
    raw = lock.to_json() if lock else None
    now = T0 + timedelta(seconds=age)
    assert judge_lock(raw, lock, me=ME, now=now, session=session) == verdict


def test_refreshed_lock_lives_longer() -> None:
    lock = lock_of(ME)
    later = T0 + timedelta(seconds=25)
    assert lock.refreshed(later).expired(T0 + timedelta(seconds=40)) is False
    assert lock.expired(T0 + timedelta(seconds=40)) is True
    assert "last heartbeat 40s ago, expired" in lock.describe(T0 + timedelta(seconds=40))


def service(annotations: dict[str, str] | None, rv: str = "7") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "echo", "resourceVersion": rv}
    if annotations is not None:
        meta["annotations"] = annotations
    return {"metadata": meta, "spec": {"selector": {"app": "echo"}}}


@pytest.mark.parametrize("annotations", [None, {}, {"other": "x"}])
def test_acquire_adds_the_lock_and_keeps_other_annotations(
    annotations: dict[str, str] | None,
) -> None:
    doc = service(annotations)
    lock = lock_of(ME)
    result = jsonpatch.apply_patch(doc, acquire_ops(annotations, "7", lock))
    assert read_lock(result["metadata"]["annotations"]) == (lock.to_json(), lock)
    assert {k: v for k, v in result["metadata"]["annotations"].items() if k != LOCK_ANNOTATION} == (
        annotations or {}
    )


def test_acquire_fails_when_the_service_changed() -> None:
    doc = service({}, rv="8")  # someone wrote in between
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        jsonpatch.apply_patch(doc, acquire_ops({}, "7", lock_of(ME)))


def test_refresh_and_release_only_touch_our_own_lock() -> None:
    ours = lock_of(ME)
    doc = service({LOCK_ANNOTATION: ours.to_json()})
    newer = ours.refreshed(T0 + timedelta(seconds=10))
    refreshed = jsonpatch.apply_patch(doc, refresh_ops(ours, newer))
    assert refreshed["metadata"]["annotations"][LOCK_ANNOTATION] == newer.to_json()
    released = jsonpatch.apply_patch(refreshed, release_ops(newer))
    assert released["metadata"]["annotations"] == {}
    taken = copy.deepcopy(doc)
    taken["metadata"]["annotations"][LOCK_ANNOTATION] = lock_of(BOB).to_json()
    for ops in (refresh_ops(ours, newer), release_ops(ours)):
        with pytest.raises(jsonpatch.JsonPatchTestFailed):
            jsonpatch.apply_patch(taken, ops)
