"""Sans-IO routing decisions of the mesh router: what a connection speaks, where a request goes.

Theory of operation (``docs/mesh-design.md``).

* **First bytes** (:func:`sniff_first_bytes`). A TCP connection on a meshed port is HTTP/2
  with prior knowledge when it opens with the 24-byte connection preface of RFC 9113
  section 3.4, HTTP/1.x when it opens with a request line ``METHOD SP`` (RFC 9112 section
  3, a method is a token; a few leading empty lines are allowed by section 2.2), anything
  else (TLS, a database protocol, a banner-first protocol's silence) is *other* and goes to
  the stand-in untouched. While the bytes seen so far could still become either, the answer
  is ``NEED_MORE``; the caller gives up waiting after its own timeout.
* **Marks** (:func:`mark_of`). The developer's mark is the value of header ``KEY``; the
  name is compared case-insensitively (RFC 9110 section 5.1), the value exactly after the
  optional whitespace around it is removed (section 5.5). Several fields with that name:
  the first one counts. An empty value is no mark.
* **Targets** (:func:`route_for`). A mark names a member Service (derived, no table, see
  :mod:`kvpn.shadow.mesh_names`); no mark goes to the stand-in. When the member cannot be
  dialled the adapter falls back to the stand-in (:func:`fallback_of`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass

from kvpn.shadow.mesh_names import RouterSettings

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# A request line starts with a method token then one space; 24 characters is longer than any
# registered method (the longest, "VERSION-CONTROL", has 15).
_MAX_METHOD = 24
_METHOD_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,24} ")
_METHOD_PREFIX = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{0,24}")
_MAX_LEADING_EMPTY_LINES = 8


class FirstBytes(enum.Enum):
    """What the first bytes of a connection say it speaks."""

    NEED_MORE = "need-more"
    HTTP1 = "http1"
    H2_PRIOR_KNOWLEDGE = "h2-prior-knowledge"
    OTHER = "other"


def _strip_empty_lines(data: bytes) -> bytes | None:
    """Drop up to a few leading CRLF/LF lines; None if there are too many to be HTTP."""
    for _ in range(_MAX_LEADING_EMPTY_LINES + 1):
        if data.startswith(b"\r\n"):
            data = data[2:]
        elif data.startswith(b"\n"):
            data = data[1:]
        else:
            return data
    return None


def sniff_first_bytes(data: bytes) -> FirstBytes:
    """Classify the bytes a client sent first (never raises)."""
    if not data:
        return FirstBytes.NEED_MORE
    head = data[: len(H2_PREFACE)]
    if H2_PREFACE.startswith(head):
        if len(head) == len(H2_PREFACE):
            return FirstBytes.H2_PRIOR_KNOWLEDGE
        return FirstBytes.NEED_MORE
    rest = _strip_empty_lines(data)
    if rest is None:
        return FirstBytes.OTHER
    if not rest or rest == b"\r":
        return FirstBytes.NEED_MORE
    if _METHOD_LINE.match(rest):
        return FirstBytes.HTTP1
    prefix = _METHOD_PREFIX.match(rest)
    if prefix is not None and prefix.end() == len(rest) and len(rest) <= _MAX_METHOD:
        return FirstBytes.NEED_MORE
    return FirstBytes.OTHER


def mark_of(headers: Iterable[tuple[bytes, bytes]], key: str) -> str | None:
    """The value of the first header named ``key`` (any case), or None if absent or empty.

    Values that are not valid UTF-8 cannot name a member and count as no mark.
    """
    wanted = key.lower().encode("ascii", "replace")
    for name, value in headers:
        if name.lower() == wanted:
            text = value.strip(b" \t")
            if not text:
                return None
            try:
                return text.decode("utf-8")
            except UnicodeDecodeError:
                return None
    return None


class TargetKind(enum.Enum):
    MEMBER = "member"
    STANDIN = "standin"


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request (or a whole connection) goes: a DNS name and a port."""

    kind: TargetKind
    host: str
    port: int
    mark: str | None = None


def standin_target(settings: RouterSettings, port: int) -> Target:
    return Target(TargetKind.STANDIN, settings.standin, port)


def route_for(settings: RouterSettings, port: int, mark: str | None) -> Target:
    """The member of ``mark`` on ``port``, or the stand-in when there is no mark."""
    if mark is None:
        return standin_target(settings, port)
    return Target(TargetKind.MEMBER, settings.member_host(mark), port, mark)


def fallback_of(settings: RouterSettings, target: Target) -> Target | None:
    """Where to go when ``target`` cannot be dialled: members fall back to the stand-in."""
    if target.kind is TargetKind.MEMBER:
        return standin_target(settings, target.port)
    return None


def route_headers(
    settings: RouterSettings, port: int, headers: Iterable[tuple[bytes, bytes]]
) -> Target:
    """The target of a request with these header fields."""
    return route_for(settings, port, mark_of(headers, settings.header))
