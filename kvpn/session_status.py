"""What ``kvpn status`` shows: each session's status file, judged, and rendered.

A running ``kvpn connect`` rewrites ``<state>/sessions/<id>.status.json`` (beside its session
file ``<id>.json``; mode 0600, directory 0700, replaced atomically) every ~2 s and on every
state change (:func:`write_status`). ``kvpn status`` reads every session file and its status
file and decides what to say (:func:`judge`) so that it never says "connected" while traffic
cannot pass:

* the session's process is gone (pid not running, or a different process with that pid):
  ``dead (run kvpn clean)``;
* the status file is missing, unreadable, or older than :data:`STALE_AFTER` seconds (the
  process is stopped, hung, or the laptop just woke up): ``unresponsive``;
* otherwise the state the session wrote: ``connected`` (tunnel up, keepalives answered),
  ``degraded`` (tunnel up, something missing or slow: the reason says what),
  ``reconnecting`` (since when, last error).

``kvpn exchange``, ``preview`` and ``mesh`` write the same two files (``kind`` says which;
``service``, ``mode``, ``mark`` and ``ports`` say what they redirect; no routes or DNS), in
the same directory when run as root, else in the user's own (:func:`user_state_dir`), which
``kvpn status`` reads too.

Everything here is pure apart from reading files: the clock and the liveness check come in
as arguments. Files are untrusted input: malformed ones are shown as unreadable or skipped.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kvpn.link_state import LinkSnapshot

__all__ = [
    "STALE_AFTER",
    "STATUS_SUFFIX",
    "SessionStatus",
    "SessionView",
    "Verdict",
    "ensure_private_dir",
    "judge",
    "list_sessions",
    "read_json_file",
    "render_json",
    "render_text",
    "status_path",
    "summarize_counters",
    "user_state_dir",
    "write_status",
]

ROOT_STATE_DIR = Path("/run/kvpn")
STATUS_SUFFIX = ".status.json"
STATUS_VERSION = 1
STALE_AFTER = 10.0
LIVE_STATES = ("connected", "degraded", "reconnecting", "stopped")


class Verdict(enum.Enum):
    CONNECTED = "connected"
    DEGRADED = "degraded"
    RECONNECTING = "reconnecting"
    STOPPING = "stopping"
    UNRESPONSIVE = "unresponsive"
    DEAD = "dead"


_VERDICT_OF_STATE: dict[str, Verdict] = {
    "connected": Verdict.CONNECTED,
    "degraded": Verdict.DEGRADED,
    "reconnecting": Verdict.RECONNECTING,
    "stopped": Verdict.STOPPING,
}


# -- writing (the session's side) -------------------------------------------------------


def ensure_private_dir(path: Path) -> None:
    """Create *path* (and missing parents) as 0700; tighten it if it is ours and wider."""
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
    st = path.stat()
    if st.st_uid == os.geteuid() and st.st_mode & 0o077:
        path.chmod(0o700)


def user_state_dir() -> Path:
    """Where a session run by this user keeps its state: ``/run/kvpn`` for root (``kvpn
    connect`` needs root), else ``$XDG_RUNTIME_DIR/kvpn`` (a per-user tmpfs, gone at logout
    like the sessions it describes), else ``$XDG_STATE_HOME/kvpn`` (``~/.local/state/kvpn``).
    ``KVPN_STATE_DIR`` overrides all three."""
    override = os.environ.get("KVPN_STATE_DIR")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return ROOT_STATE_DIR
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "kvpn"
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "kvpn"


def status_path(sessions_dir: Path, session_id: str) -> Path:
    return sessions_dir / f"{session_id}{STATUS_SUFFIX}"


@dataclass(frozen=True, slots=True)
class SessionStatus:
    """One status file's content (times are seconds since the epoch)."""

    session: str
    pid: int
    pid_start: int  # clock ticks since boot (/proc/PID/stat field 22); 0 unknown
    state: str  # one of LIVE_STATES
    since: float
    updated_at: float
    reason: str = ""
    last_error: str = ""
    reconnect_attempts: int = 0
    reconnects: int = 0
    last_outage_s: float | None = None
    next_attempt_at: float | None = None
    shadow_pod: str = ""
    pods_recreated: int = 0
    transport: str = ""
    tun: str = ""
    routes: tuple[str, ...] = ()
    dns_mode: str = ""
    counters: Mapping[str, Any] = field(default_factory=dict)
    #: "connect", or the intercept session's "exchange" / "preview" / "mesh"
    kind: str = "connect"
    service: str = ""  # namespace/name the intercept redirects or publishes
    mode: str = ""  # exchange: selector/scale; mesh: auto/manual
    mark: str = ""  # mesh: the header line that selects this developer
    ports: tuple[str, ...] = ()  # "8080 -> localhost:8080"

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATUS_VERSION,
            "session": self.session,
            "pid": self.pid,
            "pid_start": self.pid_start,
            "state": self.state,
            "since": self.since,
            "updated_at": self.updated_at,
            "reason": self.reason,
            "last_error": self.last_error,
            "reconnect_attempts": self.reconnect_attempts,
            "reconnects": self.reconnects,
            "last_outage_s": self.last_outage_s,
            "next_attempt_at": self.next_attempt_at,
            "shadow_pod": self.shadow_pod,
            "pods_recreated": self.pods_recreated,
            "transport": self.transport,
            "tun": self.tun,
            "routes": list(self.routes),
            "dns_mode": self.dns_mode,
            "counters": dict(self.counters),
            "kind": self.kind,
            "service": self.service,
            "mode": self.mode,
            "mark": self.mark,
            "ports": list(self.ports),
        }


def write_status(path: Path, status: SessionStatus) -> None:
    """Replace *path* atomically with *status* (mode 0600)."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(status.to_json(), f, indent=1)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def summarize_counters(
    flat: Mapping[str, int], dns: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """The data plane's flat counters (and the resolver's) as shown by ``kvpn status``."""

    def get(name: str) -> int:
        value = flat.get(name, 0)
        return value if isinstance(value, int) else 0

    drops = {k.removeprefix("drop."): v for k, v in sorted(flat.items()) if k.startswith("drop.")}
    if get("datagrams_dropped_tunnel_down"):
        drops["tunnel_down"] = get("datagrams_dropped_tunnel_down")
    if get("tun_write_dropped"):
        drops["tun_write"] = get("tun_write_dropped")
    summary: dict[str, Any] = {
        "flows_open": get("tcp_flows_open") + get("udp_flows_open") + get("echo_flows_open"),
        "tcp_flows_open": get("tcp_flows_open"),
        "tcp_relays_active": get("tcp_relays_active"),
        "udp_flows_open": get("udp_flows_open"),
        "bytes_up": get("tcp_bytes_up") + get("udp_bytes_out"),
        "bytes_down": get("tcp_bytes_down") + get("udp_bytes_in"),
        "tcp_dials": get("tcp_dials_requested"),
        "tcp_dials_held": get("dials_held"),
        "resets_to_apps": get("tcp_resets_to_app"),
        "tunnel_losses": get("tunnel_losses"),
        "drops": drops,
    }
    if dns is not None:
        summary["dns"] = dict(dns)
    return summary


# -- reading and judging (kvpn status) --------------------------------------------------


def read_json_file(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def live_status(
    session: str,
    snapshot: LinkSnapshot,
    *,
    pid_start: int,
    mono: float,
    wall: float,
    **details: Any,
) -> SessionStatus:
    """The status record of this process's live session from its link supervisor's
    ``snapshot`` (taken at loop time ``mono`` = wall time ``wall``); ``details`` are the
    session's own fields (shadow pod, transport, routes, service, ...)."""
    return SessionStatus(
        session=session,
        pid=os.getpid(),
        pid_start=pid_start,
        state=snapshot.state.value,
        since=wall - (mono - snapshot.since),
        updated_at=wall,
        reason=snapshot.reason,
        last_error=snapshot.last_error,
        reconnect_attempts=snapshot.attempts,
        reconnects=snapshot.reconnects,
        last_outage_s=snapshot.last_outage,
        next_attempt_at=(
            None if snapshot.next_attempt is None else wall + (snapshot.next_attempt - mono)
        ),
        **details,
    )


@dataclass(frozen=True, slots=True)
class SessionView:
    session: str
    verdict: Verdict
    detail: str  # the words after the verdict: "since 10:02:03 UTC", "no update for 14 s"
    pid: int
    session_file: Path
    session_record: Mapping[str, Any]
    status: Mapping[str, Any] | None  # the status file, when readable
    status_age: float | None

    @property
    def headline(self) -> str:
        if self.verdict is Verdict.DEAD:
            return "dead (run kvpn clean)"
        return str(self.verdict.value) + (f" ({self.detail})" if self.detail else "")


def _number(data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _text(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    return str(value) if isinstance(value, str) else ""


def _clock(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.0f} min"


def judge(
    session_id: str,
    session_file: Path,
    record: Mapping[str, Any],
    status: Mapping[str, Any] | None,
    *,
    now: float,
    alive: Callable[[int, int], bool],
    stale_after: float = STALE_AFTER,
) -> SessionView:
    """Decide what to say about one session (see the module docstring)."""
    pid = record.get("pid")
    pid = pid if isinstance(pid, int) and not isinstance(pid, bool) else 0
    if status is not None and status.get("session") not in (None, session_id):
        status = None  # somebody else's file under this name: do not believe it
    pid_start = int(_number(status, "pid_start") or 0) if status is not None else 0

    def view(verdict: Verdict, detail: str, age: float | None = None) -> SessionView:
        return SessionView(session_id, verdict, detail, pid, session_file, record, status, age)

    if not alive(pid, pid_start):
        return view(Verdict.DEAD, f"process {pid} is not running")
    if status is None:
        return view(Verdict.UNRESPONSIVE, "no readable status file")
    updated = _number(status, "updated_at")
    if updated is None:
        return view(Verdict.UNRESPONSIVE, "no readable status file")
    age = now - updated
    if age > stale_after:
        return view(Verdict.UNRESPONSIVE, f"no update for {_seconds(age)}", age)
    if age < -stale_after:  # written "in the future": the clock was set back, wait for news
        return view(Verdict.UNRESPONSIVE, "the status file's time is in the future", age)
    verdict = _VERDICT_OF_STATE.get(_text(status, "state"))
    if verdict is None:
        return view(Verdict.UNRESPONSIVE, "unknown state in the status file", age)
    since = _number(status, "since")
    parts = [f"since {_clock(since)}"] if since is not None else []
    if verdict is not Verdict.CONNECTED and _text(status, "reason"):
        parts.append(_text(status, "reason"))
    if verdict is Verdict.RECONNECTING and _text(status, "last_error"):
        parts.append(f"last error: {_text(status, 'last_error')}")
    return view(verdict, "; ".join(parts), age)


def list_sessions(
    sessions_dir: Path, *, now: float, alive: Callable[[int, int], bool]
) -> list[SessionView]:
    """Every session with a readable session file in *sessions_dir*, by session id."""
    try:
        paths = sorted(sessions_dir.glob("*.json"))
    except OSError:
        return []
    views = []
    for path in paths:
        if path.name.endswith(STATUS_SUFFIX) or path.name.startswith("."):
            continue
        record = read_json_file(path)
        if record is None or not isinstance(record.get("pid"), int):
            continue
        session_id = path.name.removesuffix(".json")
        status = read_json_file(status_path(sessions_dir, session_id))
        views.append(judge(session_id, path, record, status, now=now, alive=alive))
    return views


# -- rendering ----------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _routes(view: SessionView) -> list[str]:
    if view.status is not None and isinstance(view.status.get("routes"), list):
        return [str(r) for r in view.status["routes"]]
    routes = view.session_record.get("routes")
    installed = routes.get("installed") if isinstance(routes, dict) else None
    return [str(r) for r in installed] if isinstance(installed, list) else []


def _dns_mode(view: SessionView) -> str:
    if view.status is not None and _text(view.status, "dns_mode"):
        return _text(view.status, "dns_mode")
    dns = view.session_record.get("dns")
    return _text(dns, "mode") if isinstance(dns, dict) else ""


def _kind(view: SessionView) -> str:
    if view.status is not None and _text(view.status, "kind"):
        return _text(view.status, "kind")
    return _text(view.session_record, "kind") or "connect"


def _strings(data: Mapping[str, Any], key: str) -> list[str]:
    value = data.get(key)
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def view_to_json(view: SessionView) -> dict[str, Any]:
    status = view.status or {}
    record = view.session_record
    counters = status.get("counters")
    return {
        "session": view.session,
        "kind": _kind(view),
        "service": _text(status, "service") or _text(record, "service"),
        "mode": _text(status, "mode") or _text(record, "mode"),
        "mark": _text(status, "mark") or _text(record, "mark"),
        "ports": _strings(status, "ports") or _strings(record, "ports"),
        "state": view.verdict.value,
        "detail": view.detail,
        "summary": view.headline,
        "pid": view.pid,
        "since": _number(status, "since"),
        "reason": _text(status, "reason"),
        "last_error": _text(status, "last_error"),
        "reconnect_attempts": _number(status, "reconnect_attempts"),
        "reconnects": _number(status, "reconnects"),
        "last_outage_s": _number(status, "last_outage_s"),
        "pods_recreated": _number(status, "pods_recreated"),
        "shadow_pod": _text(status, "shadow_pod")
        or (f"{_text(record, 'namespace')}/{_text(record, 'shadow_pod')}".strip("/")),
        "namespace": _text(record, "namespace"),
        "context": _text(record, "context"),
        "transport": _text(status, "transport") or _text(record, "transport"),
        "tun": _text(status, "tun") or _text(record, "tun"),
        "routes": _routes(view),
        "dns_mode": _dns_mode(view),
        "counters": counters if isinstance(counters, dict) else {},
        "updated_at": _number(status, "updated_at"),
        "status_age_s": view.status_age,
        "session_file": str(view.session_file),
    }


def render_json(views: Iterable[SessionView]) -> str:
    return json.dumps({"sessions": [view_to_json(v) for v in views]}, indent=2)


def render_text(views: Iterable[SessionView]) -> str:
    blocks = []
    for view in views:
        data = view_to_json(view)
        kind = data["kind"]
        intercept = kind != "connect"
        lines = [f"session {view.session}: {view.headline}"]
        if intercept:
            mode = " ".join(x for x in (data["mode"], data["mark"] and repr(data["mark"])) if x)
            lines.append(
                f"  {kind:<12} service {data['service'] or '?'}" + (f" ({mode})" if mode else "")
            )
            if data["ports"]:
                lines.append(f"  ports        {', '.join(data['ports'])}")
        lines.append(f"  pid          {view.pid}")
        if data["shadow_pod"]:
            lines.append(f"  shadow pod   {data['shadow_pod']} ({data['transport'] or '?'})")
        if data["context"]:
            lines.append(f"  context      {data['context']}")
        if not intercept:
            routes = ", ".join(data["routes"]) or "none"
            lines.append(f"  routes       {routes} -> {data['tun'] or '?'}")
            lines.append(f"  dns          {data['dns_mode'] or 'unknown'}")
        counters = data["counters"]
        if counters and view.verdict is not Verdict.DEAD and not intercept:
            drops = counters.get("drops") if isinstance(counters.get("drops"), dict) else {}
            drop_text = ", ".join(f"{k} {v}" for k, v in drops.items()) or "none"
            lines.append(
                f"  traffic      {counters.get('flows_open', 0)} flows open, "
                f"{_size(float(counters.get('bytes_up', 0)))} up, "
                f"{_size(float(counters.get('bytes_down', 0)))} down; drops: {drop_text}"
            )
            dns = counters.get("dns")
            if isinstance(dns, dict) and dns:
                lines.append(
                    "  dns queries  "
                    + ", ".join(f"{k} {v}" for k, v in dns.items() if isinstance(v, int) and v)
                )
        if data["reconnects"]:
            outage = data["last_outage_s"]
            lines.append(
                f"  reconnects   {data['reconnects']:.0f}"
                + (f" (last outage {outage:.1f} s)" if outage is not None else "")
                + (
                    f", shadow pod recreated {data['pods_recreated']:.0f}x"
                    if data["pods_recreated"]
                    else ""
                )
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) if blocks else "no kvpn sessions on this machine"
