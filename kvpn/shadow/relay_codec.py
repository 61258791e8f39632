"""Wire format of the ``kvpn-datagrams`` SSH subsystem (sans-IO).

Theory of operation
-------------------
TCP rides on SSH ``direct-tcpip`` channels, but UDP and ICMP echo have no SSH channel
type. The client therefore opens one SSH session channel, requests the subsystem
``kvpn-datagrams`` and both sides exchange a stream of length-prefixed frames on it::

    frame   = length:u16 body               (network byte order, 1 <= length)
    body    = type:u8 fields
    address = family:u8 (4 or 6) + 4 or 16 address bytes

    client -> agent
      0x01 UdpSend         flow:u32 dst:address dport:u16 payload
      0x02 PingSend        flow:u32 dst:address ident:u16 seq:u16 payload
      0x03 CloseFlow       flow:u32
    agent -> client
      0x81 UdpReceived     flow:u32 src:address sport:u16 payload
      0x82 UdpUnreachable  flow:u32 icmp_code:u8
      0x83 PingReply       flow:u32 src:address ident:u16 seq:u16 payload
      0x84 PingUnreachable flow:u32 icmp_code:u8
      0x85 FlowExpired     flow:u32

A flow id is chosen by the client and names one (destination, port or ident) pair; the
agent keeps one connected socket per flow. ``icmp_code`` is the ICMP destination
unreachable code the client should synthesise (RFC 792: 0 net, 1 host, 3 port,
13 administratively prohibited).

The length prefix keeps the stream in sync even when a body is malformed, so a bad frame
(unknown type, wrong direction, short or trailing fields, bad address family, zero
length) is dropped and counted by :class:`RelayDecoder`; it never raises.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

IPAddress = IPv4Address | IPv6Address

SUBSYSTEM_NAME = "kvpn-datagrams"

_LENGTH = struct.Struct("!H")
_FLOW = struct.Struct("!I")
_PORT = struct.Struct("!H")
_IDENT_SEQ = struct.Struct("!HH")
_CODE = struct.Struct("!B")

MAX_FRAME_BODY = 0xFFFF
# type + flow + IPv6 address + ident/seq: the largest fixed part of any body.
_MAX_FIXED_PART = 1 + 4 + 17 + 4
MAX_PAYLOAD = MAX_FRAME_BODY - _MAX_FIXED_PART


class MessageType(enum.IntEnum):
    UDP_SEND = 0x01
    PING_SEND = 0x02
    CLOSE_FLOW = 0x03
    UDP_RECEIVED = 0x81
    UDP_UNREACHABLE = 0x82
    PING_REPLY = 0x83
    PING_UNREACHABLE = 0x84
    FLOW_EXPIRED = 0x85


class IcmpUnreachableCode(enum.IntEnum):
    """ICMP destination unreachable codes (RFC 792 / RFC 1812)."""

    NET = 0
    HOST = 1
    PORT = 3
    ADMIN_PROHIBITED = 13


# --- client -> agent -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UdpSend:
    flow_id: int
    dst: IPAddress
    dport: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class PingSend:
    flow_id: int
    dst: IPAddress
    ident: int
    seq: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class CloseFlow:
    flow_id: int


# --- agent -> client -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UdpReceived:
    flow_id: int
    src: IPAddress
    sport: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class UdpUnreachable:
    flow_id: int
    icmp_code: int = IcmpUnreachableCode.PORT


@dataclass(frozen=True, slots=True)
class PingReply:
    flow_id: int
    src: IPAddress
    ident: int
    seq: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class PingUnreachable:
    flow_id: int
    icmp_code: int = IcmpUnreachableCode.HOST


@dataclass(frozen=True, slots=True)
class FlowExpired:
    flow_id: int


ClientMessage = UdpSend | PingSend | CloseFlow
AgentMessage = UdpReceived | UdpUnreachable | PingReply | PingUnreachable | FlowExpired
Message = ClientMessage | AgentMessage

CLIENT_TO_AGENT = frozenset(
    {MessageType.UDP_SEND, MessageType.PING_SEND, MessageType.CLOSE_FLOW}
)
AGENT_TO_CLIENT = frozenset(
    {
        MessageType.UDP_RECEIVED,
        MessageType.UDP_UNREACHABLE,
        MessageType.PING_REPLY,
        MessageType.PING_UNREACHABLE,
        MessageType.FLOW_EXPIRED,
    }
)


class MalformedFrame(Exception):
    """A frame body that does not follow the wire format (raised deep, counted once)."""


# --- encoding --------------------------------------------------------------------------


def _address(addr: IPAddress) -> bytes:
    return bytes([addr.version]) + addr.packed


def _u32(value: int) -> bytes:
    return _FLOW.pack(value)


def _encode_udp_send(m: UdpSend) -> bytes:
    return _u32(m.flow_id) + _address(m.dst) + _PORT.pack(m.dport) + m.payload


def _encode_ping_send(m: PingSend) -> bytes:
    return _u32(m.flow_id) + _address(m.dst) + _IDENT_SEQ.pack(m.ident, m.seq) + m.payload


def _encode_flow_only(m: CloseFlow | FlowExpired) -> bytes:
    return _u32(m.flow_id)


def _encode_udp_received(m: UdpReceived) -> bytes:
    return _u32(m.flow_id) + _address(m.src) + _PORT.pack(m.sport) + m.payload


def _encode_unreachable(m: UdpUnreachable | PingUnreachable) -> bytes:
    return _u32(m.flow_id) + _CODE.pack(m.icmp_code)


def _encode_ping_reply(m: PingReply) -> bytes:
    return _u32(m.flow_id) + _address(m.src) + _IDENT_SEQ.pack(m.ident, m.seq) + m.payload


_ENCODERS: Mapping[type, tuple[MessageType, Callable[..., bytes]]] = {
    UdpSend: (MessageType.UDP_SEND, _encode_udp_send),
    PingSend: (MessageType.PING_SEND, _encode_ping_send),
    CloseFlow: (MessageType.CLOSE_FLOW, _encode_flow_only),
    UdpReceived: (MessageType.UDP_RECEIVED, _encode_udp_received),
    UdpUnreachable: (MessageType.UDP_UNREACHABLE, _encode_unreachable),
    PingReply: (MessageType.PING_REPLY, _encode_ping_reply),
    PingUnreachable: (MessageType.PING_UNREACHABLE, _encode_unreachable),
    FlowExpired: (MessageType.FLOW_EXPIRED, _encode_flow_only),
}


def encode(message: Message) -> bytes:
    """Return one complete frame. Raises ValueError for values that do not fit the format
    (a local bug or an oversized datagram: the caller drops it)."""
    msg_type, encoder = _ENCODERS[type(message)]
    payload = getattr(message, "payload", b"")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"{type(message).__name__} payload of {len(payload)} bytes is too large")
    try:
        body = bytes([msg_type]) + encoder(message)
    except struct.error as exc:
        raise ValueError(f"cannot encode {message!r}: {exc}") from None
    return _LENGTH.pack(len(body)) + body


# --- decoding --------------------------------------------------------------------------


class _Reader:
    """Cursor over one frame body; every short read raises MalformedFrame."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise MalformedFrame("frame body too short")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = _PORT.unpack(self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = _FLOW.unpack(self.take(4))[0]
        return value

    def address(self) -> IPAddress:
        family = self.u8()
        if family == 4:
            return IPv4Address(self.take(4))
        if family == 6:
            return IPv6Address(self.take(16))
        raise MalformedFrame(f"unknown address family {family}")

    def rest(self) -> bytes:
        chunk = self._data[self._pos :]
        self._pos = len(self._data)
        return chunk

    def end(self) -> None:
        if self._pos != len(self._data):
            raise MalformedFrame("trailing bytes in frame body")


def _decode_udp_send(r: _Reader) -> Message:
    return UdpSend(r.u32(), r.address(), r.u16(), r.rest())


def _decode_ping_send(r: _Reader) -> Message:
    return PingSend(r.u32(), r.address(), r.u16(), r.u16(), r.rest())


def _decode_close_flow(r: _Reader) -> Message:
    flow_id = r.u32()
    r.end()
    return CloseFlow(flow_id)


def _decode_udp_received(r: _Reader) -> Message:
    return UdpReceived(r.u32(), r.address(), r.u16(), r.rest())


def _decode_udp_unreachable(r: _Reader) -> Message:
    flow_id, code = r.u32(), r.u8()
    r.end()
    return UdpUnreachable(flow_id, code)


def _decode_ping_reply(r: _Reader) -> Message:
    return PingReply(r.u32(), r.address(), r.u16(), r.u16(), r.rest())


def _decode_ping_unreachable(r: _Reader) -> Message:
    flow_id, code = r.u32(), r.u8()
    r.end()
    return PingUnreachable(flow_id, code)


def _decode_flow_expired(r: _Reader) -> Message:
    flow_id = r.u32()
    r.end()
    return FlowExpired(flow_id)


_DECODERS: Mapping[MessageType, Callable[[_Reader], Message]] = {
    MessageType.UDP_SEND: _decode_udp_send,
    MessageType.PING_SEND: _decode_ping_send,
    MessageType.CLOSE_FLOW: _decode_close_flow,
    MessageType.UDP_RECEIVED: _decode_udp_received,
    MessageType.UDP_UNREACHABLE: _decode_udp_unreachable,
    MessageType.PING_REPLY: _decode_ping_reply,
    MessageType.PING_UNREACHABLE: _decode_ping_unreachable,
    MessageType.FLOW_EXPIRED: _decode_flow_expired,
}


def decode_body(body: bytes, accepted: frozenset[MessageType]) -> Message:
    """Decode one frame body (without its length prefix); raises MalformedFrame."""
    if not body:
        raise MalformedFrame("empty frame")
    try:
        msg_type = MessageType(body[0])
    except ValueError:
        raise MalformedFrame(f"unknown message type {body[0]:#x}") from None
    if msg_type not in accepted:
        raise MalformedFrame(f"{msg_type.name} is not valid in this direction")
    return _DECODERS[msg_type](_Reader(body[1:]))


class RelayDecoder:
    """Incremental frame decoder for one direction of the relay stream.

    Feed bytes with :meth:`receive_data`, pull messages with :meth:`next_message`.
    Malformed bodies are dropped and counted in :attr:`malformed`.
    """

    def __init__(self, accepted: frozenset[MessageType]) -> None:
        self._accepted = accepted
        self._buffer = bytearray()
        self._messages: deque[Message] = deque()
        self.malformed = 0
        self.last_error = ""

    def receive_data(self, data: bytes) -> None:
        self._buffer += data
        buffer = self._buffer
        pos = 0
        while len(buffer) - pos >= 2:
            (length,) = _LENGTH.unpack_from(buffer, pos)
            end = pos + 2 + length
            if end > len(buffer):
                break
            body = bytes(buffer[pos + 2 : end])
            pos = end
            try:
                self._messages.append(decode_body(body, self._accepted))
            except MalformedFrame as exc:
                self.malformed += 1
                self.last_error = str(exc)
        if pos:
            del buffer[:pos]

    def next_message(self) -> Message | None:
        return self._messages.popleft() if self._messages else None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame waiting for more data."""
        return len(self._buffer)
