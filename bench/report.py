"""Pure rendering of benchmark results: the JSON shape, the table, the targets, RESULTS.md.

The JSON has exactly issue 8's keys under ``machine``, ``paths`` and ``kvpn`` (a number or
``null`` each); everything else (p99 of DNS lookups, errors, notes, the profile) goes under
one extra top-level key, ``details``, so consumers of the issue's shape are not disturbed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PATH_NAMES = ("kernel", "ssh_L", "sshuttle", "kvpn_direct", "kvpn_portforward")
PATH_METRICS = (
    "up_MBps",
    "down_MBps",
    "up8_MBps",
    "down8_MBps",
    "rtt_p50_us",
    "rtt_p99_us",
    "conn_per_s",
    "c1000_ok",
)
KVPN_METRICS = (
    "rss_idle_MB",
    "rss_1000_MB",
    "ready_s",
    "dns_cluster_cold_ms",
    "dns_cluster_cached_ms",
    "dns_external_ms",
    "dns_external_direct_ms",
)
METRIC_LABELS = {
    "up_MBps": "upload MB/s, 1 stream",
    "down_MBps": "download MB/s, 1 stream",
    "up8_MBps": "upload MB/s, 8 streams",
    "down8_MBps": "download MB/s, 8 streams",
    "rtt_p50_us": "64 B round trip p50 µs",
    "rtt_p99_us": "64 B round trip p99 µs",
    "conn_per_s": "connect + 1 request + close /s",
    "c1000_ok": "1000 concurrent: succeeded",
    "c1000_s": "1000 concurrent: seconds",
    "rss_idle_MB": "kvpn RSS idle MB",
    "rss_1000_MB": "kvpn RSS, 1000 connections open, MB",
    "ready_s": "kvpn connect to `connected` s",
    "dns_cluster_cold_ms": "DNS cluster name, uncached, ms",
    "dns_cluster_cached_ms": "DNS cluster name, cached, ms",
    "dns_external_ms": "DNS external name via kvpn, ms",
    "dns_external_direct_ms": "DNS external name, upstream directly, ms",
}
CONCURRENT_CONNECTIONS = 1000
RSS_TARGET_MB = 200.0
MISSING = "n/a"

Number = float | int | None


def empty_path() -> dict[str, Number]:
    return {key: None for key in PATH_METRICS}


def empty_kvpn() -> dict[str, Number]:
    return {key: None for key in KVPN_METRICS}


def _number(value: object) -> Number:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def build_result(
    machine: Mapping[str, Any],
    paths: Mapping[str, Mapping[str, object]],
    kvpn: Mapping[str, object],
    details: Mapping[str, Any],
) -> dict[str, Any]:
    """The JSON document: every path and metric present (``None`` when not measured)."""
    out_paths: dict[str, dict[str, Number]] = {}
    for name in PATH_NAMES:
        measured = paths.get(name, {})
        out_paths[name] = {key: _number(measured.get(key)) for key in PATH_METRICS}
    return {
        "machine": dict(machine),
        "paths": out_paths,
        "kvpn": {key: _number(kvpn.get(key)) for key in KVPN_METRICS},
        "details": dict(details),
    }


def shape_problems(result: Mapping[str, Any]) -> list[str]:
    """What differs from issue 8's JSON shape (empty if nothing)."""
    problems: list[str] = []
    for key in ("machine", "paths", "kvpn"):
        if not isinstance(result.get(key), dict):
            problems.append(f"{key} is missing or not an object")
    paths = result.get("paths")
    if isinstance(paths, dict):
        if sorted(paths) != sorted(PATH_NAMES):
            problems.append(f"paths are {sorted(paths)}, expected {sorted(PATH_NAMES)}")
        for name, metrics in paths.items():
            if not isinstance(metrics, dict) or sorted(metrics) != sorted(PATH_METRICS):
                problems.append(f"paths.{name} does not have exactly {list(PATH_METRICS)}")
                continue
            for key, value in metrics.items():
                if value is not None and _number(value) is None:
                    problems.append(f"paths.{name}.{key} is not a number or null")
    kvpn = result.get("kvpn")
    if isinstance(kvpn, dict):
        if sorted(kvpn) != sorted(KVPN_METRICS):
            problems.append(f"kvpn does not have exactly {list(KVPN_METRICS)}")
        for key, value in kvpn.items():
            if value is not None and _number(value) is None:
                problems.append(f"kvpn.{key} is not a number or null")
    return problems


# -- formatting ------------------------------------------------------------------------------


def format_number(value: object) -> str:
    """Compact, fixed rules: 3 significant digits below 100, whole numbers above."""
    number = _number(value)
    if number is None:
        return MISSING
    if isinstance(number, int):
        return str(number)
    if abs(number) >= 100:
        return f"{number:.0f}"
    if abs(number) >= 10:
        return f"{number:.1f}"
    if abs(number) >= 1:
        return f"{number:.2f}"
    return f"{number:.3f}"


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join("-" * (w + 1) + ":" if i else ":" + "-" * (w + 1) for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def render_paths_table(result: Mapping[str, Any]) -> str:
    paths = result["paths"]
    extra = result.get("details", {}).get("paths", {})
    rows = [
        [METRIC_LABELS[key], *(format_number(paths[name][key]) for name in PATH_NAMES)]
        for key in PATH_METRICS
    ]
    rows.append(
        [
            METRIC_LABELS["c1000_s"],
            *(format_number(extra.get(name, {}).get("c1000_s")) for name in PATH_NAMES),
        ]
    )
    return _markdown_table(["metric", *PATH_NAMES], rows)


def render_kvpn_table(result: Mapping[str, Any]) -> str:
    kvpn = result["kvpn"]
    p99 = result.get("details", {}).get("kvpn", {})
    rows = []
    for key in KVPN_METRICS:
        if key.startswith("dns_"):
            p99_key = key.removesuffix("_ms") + "_p99_ms"
            rows.append(
                [METRIC_LABELS[key], format_number(kvpn[key]), format_number(p99.get(p99_key))]
            )
        else:
            rows.append([METRIC_LABELS[key], format_number(kvpn[key]), ""])
    return _markdown_table(["kvpn (direct transport)", "value (p50)", "p99"], rows)


# -- targets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetCheck:
    """One of issue 8's targets for kvpn_direct, checked against the same run's numbers."""

    description: str
    measured: str
    met: bool | None  # None: could not be checked (a number is missing)

    def render(self) -> str:
        status = {True: "met", False: "MISSED", None: "not checked"}[self.met]
        return f"- {status}: {self.description} ({self.measured})"


def _ratio(a: Number, b: Number) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _ratio_check(
    description: str, kvpn: Number, other: Number, bound: float, *, at_least: bool
) -> TargetCheck:
    ratio = _ratio(kvpn, other)
    if ratio is None:
        return TargetCheck(description, "missing numbers", None)
    met = ratio >= bound if at_least else ratio <= bound
    return TargetCheck(description, f"{ratio:.2f}x", met)


def target_checks(result: Mapping[str, Any]) -> list[TargetCheck]:
    paths, kvpn = result["paths"], result["kvpn"]
    k, sshuttle, ssh = paths["kvpn_direct"], paths["sshuttle"], paths["ssh_L"]
    checks = []
    for key, way in (("up_MBps", "upload"), ("down_MBps", "download")):
        checks.append(
            _ratio_check(f"{way} >= 8x sshuttle", k[key], sshuttle[key], 8.0, at_least=True)
        )
        checks.append(_ratio_check(f"{way} >= 0.5x ssh -L", k[key], ssh[key], 0.5, at_least=True))
    checks.append(
        _ratio_check(
            "64 B round trip p50 <= 2x ssh -L", k["rtt_p50_us"], ssh["rtt_p50_us"], 2.0,
            at_least=False,
        )
    )  # fmt: skip
    ratio = _ratio(k["rtt_p50_us"], sshuttle["rtt_p50_us"])
    checks.append(
        TargetCheck(
            "64 B round trip p50 below sshuttle's",
            MISSING if ratio is None else f"{ratio:.2f}x",
            None if ratio is None else ratio < 1.0,
        )
    )
    external, direct = kvpn["dns_external_ms"], kvpn["dns_external_direct_ms"]
    checks.append(
        TargetCheck(
            "external names within 1 ms of asking the upstream directly (p50)",
            MISSING if external is None or direct is None else f"+{external - direct:.3f} ms",
            None if external is None or direct is None else external - direct <= 1.0,
        )
    )
    cached = kvpn["dns_cluster_cached_ms"]
    checks.append(
        TargetCheck(
            "cached cluster names under 1 ms (p50)",
            MISSING if cached is None else f"{cached:.3f} ms",
            None if cached is None else cached < 1.0,
        )
    )
    ok, rss = k["c1000_ok"], kvpn["rss_1000_MB"]
    checks.append(
        TargetCheck(
            f"{CONCURRENT_CONNECTIONS} concurrent connections all succeed",
            MISSING if ok is None else f"{ok}/{CONCURRENT_CONNECTIONS}",
            None if ok is None else ok == CONCURRENT_CONNECTIONS,
        )
    )
    checks.append(
        TargetCheck(
            f"kvpn RSS with {CONCURRENT_CONNECTIONS} connections under {RSS_TARGET_MB:.0f} MB",
            MISSING if rss is None else f"{rss:.1f} MB",
            None if rss is None else rss < RSS_TARGET_MB,
        )
    )
    return checks


# -- whole reports ---------------------------------------------------------------------------


def machine_line(machine: Mapping[str, Any]) -> str:
    parts = [
        f"{machine.get('cpu_model', MISSING)}",
        f"{machine.get('cores', MISSING)} cores",
        f"kernel {machine.get('kernel', MISSING)}",
        f"Python {machine.get('python', MISSING)}",
        f"asyncssh {machine.get('asyncssh', MISSING)}",
        f"cryptography {machine.get('cryptography', MISSING)}",
        f"OpenSSH {machine.get('openssh', MISSING)}",
        f"sshuttle {machine.get('sshuttle', MISSING)}",
        f"load average at start {machine.get('loadavg_start', MISSING)}",
    ]
    return ", ".join(parts)


def render_report(result: Mapping[str, Any]) -> str:
    """The table printed at the end of a run (also the body of a RESULTS.md entry)."""
    details = result.get("details", {})
    sections = [
        render_paths_table(result),
        render_kvpn_table(result),
        "Targets (kvpn_direct, ratios within this run):\n"
        + "\n".join(check.render() for check in target_checks(result)),
    ]
    notes = details.get("notes") or []
    if notes:
        sections.append("Notes:\n" + "\n".join(f"- {note}" for note in notes))
    return "\n\n".join(sections) + "\n"


RESULTS_HEADER = """\
# Benchmark results

Appended by `scripts/bench` (newest last). Every path is measured in the same run, between the
same laptop namespace and the same server pod of a sandbox cluster (`kvpn-sandbox up
--laptop-routes-pods`); the machine is shared, so compare numbers within one entry, not
across entries. Throughput is in MB/s (10^6 bytes/s).

- `kernel`: laptop -> server pod IP, routed by the node, no tunnel.
- `ssh_L`: OpenSSH `ssh -L` (aes128-gcm) to Debian's sshd in a pod, then to the ClusterIP.
- `sshuttle`: sshuttle (nat method, defaults) through the same sshd, to the ClusterIP.
- `kvpn_direct` / `kvpn_portforward`: `kvpn connect --transport direct|portforward`, to the
  ClusterIP (routed into kvpn's TUN).

The measuring clients (bench/measure.py) and the server (bench/server.py) are Python programs
(threads, 256 KiB buffers), so `kernel` is the ceiling of this harness, not of the machine.
Before measuring, each path proves with a request that the server sees the expected peer
(laptop, sshd pod or shadow pod), so no path can silently bypass its tunnel.
"""


def results_entry(result: Mapping[str, Any], *, command: str, when: str) -> str:
    details = result.get("details", {})
    profile = details.get("profile", "?")
    duration = format_number(details.get("duration_s"))
    return (
        f"\n## {when} ({profile}, {duration} s)\n\n"
        f"Command: `{command}`\n\n"
        f"Machine: {machine_line(result['machine'])}\n\n"
        f"{render_report(result)}"
    )
