"""`kvpn exchange`, `kvpn preview`, `kvpn clean` and `kvpn recover`: thin wrappers.

Options are parsed by :mod:`kvpn.cli.main`; the work is in :mod:`kvpn.exchange_session`,
:mod:`kvpn.preview_session` and :mod:`kvpn.clean_session`. Errors the user can fix arrive as
:class:`UserError`.
"""

from __future__ import annotations

import asyncio

from kvpn.cli.errors import UserError
from kvpn.intercept_session import InterceptOptions


def _out(line: str) -> None:
    print(line, flush=True)


def _check_heartbeat(seconds: float) -> None:
    if not 0.2 <= seconds <= 3600:
        raise UserError("--heartbeat must be between 0.2 and 3600 seconds")


def _finish(code: int, what: str) -> None:
    if code:
        raise UserError(what, exit_code=code)


def run_exchange_command(options: InterceptOptions, service: str, expose: str, mode: str) -> None:
    from kvpn.exchange_session import run_exchange
    from kvpn.intercept_session import run_blocking

    _check_heartbeat(options.heartbeat_seconds)
    code = run_blocking(lambda stop: run_exchange(options, service, expose, mode, _out, stop))
    _finish(code, "the exchange ended with errors (see above)")


def run_preview_command(options: InterceptOptions, name: str, expose: str, external: bool) -> None:
    from kvpn.intercept_session import run_blocking
    from kvpn.preview_session import run_preview

    _check_heartbeat(options.heartbeat_seconds)
    code = run_blocking(lambda stop: run_preview(options, name, expose, external, _out, stop))
    _finish(code, "the preview ended with errors (see above)")


def run_clean_command(options: InterceptOptions, *, all_namespaces: bool, dry_run: bool) -> None:
    from kvpn.clean_session import run_clean

    code = asyncio.run(run_clean(options, _out, all_namespaces=all_namespaces, dry_run=dry_run))
    _finish(code, "some leftovers could not be cleaned (see above)")


def run_recover_command(options: InterceptOptions, service: str, *, dry_run: bool) -> None:
    from kvpn.clean_session import run_recover

    code = asyncio.run(run_recover(options, service, _out, dry_run=dry_run))
    _finish(code, f"service {service} could not be fully restored (see above)")
