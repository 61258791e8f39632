"""Garbage against kvpn's own parts of the SSH path (sans-IO): port-forward framing, the
channel-ending machine, the remote-forward policy, dial-failure reasons, the host-key line,
both ends of the datagram relay (fake sockets, nothing leaves the process), the wire
coalescing shims, and the agent's dial of destinations no resolver accepts. Nothing may
raise."""

from __future__ import annotations

import asyncio
import socket
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import asyncssh
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpn.cluster.shadow_pod import parse_host_key_line
from kvpn.shadow.agent import HOST_KEY_LOG_PREFIX, REMOTE_FORWARD_HOSTS, remote_forward_refusal
from kvpn.shadow.channel_ending import TERMINAL_STATES, ChannelEnding, EndingEvent, EndingState
from kvpn.shadow.datagram_relay import DatagramRelay, DatagramSockets, RelayLimits
from kvpn.shadow.dial_errors import DialFailure, format_reason, parse_reason
from kvpn.shadow.relay_codec import (
    CloseFlow,
    FlowExpired,
    PingReply,
    PingSend,
    PingUnreachable,
    UdpReceived,
    UdpSend,
    UdpUnreachable,
    encode,
)
from kvpn.shadow.ssh_wire import CoalescingProtocol, CoalescingTransport
from kvpn.shadow.tcp_splice import dial_destination
from kvpn.tunnel.client import DatagramRelay as ClientDatagramRelay
from kvpn.tunnel.portforward_framing import (
    DATA_CHANNEL,
    DataReceived,
    ErrorReceived,
    PortConfirmed,
    PortForwardFraming,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- pods/portforward framing ---------------------------------------------------------------------


@FUZZ
@given(st.integers(0, 0xFFFF), st.lists(st.binary(max_size=40), max_size=30))
def test_portforward_framing_never_raises(port: int, messages: list[bytes]) -> None:
    framing = PortForwardFraming(port)
    confirmed = 0
    for message in messages:
        for event in framing.receive_message(message):
            assert isinstance(event, PortConfirmed | DataReceived | ErrorReceived)
            if isinstance(event, PortConfirmed):
                confirmed += 1
                assert event.port == port
            if isinstance(event, DataReceived):
                assert event.data  # never an empty data event
    assert confirmed <= 2
    assert framing.malformed <= len(messages)


@FUZZ
@given(st.integers(0, 0xFFFF), st.binary(max_size=200), st.data())
def test_portforward_data_survives_any_split(port: int, payload: bytes, data: st.DataObject) -> None:
    prefix = port.to_bytes(2, "little")
    framing = PortForwardFraming(port)
    stream = prefix + payload
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    received = b""
    framing.receive_message(b"\x01" + prefix)
    prev = 0
    for cut in [*cuts, len(stream)]:
        for event in framing.receive_message(bytes([DATA_CHANNEL]) + stream[prev:cut]):
            if isinstance(event, DataReceived):
                received += event.data
            assert not isinstance(event, ErrorReceived)
        prev = cut
    assert framing.ready and received == payload


# -- channel endings ------------------------------------------------------------------------------


@given(st.lists(st.sampled_from(list(EndingEvent)), max_size=20))
def test_channel_ending_any_sequence(events: list[EndingEvent]) -> None:
    ending = ChannelEnding()
    moves = 0
    for event in events:
        before = ending.state
        after = ending.handle(event)
        assert after is ending.state
        if before in TERMINAL_STATES:
            assert after is before  # terminal states absorb everything
        moves += after is not before
    assert moves + ending.ignored == len(events)
    assert moves <= 3
    if EndingEvent.CLOSE in events:
        assert ending.ended
    assert ending.was_reset == (ending.state is EndingState.RESET)


# -- remote forward policy, dial reasons, host key line -------------------------------------------


@given(st.text(max_size=300), st.integers(-(2**40), 2**40), st.integers(0, 0xFFFF))
def test_remote_forward_policy_never_raises(host: str, port: int, own: int) -> None:
    refusal = remote_forward_refusal(host, port, own_port=own)
    allowed = host.lower() in REMOTE_FORWARD_HOSTS and 0 <= port < 65536
    allowed = allowed and not (port != 0 and port == own)
    assert (refusal is None) == allowed
    assert refusal is None or isinstance(refusal, str)


@given(st.text(max_size=200))
def test_dial_reason_parsing_never_raises(reason: str) -> None:
    assert isinstance(parse_reason(reason), DialFailure)


@given(st.sampled_from(list(DialFailure)), st.text(max_size=100))
def test_dial_reason_round_trip(failure: DialFailure, detail: str) -> None:
    assert parse_reason(format_reason(failure, detail)) is failure


HOST_KEY = asyncssh.generate_private_key("ssh-ed25519").convert_to_public()
KEY_LINE = f"{HOST_KEY_LOG_PREFIX} {HOST_KEY.export_public_key().decode().strip()}"


@given(st.lists(st.one_of(st.text(max_size=120), st.just(HOST_KEY_LOG_PREFIX + " "),
                          st.text(max_size=80).map(lambda t: f"{HOST_KEY_LOG_PREFIX} {t}")),
                max_size=12))  # fmt: skip
def test_host_key_line_from_garbage_logs(lines: list[str]) -> None:
    parse_host_key_line("\n".join(lines))  # a key or None, never an exception
    assert parse_host_key_line("\n".join([*lines, KEY_LINE])) == HOST_KEY


# -- the agent's datagram relay, fed garbage and odd but valid frames ------------------------------


class _InProcessUdp(socket.socket):
    """A datagram socket that never sends anything anywhere (connect is remembered only)."""

    def __init__(self, family: int) -> None:
        super().__init__(socket.AF_UNIX, socket.SOCK_DGRAM)

    def connect(self, address: Any) -> None:
        self.peer = address

    def send(self, data: Any, flags: int = 0) -> int:
        return len(data)


def _refused(family: int) -> socket.socket:
    raise PermissionError(13, "ping sockets are not allowed here")


addresses = st.one_of(
    st.integers(0, 2**32 - 1).map(IPv4Address), st.integers(0, 2**128 - 1).map(IPv6Address)
)
flow_ids = st.integers(0, 6)  # few ids: flows get reused, replaced, closed
client_frames = st.one_of(
    st.builds(UdpSend, flow_ids, addresses, st.integers(0, 0xFFFF), st.binary(max_size=64)),
    st.builds(PingSend, flow_ids, addresses, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
              st.binary(max_size=64)),
    st.builds(CloseFlow, flow_ids),
).map(encode)  # fmt: skip
chunks = st.lists(st.one_of(client_frames, st.binary(max_size=48)), max_size=25)


@FUZZ
@given(chunks, st.data())
def test_datagram_relay_never_raises(pieces: list[bytes], data: st.DataObject) -> None:
    async def run() -> None:
        sent: list[bytes] = []
        relay = DatagramRelay(
            sent.append,
            loop=asyncio.get_running_loop(),
            limits=RelayLimits(max_flows=3),
            sockets=DatagramSockets(udp=_InProcessUdp, ping=_refused),
        )
        wire = b"".join(pieces)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
        prev = 0
        for cut in [*cuts, len(wire)]:
            relay.receive_data(wire[prev:cut])
            prev = cut
            assert relay.flow_count <= 3
        relay.close()
        assert relay.flow_count == 0
        relay.receive_data(wire)  # after close: ignored

    asyncio.run(run())


agent_frames = st.one_of(
    st.builds(UdpReceived, flow_ids, addresses, st.integers(0, 0xFFFF), st.binary(max_size=64)),
    st.builds(UdpUnreachable, flow_ids, st.integers(0, 255)),
    st.builds(PingReply, flow_ids, addresses, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
              st.binary(max_size=64)),
    st.builds(PingUnreachable, flow_ids, st.integers(0, 255)),
    st.builds(FlowExpired, flow_ids),
).map(encode)  # fmt: skip


@FUZZ
@given(st.lists(st.one_of(agent_frames, st.binary(max_size=48)), max_size=25), st.booleans())
def test_client_relay_never_raises(pieces: list[bytes], consumer_breaks: bool) -> None:
    """The laptop's end of kvpn-datagrams: junk from the agent is counted; even a consumer
    that raises does not take the connection down."""
    events: list[object] = []

    def on_event(event: object) -> None:
        events.append(event)
        if consumer_breaks:
            raise RuntimeError("consumer bug")

    relay = ClientDatagramRelay(on_event)  # type: ignore[arg-type]
    for piece in pieces:
        relay._receive_data(piece)
    assert relay.counters.frames_received == len(events)
    assert relay.counters.callback_errors == (len(events) if consumer_breaks else 0)


# -- the wire shims (kvpn.shadow.ssh_wire) ---------------------------------------------------------


class _Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()

    def data_received(self, data: bytes) -> None:
        self.data += data


class _FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()

    def write(self, data: Any) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False


@given(st.lists(st.binary(max_size=3000), max_size=12), st.integers(1, 2048))
def test_coalescing_protocol_feeds_everything_in_order(reads: list[bytes], feed: int) -> None:
    inner = _Recorder()
    shim = CoalescingProtocol(inner, feed_size=feed)
    for read in reads:
        shim.data_received(read)
    assert bytes(inner.data) == b"".join(reads)


@given(st.lists(st.binary(max_size=200), max_size=20), st.integers(1, 128))
def test_coalescing_transport_writes_everything_in_order(writes: list[bytes], hold: int) -> None:
    async def run() -> None:
        real = _FakeTransport()
        wrapped = CoalescingTransport(real, asyncio.get_running_loop(), hold_below=hold)
        for chunk in writes:
            wrapped.write(chunk)
        await asyncio.sleep(0)  # the deferred flush of a lone small write
        await asyncio.sleep(0)
        assert bytes(real.written) == b"".join(writes)

    asyncio.run(run())


# -- the agent's dial of destinations no resolver accepts -----------------------------------------

BAD_DESTINATIONS = [
    ("a" * 300, 80),  # a label over 63 bytes
    ("a\x00b", 80),  # NUL
    ("..", 80),  # empty labels
    ("\udcff", 80),  # a lone surrogate (what undecodable bytes become)
    ("x." * 30000, 80),  # huge
    ("127.0.0.1", 70000),  # the wire carries a uint32 port
    ("127.0.0.1", 2**32 - 1),
    ("127.0.0.1", 0),
]


@pytest.mark.parametrize(("host", "port"), BAD_DESTINATIONS, ids=range(len(BAD_DESTINATIONS)))
async def test_dial_of_a_bad_destination_refuses_the_channel(host: str, port: int) -> None:
    with pytest.raises(asyncssh.ChannelOpenError) as err:
        await dial_destination(host, port, 2.0, connection_closed=lambda: False)
    assert err.value.code == asyncssh.OPEN_CONNECT_FAILED
    assert parse_reason(err.value.reason) in (DialFailure.NAME_NOT_FOUND, DialFailure.OTHER)
