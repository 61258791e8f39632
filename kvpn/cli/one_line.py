"""The command line's boundary: every mistake the user can fix is one line on stderr.

Typer (click) would print a usage mistake as a usage line, a hint and a framed box; an API
server that does not answer would surface as urllib3's retry warnings and a traceback. Here
both become one line and an exit code, converted once (tracebacks stay for bugs):

* ``kvpn connect: No such option: --bogus (see 'kvpn connect --help')``, exit 2;
* ``kvpn: cannot reach the API server http://127.0.0.1:9: Connection refused``, exit 1.

``kvpn`` alone still prints the help (exit 2), and ``--help`` the help (exit 0).
"""

from __future__ import annotations

import logging
from typing import Any

import typer

NO_ARGS_IS_HELP = "NoArgsIsHelpError"
USAGE_EXIT_CODE = 2
UNREACHABLE_EXIT_CODE = 1


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def usage_line(exc: Any, prog_name: str) -> str:
    """``<command path>: <what click says> (see '<command path> --help')``."""
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None) or prog_name
    return f"{path}: {_one_line(exc.format_message())} (see '{path} --help')"


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    text = _one_line(str(reason))
    # "HTTPConnection(host='127.0.0.1', port=9): Failed to establish a new connection:
    # [Errno 111] Connection refused" -> "Connection refused"
    if "] " in text:
        text = text.rsplit("] ", 1)[1]
    elif "): " in text:
        text = text.rsplit("): ", 1)[1]
    return text


def unreachable_line(exc: BaseException) -> str:
    pool = getattr(exc, "pool", None)
    where = ""
    if pool is not None:
        where = f" {getattr(pool, 'scheme', 'https')}://{pool.host}:{pool.port}"
    return f"kvpn: cannot reach the API server{where}: {_reason(exc)}"


def _is_usage_error(exc: BaseException) -> bool:
    return isinstance(exc, typer.TyperException) and hasattr(exc, "format_message")


def run_one_line(app: typer.Typer, prog_name: str) -> int:
    """Run ``app``; return its exit code. Raises what it does not convert (UserError and
    KeyboardInterrupt are the caller's; anything else is a bug and keeps its traceback)."""
    import urllib3.exceptions

    logging.getLogger("urllib3").setLevel(logging.ERROR)  # no "Retrying (...)" lines
    try:
        result = app(prog_name=prog_name, standalone_mode=False)
    except urllib3.exceptions.HTTPError as exc:
        typer.echo(unreachable_line(exc), err=True)
        return UNREACHABLE_EXIT_CODE
    except typer.Abort:
        typer.echo("kvpn: aborted", err=True)
        return 1
    except typer.TyperException as exc:
        if not _is_usage_error(exc):
            raise
        if type(exc).__name__ == NO_ARGS_IS_HELP:
            text = exc.format_message()
            if text.strip():  # rich help is printed while the error is made: text is ""
                typer.echo(text, err=True)
        else:
            typer.echo(usage_line(exc, prog_name), err=True)
        return int(getattr(exc, "exit_code", USAGE_EXIT_CODE))
    return result if isinstance(result, int) else 0
