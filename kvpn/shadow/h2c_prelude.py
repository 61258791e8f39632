"""Sans-IO reading of the start of an HTTP/2 prior-knowledge (h2c) connection.

Theory of operation (RFC 9113).

* The router routes an h2c connection as a whole, by the header fields of the first
  ``HEADERS`` frame (section 6.2, plus its ``CONTINUATION`` frames, section 6.10) the client
  sends after the preface (section 3.4). :class:`H2Prelude` is fed the client's bytes and
  says when it has that header list (decoded with HPACK, RFC 7541) or why it cannot have
  it. Nothing is rewritten: the bytes are then replayed to the chosen backend, which decodes
  the same header block itself (its HPACK dynamic table starts empty, like ours did).
* Clients such as grpc-go wait for the server's connection preface (a ``SETTINGS`` frame,
  section 3.4) before they send any request. The router therefore answers the preface at
  once with an empty ``SETTINGS`` frame (:data:`EMPTY_SETTINGS`, all defaults, so nothing
  changes for the client). The client acknowledges it with a ``SETTINGS`` frame flagged
  ``ACK``; that first acknowledgement is for the router, not the backend (which would treat
  an acknowledgement of settings it never sent as a protocol error), so
  :class:`FirstSettingsAckDropper` removes exactly that frame from the client's stream and
  then passes every byte through unchanged. The backend's own ``SETTINGS`` reach the client
  afterwards; a second ``SETTINGS`` frame is ordinary in HTTP/2 (section 6.5).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import hpack

from kvpn.shadow.http_routing import H2_PREFACE

FRAME_HEADER_LENGTH = 9
TYPE_HEADERS = 0x1
TYPE_SETTINGS = 0x4
TYPE_CONTINUATION = 0x9
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20

EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
DEFAULT_PRELUDE_LIMIT = 256 * 1024


class PreludeState(enum.Enum):
    NEED_MORE = "need-more"
    HEADERS = "headers"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class FrameHeader:
    length: int
    type: int
    flags: int
    stream_id: int


def parse_frame_header(data: bytes) -> FrameHeader:
    """The 9-byte frame header at the start of ``data`` (caller ensures 9 bytes)."""
    return FrameHeader(
        length=int.from_bytes(data[0:3], "big"),
        type=data[3],
        flags=data[4],
        stream_id=int.from_bytes(data[5:9], "big") & 0x7FFFFFFF,
    )


def _headers_fragment(header: FrameHeader, payload: bytes) -> bytes | None:
    """The header block fragment of a HEADERS payload, or None if its padding is invalid."""
    start = 0
    pad = 0
    if header.flags & FLAG_PADDED:
        if not payload:
            return None
        pad = payload[0]
        start = 1
    if header.flags & FLAG_PRIORITY:
        start += 5
    end = len(payload) - pad
    if end < start:
        return None
    return payload[start:end]


class H2Prelude:
    """Collects the client's bytes until the first request's header list is known.

    ``feed`` returns the state; ``headers`` holds the decoded list once the state is
    ``HEADERS``; ``failure`` says why when it is ``FAILED`` (not HTTP/2 after all, a bad
    frame, an undecodable header block, or more than ``limit`` bytes without a request).
    ``data`` keeps every byte fed, to be replayed to the backend.
    """

    def __init__(self, *, limit: int = DEFAULT_PRELUDE_LIMIT) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self._offset = 0  # where the next unparsed frame starts in _buffer
        self._block = bytearray()
        self._block_stream: int | None = None
        self.state = PreludeState.NEED_MORE
        self.headers: list[tuple[bytes, bytes]] = []
        self.failure = ""

    @property
    def data(self) -> bytes:
        return bytes(self._buffer)

    def feed(self, data: bytes) -> PreludeState:
        if self.state is not PreludeState.NEED_MORE:
            self._buffer += data
            return self.state
        self._buffer += data
        if self._offset == 0:
            if len(self._buffer) < len(H2_PREFACE):
                if not H2_PREFACE.startswith(bytes(self._buffer)):
                    return self._fail("not the HTTP/2 preface")
                return self.state
            if not self._buffer.startswith(H2_PREFACE):
                return self._fail("not the HTTP/2 preface")
            self._offset = len(H2_PREFACE)
        self._parse_frames()
        if self.state is PreludeState.NEED_MORE and len(self._buffer) > self._limit:
            return self._fail("no request headers within the prelude limit")
        return self.state

    def _fail(self, why: str) -> PreludeState:
        self.state = PreludeState.FAILED
        self.failure = why
        return self.state

    def _parse_frames(self) -> None:
        while self.state is PreludeState.NEED_MORE:
            available = len(self._buffer) - self._offset
            if available < FRAME_HEADER_LENGTH:
                return
            header = parse_frame_header(bytes(self._buffer[self._offset : self._offset + 9]))
            if header.length > self._limit:
                self._fail("frame larger than the prelude limit")
                return
            if available < FRAME_HEADER_LENGTH + header.length:
                return
            start = self._offset + FRAME_HEADER_LENGTH
            payload = bytes(self._buffer[start : start + header.length])
            self._offset = start + header.length
            self._frame(header, payload)

    def _frame(self, header: FrameHeader, payload: bytes) -> None:
        if self._block_stream is not None:
            if header.type != TYPE_CONTINUATION or header.stream_id != self._block_stream:
                self._fail("header block interrupted")
                return
            self._block += payload
        elif header.type == TYPE_HEADERS:
            if header.stream_id == 0:
                self._fail("HEADERS on stream 0")
                return
            fragment = _headers_fragment(header, payload)
            if fragment is None:
                self._fail("bad HEADERS padding")
                return
            self._block_stream = header.stream_id
            self._block += fragment
        elif header.type == TYPE_CONTINUATION:
            self._fail("CONTINUATION without HEADERS")
            return
        else:
            return  # SETTINGS, WINDOW_UPDATE, PRIORITY, PING...: the backend's business
        if header.flags & FLAG_END_HEADERS:
            self._decode()

    def _decode(self) -> None:
        decoder = hpack.Decoder()
        try:
            decoded = decoder.decode(bytes(self._block), raw=True)
        except (hpack.HPACKError, ValueError, IndexError, TypeError) as error:
            self._fail(f"undecodable header block: {type(error).__name__}")
            return
        self.headers = [(bytes(name), bytes(value)) for name, value in decoded]
        self.state = PreludeState.HEADERS


class FirstSettingsAckDropper:
    """Filters the client-to-backend byte stream of an h2c connection (from its first byte).

    Drops the first ``SETTINGS`` frame with the ``ACK`` flag (the client's acknowledgement of
    :data:`EMPTY_SETTINGS`), then passes everything through. Frame payloads are streamed, not
    buffered. Bytes that are not valid framing are passed through untouched (the backend
    will reject them itself).
    """

    def __init__(self) -> None:
        self._preface_left = len(H2_PREFACE)
        self._header = bytearray()
        self._payload_left = 0
        self.dropped = False

    def feed(self, data: bytes) -> bytes:
        if self.dropped:
            return data
        out = bytearray()
        view = memoryview(data)
        while view and not self.dropped:
            if self._preface_left:
                take = min(self._preface_left, len(view))
                out += view[:take]
                view = view[take:]
                self._preface_left -= take
            elif self._payload_left:
                take = min(self._payload_left, len(view))
                out += view[:take]
                view = view[take:]
                self._payload_left -= take
            else:
                take = min(FRAME_HEADER_LENGTH - len(self._header), len(view))
                self._header += view[:take]
                view = view[take:]
                if len(self._header) == FRAME_HEADER_LENGTH:
                    header = parse_frame_header(bytes(self._header))
                    is_ack = header.type == TYPE_SETTINGS and header.flags & FLAG_ACK
                    if is_ack and header.length == 0 and header.stream_id == 0:
                        self.dropped = True
                    else:
                        out += self._header
                        self._payload_left = header.length
                    self._header.clear()
        out += view
        return bytes(out)
