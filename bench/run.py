"""``scripts/bench``: measure every path in one run, print a table, record the results.

Theory of operation
-------------------
1. Start the lab (bench/lab.py: a sandbox cluster with ``--laptop-routes-pods``, a server pod
   behind a Service, an sshd pod).
2. For each path (bench/paths.py) in a fixed order - kernel, ssh_L, sshuttle, kvpn_direct,
   kvpn_portforward - enter it (start its tunnel), prove with a ``whoami`` request that the
   server sees the expected peer, then run the measuring clients (bench/measure.py, each a
   small program in the laptop namespace): bulk up/down with 1 and 8 streams, 64-byte round
   trips, connections per second, 1000 concurrent connections. For kvpn also the RSS idle and
   with 1000 connections open, the time to ``connected`` and (direct transport) DNS lookups.
   Then leave it (SIGINT, as Ctrl-C).
3. Always - also on a failure, Ctrl-C or SIGTERM - stop the lab: the sandbox and everything
   in its namespaces go.
4. Print the table (bench/report.py), write the JSON if ``--output``, append to
   bench/RESULTS.md.

Every measurement is bounded in count and in time; a path or metric that fails is recorded
as ``null`` with a note, and the run goes on. The profile's ``budget_s`` is a hard stop for
starting new measurements, so ``--quick`` stays under 3 minutes and a full run under 20.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from bench import report
from bench.lab import Lab, LabError
from bench.machine import loadavg, machine_facts
from bench.paths import PATHS, PathError, PathTarget
from bench.processes import Background, measure_argv, parse_measure_output, rss_mb, run_measure
from bench.profile import Profiler, start_profiler
from bench.stats import median, megabytes_per_second, percentile, rate, rounded
from sandbox.config import OUTSIDE_DNS_ADDRESS
from sandbox.lifecycle import SandboxError

RESULTS_FILE = Path(__file__).resolve().parent / "RESULTS.md"
RESOLVER_RE = re.compile(r"resolver (?P<host>\d+\.\d+\.\d+\.\d+):(?P<port>\d+)")
SETTLE_S = 1.0


@dataclass(frozen=True)
class Profile:
    name: str
    bulk_seconds: float
    repeats: int  # bulk runs per metric; the median is kept
    rtt_count: int
    rtt_seconds: float
    conn_seconds: float
    conn_count: int
    conc_count: int
    conc_timeout_s: float
    dns_count: int
    dns_seconds: float
    budget_s: float  # no new measurement starts after this


QUICK = Profile("quick", 1.0, 1, 1000, 5.0, 1.0, 2000, 1000, 15.0, 40, 8.0, 150.0)
FULL = Profile("full", 3.0, 3, 10000, 20.0, 3.0, 20000, 1000, 40.0, 200, 30.0, 1080.0)

BULK = (  # (metric, measure kind, streams)
    ("up_MBps", "up", 1),
    ("down_MBps", "down", 1),
    ("up8_MBps", "up", 8),
    ("down8_MBps", "down", 8),
)


@dataclass
class Run:
    """What one run collects (mutable while measuring, turned into JSON at the end)."""

    profile: Profile
    started: float = field(default_factory=time.monotonic)
    paths: dict[str, dict[str, object]] = field(default_factory=dict)
    path_details: dict[str, dict[str, object]] = field(default_factory=dict)
    kvpn: dict[str, object] = field(default_factory=dict)
    kvpn_details: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    py_spy_dir: Path | None = None  # profile the kvpn process into this folder

    def out_of_time(self) -> bool:
        return time.monotonic() - self.started > self.profile.budget_s

    def note(self, text: str) -> None:
        log(f"note: {text}")
        self.notes.append(text)


def log(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


# -- one path --------------------------------------------------------------------------------


def _measure(run: Run, lab: Lab, target: PathTarget, kind: str, **options: Any) -> dict[str, Any]:
    if run.out_of_time():
        return {"ok": False, "error": f"skipped: the {run.profile.name} time budget is spent"}
    bound = float(options.get("seconds", run.profile.bulk_seconds))
    result = run_measure(lab.addresses.laptop_netns, kind, target.host, target.port,
                         bound_s=bound, **options)  # fmt: skip
    if not result.get("ok"):
        label = f"{kind} x{options['streams']}" if "streams" in options else kind
        run.note(f"{target.name} {label}: {result.get('error') or result.get('errors')}")
    return result


def _bulk(run: Run, lab: Lab, target: PathTarget) -> dict[str, object]:
    metrics: dict[str, object] = {}
    for key, kind, streams in BULK:
        values = []
        for _ in range(run.profile.repeats):
            result = _measure(run, lab, target, kind, streams=streams,
                              seconds=run.profile.bulk_seconds)  # fmt: skip
            if result.get("ok"):
                values.append(megabytes_per_second(int(result["bytes"]), float(result["seconds"])))
        measured = [v for v in values if v is not None]
        metrics[key] = rounded(median(measured))
        log(f"{target.name}: {key} = {metrics[key]} (runs: {[round(v) for v in measured]})")
    return metrics


def _latency_and_connections(run: Run, lab: Lab, target: PathTarget) -> dict[str, object]:
    p = run.profile
    metrics: dict[str, object] = {}
    rtt = _measure(run, lab, target, "rtt", count=p.rtt_count, seconds=p.rtt_seconds)
    samples = [float(s) for s in rtt.get("samples_us", [])]
    metrics["rtt_p50_us"] = rounded(percentile(samples, 50), 0)
    metrics["rtt_p99_us"] = rounded(percentile(samples, 99), 0)
    conn = _measure(run, lab, target, "connrate", count=p.conn_count, seconds=p.conn_seconds)
    if conn.get("ok"):
        metrics["conn_per_s"] = rounded(rate(int(conn["connections"]), float(conn["seconds"])), 0)
    log(f"{target.name}: rtt p50/p99 {metrics['rtt_p50_us']}/{metrics['rtt_p99_us']} µs "
        f"({len(samples)} samples), {metrics.get('conn_per_s')} connections/s")  # fmt: skip
    return metrics


def _concurrent(run: Run, lab: Lab, target: PathTarget) -> tuple[dict[str, Any], float | None]:
    """1000 concurrent connections; for kvpn, held open while its RSS is read."""
    p = run.profile
    if run.out_of_time():
        return {"ok": False, "error": "skipped: time budget spent"}, None
    options: dict[str, object] = {"count": p.conc_count, "seconds": p.conc_timeout_s}
    if target.process is None or not target.name.startswith("kvpn"):
        return _measure(run, lab, target, "conc", **options), None
    argv = measure_argv(lab.addresses.laptop_netns, "conc", target.host, target.port,
                        hold=True, hold_max=60, **options)  # fmt: skip
    holder = Background(argv, stdin_pipe=True)
    try:
        line = holder.wait_for(lambda text: text.startswith("{"), 2 * p.conc_timeout_s + 30)
        result = parse_measure_output(line or "", holder.output())
        rss = rss_mb(target.process.pid) if line else None
        holder.write_line("release")
        with contextlib.suppress(subprocess.TimeoutExpired):
            holder.proc.wait(60)
    finally:
        holder.stop(10)
    if not result.get("ok"):
        run.note(f"{target.name} conc: {result.get('error') or result.get('errors')}")
    return result, rss


def _dns(run: Run, lab: Lab, target: PathTarget, connected_line: str) -> None:
    p = run.profile
    match = RESOLVER_RE.search(connected_line)
    if match is None:
        run.note(f"DNS not measured: the connected line names no resolver ({connected_line!r})")
        return
    host, port = match["host"], int(match["port"])
    tag = f"{int(time.time()) % 100000}"
    lookups = {  # key: (server, port, name template)
        "dns_cluster_cold": (host, port, "10-99-{i}-7.default.pod.cluster.local"),
        "dns_cluster_cached": (host, port, "bench-server.default.svc.cluster.local"),
        "dns_external": (host, port, f"k{tag}-{{i}}.example.test"),
        "dns_external_direct": (str(OUTSIDE_DNS_ADDRESS), 53, f"d{tag}-{{i}}.example.test"),
    }
    for key, (server, server_port, name) in lookups.items():
        if run.out_of_time():
            break
        result = run_measure(
            lab.addresses.laptop_netns, "dns", server, server_port, bound_s=p.dns_seconds,
            count=min(p.dns_count, 250), seconds=p.dns_seconds, name=name,
        )  # fmt: skip
        samples = [float(s) for s in result.get("samples_ms", [])]
        if not result.get("ok"):
            run.note(f"{key}: {result.get('failures', 0)} lookups failed {result.get('error', '')}")
        run.kvpn[f"{key}_ms"] = rounded(percentile(samples, 50), 3)
        run.kvpn_details[f"{key}_p99_ms"] = rounded(percentile(samples, 99), 3)
        log(f"{key}: p50 {run.kvpn[f'{key}_ms']} ms, p99 {run.kvpn_details[f'{key}_p99_ms']} ms")


def _start_profiler(run: Run, target: PathTarget) -> Profiler | None:
    if run.py_spy_dir is None or target.process is None or not target.name.startswith("kvpn"):
        return None
    profiler = start_profiler(target.process.pid, run.py_spy_dir / f"{target.name}.txt")
    if profiler is None:
        run.note("--py-spy: py-spy is not installed (.venv/bin/pip install py-spy)")
    return profiler


def _stop_profiler(
    run: Run, target: PathTarget, profiler: Profiler, details: dict[str, object]
) -> None:
    try:
        top = profiler.stop()
    except OSError as exc:
        run.note(f"{target.name}: no py-spy profile ({exc}): {profiler.program.output(3)!r}")
        return
    details["profile_top"] = [share.render() for share in top]
    log(f"{target.name}: py-spy profile of bulk + latency ({profiler.output}):")
    for share in top:
        log(f"  {share.render()}")


def measure_path(run: Run, lab: Lab, name: str) -> None:
    log(f"== {name}")
    metrics: dict[str, object] = {}
    details: dict[str, object] = {}
    run.paths[name], run.path_details[name] = metrics, details
    is_kvpn = name.startswith("kvpn")
    try:
        with PATHS[name](lab) as target:
            details["target"] = f"{target.host}:{target.port}"
            who = run_measure(lab.addresses.laptop_netns, "whoami", target.host, target.port,
                              bound_s=10)  # fmt: skip
            peer = who.get("peer")
            details["server_sees"] = peer
            if not who.get("ok"):
                run.note(f"{name}: the server cannot be reached: {who.get('error')}")
                return
            if target.expected_peer is not None and peer != target.expected_peer:
                run.note(
                    f"{name}: the server sees {peer}, not {target.expected_peer}; not measured"
                )
                return
            if peer == lab.addresses.laptop_address and name != "kernel":
                run.note(f"{name}: the connection bypassed the tunnel; not measured")
                return
            connected_line = ""
            if is_kvpn and target.process is not None:
                details["ready_s"] = rounded(target.ready_s, 2)
                connected_line = next(
                    (line for line in target.process.lines if line.startswith("connected")), ""
                )
                time.sleep(SETTLE_S)
                details["rss_idle_MB"] = rounded(rss_mb(target.process.pid))
                if name == "kvpn_direct":
                    _dns(run, lab, target, connected_line)
            profiler = _start_profiler(run, target)
            try:
                metrics.update(_bulk(run, lab, target))
                metrics.update(_latency_and_connections(run, lab, target))
            finally:
                if profiler is not None:
                    _stop_profiler(run, target, profiler, details)
            conc, rss = _concurrent(run, lab, target)
            metrics["c1000_ok"] = conc.get("succeeded")
            details["c1000_s"] = rounded(conc.get("seconds"), 2)
            if rss is not None:
                details["rss_1000_MB"] = rounded(rss)
            log(f"{name}: 1000 concurrent: {conc.get('succeeded')} ok in {details['c1000_s']} s"
                + (f", kvpn RSS {details.get('rss_idle_MB')} -> {details.get('rss_1000_MB')} MB"
                   if is_kvpn else ""))  # fmt: skip
        program = target.process
        code = None if program is None else program.proc.returncode
        if is_kvpn and program is not None and code not in (0, None):  # ssh: 255 on SIGINT
            run.note(f"{name}: exited with {code} when stopped: {program.output(3)!r}")
    except PathError as exc:
        run.note(f"{name}: not measured: {exc}")


# -- the run ---------------------------------------------------------------------------------


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while cleaning up, so clean-up is never cut short."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def collect(run: Run, lab: Lab, names: list[str]) -> None:
    for name in names:
        if run.out_of_time():
            run.note(f"{name}: not measured: the {run.profile.name} time budget is spent")
            continue
        measure_path(run, lab, name)
    direct = run.path_details.get("kvpn_direct", {})
    forward = run.path_details.get("kvpn_portforward", {})
    run.kvpn["rss_idle_MB"] = direct.get("rss_idle_MB")
    run.kvpn["rss_1000_MB"] = direct.get("rss_1000_MB")
    run.kvpn["ready_s"] = direct.get("ready_s")
    for key in ("rss_idle_MB", "rss_1000_MB", "ready_s"):
        run.kvpn_details[f"portforward_{key}"] = forward.get(key)


def result_document(run: Run, machine: dict[str, object], command: str) -> dict[str, Any]:
    return report.build_result(
        machine,
        run.paths,
        run.kvpn,
        {
            "profile": run.profile.name,
            "command": command,
            "duration_s": round(time.monotonic() - run.started, 1),
            "loadavg_end": loadavg(),
            "paths": run.path_details,
            "kvpn": run.kvpn_details,
            "notes": run.notes,
        },
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench", description="kvpn side by side with the kernel, ssh -L and sshuttle."
    )
    parser.add_argument("--quick", action="store_true", help="short runs (under 3 minutes)")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--paths", default=",".join(report.PATH_NAMES),
        help="comma-separated subset of paths to measure (default: all)",
    )  # fmt: skip
    parser.add_argument("--results", type=Path, default=RESULTS_FILE,
                        help="markdown file to append to (default: bench/RESULTS.md)")  # fmt: skip
    parser.add_argument("--no-results", action="store_true", help="do not append to --results")
    parser.add_argument(
        "--py-spy", type=Path, metavar="DIR",
        help="profile kvpn with py-spy during its bulk and latency runs; raw stacks go to DIR",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n for n in args.paths.split(",") if n]
    unknown = [n for n in names if n not in PATHS]
    if unknown:
        print(
            f"bench: unknown path(s) {', '.join(unknown)}; known: {', '.join(PATHS)}",
            file=sys.stderr,
        )
        return 2
    command = "scripts/bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    run = Run(QUICK if args.quick else FULL, py_spy_dir=args.py_spy)
    if args.py_spy is not None:
        run.note(
            "kvpn was profiled with py-spy (--nonblocking) in this run: its numbers include that"
        )
    signal.signal(signal.SIGTERM, _raise_interrupt)
    machine = machine_facts()
    lab = Lab()
    interrupted = False
    try:
        log(f"starting lab (sandbox {lab.config.name})")
        lab.start()
        log(f"lab ready: {lab.addresses}")
        collect(run, lab, names)
    except KeyboardInterrupt:
        interrupted = True
        run.note("interrupted")
    except (LabError, SandboxError) as exc:
        run.note(f"lab failed: {exc}")
    finally:
        with _signals_deferred():
            log(f"removing lab (sandbox {lab.config.name})")
            lab.stop()
    result = result_document(run, machine, command)
    text = report.render_report(result)
    print(text)
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {args.output}")
    if not args.no_results and not interrupted:
        header = "" if args.results.exists() else report.RESULTS_HEADER
        when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        with args.results.open("a") as f:
            f.write(header + report.results_entry(result, command=command, when=when))
        log(f"appended to {args.results}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
