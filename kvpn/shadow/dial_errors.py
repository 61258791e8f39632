"""How the agent tells the client *why* a ``direct-tcpip`` dial failed.

SSH has a single channel-open failure code for every dial error (RFC 4254 section 5.1,
``SSH_OPEN_CONNECT_FAILED``), but the client must answer the app differently: a refused
port becomes a TCP RST, an unreachable host an ICMP unreachable, a timeout a RST after
the connect timeout. The agent therefore starts the failure *reason* text with a fixed
token, ``kvpn-dial-<kind>:``, followed by the human-readable error. Both sides share this
module so the token spelling lives in one place.
"""

from __future__ import annotations

import enum
import errno
import socket
from collections.abc import Mapping

_PREFIX = "kvpn-dial-"


class DialFailure(enum.Enum):
    REFUSED = "refused"
    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    NAME_NOT_FOUND = "name-not-found"
    OTHER = "error"


_ERRNO_FAILURES: Mapping[int, DialFailure] = {
    errno.ECONNREFUSED: DialFailure.REFUSED,
    errno.ECONNRESET: DialFailure.REFUSED,
    errno.EHOSTUNREACH: DialFailure.UNREACHABLE,
    errno.ENETUNREACH: DialFailure.UNREACHABLE,
    errno.EHOSTDOWN: DialFailure.UNREACHABLE,
    errno.ENETDOWN: DialFailure.UNREACHABLE,
    errno.EADDRNOTAVAIL: DialFailure.UNREACHABLE,
    errno.ETIMEDOUT: DialFailure.TIMEOUT,
}


def classify_dial_error(exc: BaseException) -> DialFailure:
    """Map an exception from connect() / getaddrinfo() / a timeout to a DialFailure."""
    if isinstance(exc, TimeoutError) and not exc.errno:
        return DialFailure.TIMEOUT
    if isinstance(exc, socket.gaierror):
        return DialFailure.NAME_NOT_FOUND
    if isinstance(exc, OSError) and exc.errno is not None:
        return _ERRNO_FAILURES.get(exc.errno, DialFailure.OTHER)
    return DialFailure.OTHER


def format_reason(failure: DialFailure, detail: str) -> str:
    return f"{_PREFIX}{failure.value}: {detail}"


_BY_VALUE: Mapping[str, DialFailure] = {f.value: f for f in DialFailure}


def parse_reason(reason: str) -> DialFailure:
    """Read the failure kind back from a channel-open failure reason (OTHER if unknown)."""
    if not reason.startswith(_PREFIX):
        return DialFailure.OTHER
    token = reason[len(_PREFIX) :].split(":", 1)[0]
    return _BY_VALUE.get(token, DialFailure.OTHER)
