"""`kvpn status`: thin wrapper around kvpn.session_status."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from kvpn.cli.errors import UserError

OUTPUTS = ("text", "json")


def _readable(sessions: Path) -> bool:
    return not sessions.exists() or os.access(sessions, os.R_OK | os.X_OK)


def run_status(*, output: str, state_dir: Path, user_dir: Path | None = None) -> int:
    """Print every session on this machine; 0 even when some are unhealthy (say so, not fail).

    ``state_dir`` holds ``kvpn connect``'s sessions (root's); ``user_dir`` (default: this
    user's, :func:`kvpn.session_status.user_state_dir`) the ``exchange``, ``preview`` and
    ``mesh`` sessions a user runs without root. Both are listed (only ``state_dir`` when it
    is not the default)."""
    from kvpn.dns.session import process_alive
    from kvpn.session_status import (
        ROOT_STATE_DIR,
        list_sessions,
        render_json,
        render_text,
        user_state_dir,
    )

    if output not in OUTPUTS:
        raise UserError(f"--output must be one of {', '.join(OUTPUTS)}")
    if user_dir is None:
        user_dir = user_state_dir() if state_dir == ROOT_STATE_DIR else state_dir
    directories = [state_dir] + ([user_dir] if user_dir != state_dir else [])
    readable = [d / "sessions" for d in directories if _readable(d / "sessions")]
    sessions = state_dir / "sessions"
    if not _readable(sessions):
        if not any((d / "sessions").exists() for d in directories[1:]):
            # the state directory is root's and 0700: say so rather than "no sessions"
            raise UserError(f"cannot read {sessions}: permission denied (try sudo kvpn status)")
        print(
            f"kvpn: cannot read {sessions} (kvpn connect sessions): try sudo kvpn status",
            file=sys.stderr,
        )
    now = time.time()
    views = [view for d in readable for view in list_sessions(d, now=now, alive=process_alive)]
    print(render_json(views) if output == "json" else render_text(views))
    return 0
