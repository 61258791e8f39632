"""bench.report: issue 8's JSON shape, number formatting, the tables, the target checks."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bench import report

MACHINE = {"cpu_model": "Test CPU", "cores": 2, "kernel": "6.1", "python": "3.11.7"}
# The research notes' numbers (dataplane.md) as a partly measured run.
PATHS: dict[str, dict[str, object]] = {
    "kernel": {
        "up_MBps": 2433.0, "down_MBps": 4539.0, "up8_MBps": 3000.0, "down8_MBps": 4000.0,
        "rtt_p50_us": 131.0, "rtt_p99_us": 200.0, "conn_per_s": 4100.0, "c1000_ok": 1000,
    },
    "ssh_L": {"up_MBps": 758.0, "down_MBps": 720.0, "rtt_p50_us": 190.0},
    "sshuttle": {"up_MBps": 41.0, "down_MBps": 44.0, "rtt_p50_us": 591.0},
    "kvpn_direct": {"up_MBps": 364.0, "down_MBps": 411.0, "rtt_p50_us": 389.0, "c1000_ok": 1000},
}  # fmt: skip
KVPN = {
    "rss_1000_MB": 150.5,
    "dns_external_ms": 1.2,
    "dns_external_direct_ms": 0.3,
    "dns_cluster_cached_ms": 0.25,
}
DETAILS = {
    "paths": {"kernel": {"c1000_s": 0.7}},
    "kvpn": {"dns_external_p99_ms": 2.5},
    "notes": ["a note"],
    "profile": "quick",
    "duration_s": 90.04,
}


@pytest.fixture
def result() -> dict[str, Any]:
    return report.build_result(MACHINE, PATHS, KVPN, DETAILS)


# -- shape -----------------------------------------------------------------------------------


def test_build_result_has_exactly_the_issues_shape(result: dict[str, Any]) -> None:
    assert report.shape_problems(result) == []
    assert list(result) == ["machine", "paths", "kvpn", "details"]
    assert list(result["paths"]) == list(report.PATH_NAMES)
    for metrics in result["paths"].values():
        assert list(metrics) == list(report.PATH_METRICS)
    assert list(result["kvpn"]) == list(report.KVPN_METRICS)
    assert result["paths"]["kvpn_portforward"] == report.empty_path()  # not measured: nulls
    assert result["paths"]["ssh_L"]["up8_MBps"] is None
    assert result["kvpn"]["rss_idle_MB"] is None
    # It survives JSON unchanged (no NaN, no non-JSON types).
    assert json.loads(json.dumps(result, allow_nan=False)) == result


def test_build_result_drops_non_numbers() -> None:
    built = report.build_result(
        {}, {"kernel": {"up_MBps": "fast", "c1000_ok": True, "extra": 1}}, {"ready_s": [1]}, {}
    )
    assert built["paths"]["kernel"]["up_MBps"] is None
    assert built["paths"]["kernel"]["c1000_ok"] is None  # a bool is not a count
    assert "extra" not in built["paths"]["kernel"]
    assert built["kvpn"]["ready_s"] is None


SHAPE_BREAKS = [
    (lambda r: r.pop("kvpn"), "kvpn is missing"),
    (lambda r: r["paths"].pop("sshuttle"), "paths are"),
    (lambda r: r["paths"]["kernel"].pop("c1000_ok"), "paths.kernel does not have exactly"),
    (lambda r: r["paths"]["kernel"].update(c1000_s=1.0), "paths.kernel does not have exactly"),
    (lambda r: r["paths"]["kernel"].update(up_MBps="1"), "paths.kernel.up_MBps is not a number"),
    (lambda r: r["kvpn"].update(dns_ms=1.0), "kvpn does not have exactly"),
    (lambda r: r["kvpn"].update(ready_s="2"), "kvpn.ready_s is not a number"),
]


@pytest.mark.parametrize(("breaks", "problem"), SHAPE_BREAKS)
def test_shape_problems_are_named(result: dict[str, Any], breaks: Any, problem: str) -> None:
    breaks(result)
    problems = report.shape_problems(result)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


# -- formatting ------------------------------------------------------------------------------

FORMAT_CASES = [
    (None, "n/a"),
    (True, "n/a"),
    (1000, "1000"),
    (2433.4, "2433"),
    (150.5, "150"),  # banker's rounding of .5 by format(), stable across platforms
    (41.0, "41.0"),
    (1.2, "1.20"),
    (0.25, "0.250"),
    (0.0004, "0.000"),
]


@pytest.mark.parametrize(("value", "text"), FORMAT_CASES)
def test_format_number(value: object, text: str) -> None:
    assert report.format_number(value) == text


PATHS_TABLE = """\
| metric                         | kernel | ssh_L | sshuttle | kvpn_direct | kvpn_portforward |
|:-------------------------------|-------:|------:|---------:|------------:|-----------------:|
| upload MB/s, 1 stream          |   2433 |   758 |     41.0 |         364 |              n/a |
| download MB/s, 1 stream        |   4539 |   720 |     44.0 |         411 |              n/a |
| upload MB/s, 8 streams         |   3000 |   n/a |      n/a |         n/a |              n/a |
| download MB/s, 8 streams       |   4000 |   n/a |      n/a |         n/a |              n/a |
| 64 B round trip p50 µs         |    131 |   190 |      591 |         389 |              n/a |
| 64 B round trip p99 µs         |    200 |   n/a |      n/a |         n/a |              n/a |
| connect + 1 request + close /s |   4100 |   n/a |      n/a |         n/a |              n/a |
| 1000 concurrent: succeeded     |   1000 |   n/a |      n/a |        1000 |              n/a |
| 1000 concurrent: seconds       |  0.700 |   n/a |      n/a |         n/a |              n/a |"""

KVPN_TABLE = """\
| kvpn (direct transport)                  | value (p50) |  p99 |
|:-----------------------------------------|------------:|-----:|
| kvpn RSS idle MB                         |         n/a |      |
| kvpn RSS, 1000 connections open, MB      |         150 |      |
| kvpn connect to `connected` s            |         n/a |      |
| DNS cluster name, uncached, ms           |         n/a |  n/a |
| DNS cluster name, cached, ms             |       0.250 |  n/a |
| DNS external name via kvpn, ms           |        1.20 | 2.50 |
| DNS external name, upstream directly, ms |       0.300 |  n/a |"""


def test_tables_side_by_side(result: dict[str, Any]) -> None:
    assert report.render_paths_table(result) == PATHS_TABLE
    assert report.render_kvpn_table(result) == KVPN_TABLE


def test_targets_are_checked_from_the_same_run(result: dict[str, Any]) -> None:
    lines = [check.render() for check in report.target_checks(result)]
    assert lines == [
        "- met: upload >= 8x sshuttle (8.88x)",
        "- MISSED: upload >= 0.5x ssh -L (0.48x)",
        "- met: download >= 8x sshuttle (9.34x)",
        "- met: download >= 0.5x ssh -L (0.57x)",
        "- MISSED: 64 B round trip p50 <= 2x ssh -L (2.05x)",
        "- met: 64 B round trip p50 below sshuttle's (0.66x)",
        "- met: external names within 1 ms of asking the upstream directly (p50) (+0.900 ms)",
        "- met: cached cluster names under 1 ms (p50) (0.250 ms)",
        "- met: 1000 concurrent connections all succeed (1000/1000)",
        "- met: kvpn RSS with 1000 connections under 200 MB (150.5 MB)",
    ]


def test_targets_without_numbers_are_not_checked() -> None:
    empty = report.build_result({}, {}, {}, {})
    checks = report.target_checks(empty)
    assert len(checks) == 10
    assert all(check.met is None for check in checks)
    assert checks[0].render() == "- not checked: upload >= 8x sshuttle (missing numbers)"


def test_report_and_results_entry(result: dict[str, Any]) -> None:
    text = report.render_report(result)
    assert text.startswith(PATHS_TABLE + "\n\n" + KVPN_TABLE + "\n\nTargets (kvpn_direct")
    assert text.endswith("\n\nNotes:\n- a note\n")
    entry = report.results_entry(
        result, command="scripts/bench --quick", when="2026-01-01 00:00 UTC"
    )
    assert entry.startswith(
        "\n## 2026-01-01 00:00 UTC (quick, 90.0 s)\n\nCommand: `scripts/bench --quick`\n\n"
        "Machine: Test CPU, 2 cores, kernel 6.1, Python 3.11.7, asyncssh n/a, "
    )
    assert entry.endswith(text)
