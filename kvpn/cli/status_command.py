"""`kvpn status`: thin wrapper around kvpn.session_status."""

from __future__ import annotations

import os
import time
from pathlib import Path

from kvpn.cli.errors import UserError

OUTPUTS = ("text", "json")


def run_status(*, output: str, state_dir: Path) -> int:
    """Print every session on this machine; 0 even when some are unhealthy (say so, not fail)."""
    from kvpn.dns.session import process_alive
    from kvpn.session_status import list_sessions, render_json, render_text

    if output not in OUTPUTS:
        raise UserError(f"--output must be one of {', '.join(OUTPUTS)}")
    sessions = state_dir / "sessions"
    if sessions.exists() and not os.access(sessions, os.R_OK | os.X_OK):
        # the state directory is root's and 0700: say so rather than "no sessions"
        raise UserError(f"cannot read {sessions}: permission denied (try sudo kvpn status)")
    views = list_sessions(sessions, now=time.time(), alive=process_alive)
    print(render_json(views) if output == "json" else render_text(views))
    return 0
