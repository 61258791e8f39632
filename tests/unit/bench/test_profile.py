"""bench.profile: py-spy ``raw`` stacks -> where kvpn's CPU time went."""

from __future__ import annotations

from bench.profile import REPO, top_functions

RAW = f"""\
<module> (kvpn:8);run (asyncio/runners.py:118);_run_once (asyncio/base_events.py:1922);\
_read_ready ({REPO}/.venv/lib/python3.11/site-packages/asyncssh/connection.py:1140) 60
<module> (kvpn:8);run (asyncio/runners.py:118);_run_once (asyncio/base_events.py:1922);\
_read_ready ({REPO}/.venv/lib/python3.11/site-packages/asyncssh/connection.py:1152) 20
<module> (kvpn:8);run (asyncio/runners.py:118);_run_once (asyncio/base_events.py:1930) 15
<module> (kvpn:8);handle_packet ({REPO}/kvpn/dataplane.py:77) 5
this line is not a stack
; 3
"""


def test_top_functions_merge_lines_and_strip_paths() -> None:
    top = top_functions(RAW, count=3)
    assert [(s.function, round(s.self_percent), round(s.total_percent)) for s in top] == [
        ("_read_ready (asyncssh/connection.py)", 80, 80),
        ("_run_once (asyncio/base_events.py)", 15, 95),
        ("handle_packet (kvpn/dataplane.py)", 5, 5),
    ]
    assert top[0].render() == " 80.0% self  80.0% total  _read_ready (asyncssh/connection.py)"


def test_no_samples_no_functions() -> None:
    assert top_functions("") == []
    assert top_functions("garbage\n") == []
