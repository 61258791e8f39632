"""The live session record: ``/run/kvpn/sessions/<session-id>.json``.

``kvpn connect`` writes one file per session with at least ``pid``, ``tun``, ``namespace``,
``context`` and ``routes`` (``RoutePlan.to_json()``); ``kvpn routes`` reads it to show the live
state. Files are local but still treated as untrusted: a malformed one is skipped.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvpn.routes.plan import RoutePlan

__all__ = ["SESSIONS_DIR", "LiveSession", "find_live_session", "read_session", "write_session"]

SESSIONS_DIR = Path("/run/kvpn/sessions")
SESSION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class LiveSession:
    session_id: str
    pid: int
    tun: str
    namespace: str
    context: str
    routes: RoutePlan
    path: Path


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_session(
    session_id: str,
    *,
    pid: int,
    tun: str,
    namespace: str,
    context: str,
    routes: RoutePlan,
    directory: Path = SESSIONS_DIR,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write (atomically, mode 0600) the session record; return its path."""
    if not SESSION_ID_RE.match(session_id):
        raise ValueError(f"invalid session id {session_id!r}")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    record: dict[str, Any] = dict(extra or {})
    record.update(pid=pid, tun=tun, namespace=namespace, context=context, routes=routes.to_json())
    path = directory / f"{session_id}.json"
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{session_id}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def read_session(path: Path) -> LiveSession | None:
    """Parse one session file; None if unreadable or malformed."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            return None
        pid, tun, namespace, context = (
            data.get("pid"),
            data.get("tun"),
            data.get("namespace"),
            data.get("context"),
        )
        if not isinstance(pid, int) or isinstance(pid, bool):
            return None
        if not all(isinstance(v, str) for v in (tun, namespace, context)):
            return None
        routes = RoutePlan.from_json(data.get("routes"))
    except (OSError, ValueError):
        return None
    return LiveSession(path.stem, pid, str(tun), str(namespace), str(context), routes, path)


def find_live_session(context: str, directory: Path = SESSIONS_DIR) -> LiveSession | None:
    """The newest session file for ``context`` whose process is still running."""

    def mtime(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:
            return 0.0

    try:
        paths = sorted(directory.glob("*.json"), key=mtime, reverse=True)
    except OSError:
        return None
    for path in paths:
        session = read_session(path)
        if session is not None and session.context == context and pid_alive(session.pid):
            return session
    return None
