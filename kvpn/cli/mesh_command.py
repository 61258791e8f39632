"""`kvpn mesh`: a thin wrapper; the work is in :mod:`kvpn.mesh_session`."""

from __future__ import annotations

from kvpn.cli.errors import UserError
from kvpn.intercept_session import InterceptOptions


def _out(line: str) -> None:
    print(line, flush=True)


def run_mesh_command(
    options: InterceptOptions, service: str, expose: str, version_mark: str | None, mode: str
) -> None:
    from kvpn.intercept_session import run_blocking
    from kvpn.mesh_session import run_mesh

    if not 0.2 <= options.heartbeat_seconds <= 3600:
        raise UserError("--heartbeat must be between 0.2 and 3600 seconds")
    code = run_blocking(
        lambda stop: run_mesh(options, service, expose, version_mark, mode, _out, stop)
    )
    if code:
        raise UserError("the mesh ended with errors (see above)", exit_code=code)
