"""kvpn.shadow.gcm_channel_data: channel data sent and received past asyncssh's copies.

Checked against the installed asyncssh: the packets sent are the ones asyncssh builds, data
crosses intact through arbitrary read boundaries and rekeys, every case the fast paths do
not cover falls back to asyncssh, and a tampered packet fails the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncssh
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kvpn.shadow import gcm_channel_data
from kvpn.shadow.gcm_channel_data import COUNTERS, fast_flush, send_channel_data
from kvpn.shadow.ssh_wire import CoalescingListener, SocketTunnel
from tests.unit.tunnel.helpers import tcp_server

GCM = "aes128-gcm@openssh.com"
CHACHA = "chacha20-poly1305@openssh.com"


class Collector:
    """A session (either end) that records what it gets; the server end echoes it back."""

    accepts_bytearray_data = False

    def __init__(self, *, echo: bool = False, paused: bool = False) -> None:
        self.echo = echo
        self.start_paused = paused
        self.chan: Any = None
        self.received = bytearray()
        self.types: set[type] = set()
        self.eof = asyncio.Event()
        self.progress = asyncio.Event()

    def connection_made(self, chan: Any) -> None:
        self.chan = chan
        fast_flush(chan)

    def shell_requested(self) -> bool:
        return True

    def session_started(self) -> None:
        pass

    def data_received(self, data: Any, datatype: Any) -> None:
        if self.start_paused and not self.received:  # asyncssh resumes after session_started
            self.chan.pause_reading()
        self.types.add(type(data))
        self.received += data
        self.progress.set()
        if self.echo:
            send_channel_data(self.chan, data)

    def eof_received(self) -> bool:
        self.eof.set()
        if self.echo:
            self.chan.write_eof()
        return True

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof.set()

    def signal_received(self, signal: str) -> None:
        pass

    def exit_status_received(self, status: int) -> None:
        pass

    def exit_signal_received(self, *args: Any) -> None:
        pass


class ServerSession(Collector, asyncssh.SSHServerSession):  # type: ignore[misc]
    pass


class OptInServerSession(ServerSession):
    accepts_bytearray_data = True


class ClientSession(Collector, asyncssh.SSHClientSession):  # type: ignore[misc]
    pass


@dataclass
class Pair:
    client: Any
    server_sessions: list[ServerSession] = field(default_factory=list)

    async def session(self) -> tuple[Any, ClientSession]:
        chan, session = await self.client.create_session(ClientSession, encoding=None)
        return chan, session


async def _proxy_pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    rng: random.Random,
    corrupt_at: int | None,
) -> None:
    total = 0
    try:
        while data := await reader.read(rng.choice((1, 7, 300, 4096, 20000, 70000))):
            if corrupt_at is not None and total <= corrupt_at < total + len(data):
                mutable = bytearray(data)
                mutable[corrupt_at - total] ^= 0x5A
                data = bytes(mutable)
            total += len(data)
            writer.write(data)
            await writer.drain()
            await asyncio.sleep(0)
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def rechunking_proxy(
    target: int, *, seed: int, corrupt_client_byte: int | None = None
) -> AsyncIterator[int]:
    """A TCP proxy that forwards in reads of random sizes (packets split anywhere); it can
    flip one byte of what the client sends."""
    rng = random.Random(seed)

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(
            _proxy_pipe(reader, up_writer, rng, corrupt_client_byte),
            _proxy_pipe(up_reader, writer, rng, None),
        )

    async with tcp_server(relay) as port:
        yield port


@contextlib.asynccontextmanager
async def ssh_pair(
    *,
    encryption: str = GCM,
    compression: str | None = None,
    rekey_bytes: int | None = None,
    session_class: type[ServerSession] = ServerSession,
    echo: bool = True,
    server_paused: bool = False,
    proxy_seed: int | None = None,
    corrupt_client_byte: int | None = None,
    server_encoding: str | None = None,
) -> AsyncIterator[Pair]:
    """An asyncssh client and server over kvpn's wire (CoalescingProtocol at both ends)."""
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    sessions: list[ServerSession] = []
    options: dict[str, Any] = {
        "encryption_algs": [encryption],
        "compression_algs": [compression] if compression else None,
    }
    if rekey_bytes is not None:
        options["rekey_bytes"] = rekey_bytes

    class Server(asyncssh.SSHServer):  # type: ignore[misc]
        def begin_auth(self, username: str) -> bool:
            return False  # no authentication

        def session_requested(self) -> ServerSession:
            session = session_class(echo=echo, paused=server_paused)
            sessions.append(session)
            return session

    listener = await asyncssh.listen(
        "127.0.0.1", 0, tunnel=CoalescingListener(), server_factory=Server,
        server_host_keys=[host_key], encoding=server_encoding, line_editor=False, **options,
    )  # fmt: skip
    port = listener.sockets[0].getsockname()[1]
    async with contextlib.AsyncExitStack() as stack:
        if proxy_seed is not None:
            port = await stack.enter_async_context(
                rechunking_proxy(port, seed=proxy_seed, corrupt_client_byte=corrupt_client_byte)
            )
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        client = await asyncssh.connect(
            "127.0.0.1", tunnel=SocketTunnel(sock), username="tester", known_hosts=None,
            client_keys=None, agent_path=None, **options,
        )  # fmt: skip
        try:
            yield Pair(client, sessions)
        finally:
            client.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.wait_closed(), 5)
            listener.close()
            await listener.wait_closed()


def _counters() -> tuple[int, int]:
    return COUNTERS.packets_sent, COUNTERS.packets_received


async def _round_trip(pair: Pair, payload: bytes, *, write_size: int = 65536) -> ClientSession:
    chan, session = await pair.session()
    for start in range(0, len(payload), write_size):
        send_channel_data(chan, payload[start : start + write_size])
        while chan.get_write_buffer_size() > 1 << 20:
            await asyncio.sleep(0.001)
    chan.write_eof()
    await asyncio.wait_for(session.eof.wait(), 60)
    return session


async def test_bulk_data_crosses_both_ways_on_the_fast_paths() -> None:
    payload = os.urandom(2 * 1024 * 1024 + 123)
    sent, received = _counters()
    async with ssh_pair() as pair:
        session = await _round_trip(pair, payload)
        assert bytes(session.received) == payload
        assert bytes(pair.server_sessions[0].received) == payload
    # 64 packets each way at least, all sent and decrypted by kvpn's code
    assert COUNTERS.packets_sent - sent >= 128
    assert COUNTERS.packets_received - received >= 128


async def test_packets_split_anywhere_by_reads_arrive_intact() -> None:
    payload = os.urandom(1024 * 1024 + 7)
    sent, received = _counters()
    async with ssh_pair(proxy_seed=7) as pair:
        session = await _round_trip(pair, payload, write_size=50000)
        assert bytes(session.received) == payload
    assert COUNTERS.packets_received - received >= 64


async def test_small_writes_each_become_one_packet_and_arrive_in_order() -> None:
    messages = [os.urandom(n) for n in (1, 2, 63, 64, 65, 100, 1000, 32767, 32768, 32769)]
    async with ssh_pair(proxy_seed=3) as pair:
        chan, session = await pair.session()
        for message in messages:
            sent = COUNTERS.packets_sent
            send_channel_data(chan, message)
            assert COUNTERS.packets_sent - sent == (len(message) + 32767) // 32768
        chan.write_eof()
        await asyncio.wait_for(session.eof.wait(), 30)
        assert bytes(session.received) == b"".join(messages)


async def test_sent_packets_are_the_packets_asyncssh_builds() -> None:
    async with ssh_pair(echo=False) as pair:
        chan, _session = await pair.session()
        conn = pair.client
        wire: list[bytes] = []
        transport = conn._transport
        original_write, original_writelines = transport.write, transport.writelines
        transport.write = lambda data: (wire.append(bytes(data)), original_write(data))
        transport.writelines = lambda pieces: (
            wire.extend(bytes(piece) for piece in pieces),
            original_writelines(pieces),
        )

        def plaintexts(data: bytes, *, fast: bool) -> list[bytes]:
            """Send *data* one way or the other; decrypt what went on the wire."""
            cipher = conn._send_encryption._cipher
            aead, iv = AESGCM(cipher._key), cipher._iv
            seq, window = conn._send_seq, chan._send_window
            wire.clear()
            if fast:
                send_channel_data(chan, data)
            else:
                chan.write(data)
            result = []
            for packet in wire:
                header, body = packet[:4], packet[4:]
                assert int.from_bytes(header, "big") == len(body) - 16
                result.append(aead.decrypt(iv, body, header))
                iv = iv[:4] + ((int.from_bytes(iv[4:], "big") + 1) & (2**64 - 1)).to_bytes(8, "big")
            assert conn._send_seq == (seq + len(wire)) & 0xFFFFFFFF
            assert cipher._iv == iv  # the IV moved on once per packet
            assert chan._send_window == window - len(data)
            return result

        for size in (1, 5, 100, 32768, 32769, 100000):
            data = os.urandom(size)
            theirs = plaintexts(data, fast=False)
            fast = COUNTERS.packets_sent
            ours = plaintexts(data, fast=True)
            assert COUNTERS.packets_sent - fast == len(ours)
            assert len(ours) == len(theirs)
            for mine, asyncssh_packet in zip(ours, theirs, strict=True):
                padding = asyncssh_packet[0]
                assert mine[0] == padding  # the same padding length...
                assert mine[: -padding] == asyncssh_packet[: -padding]  # ...and the same packet
                assert padding >= 4


async def test_rekeys_in_the_middle_of_a_transfer() -> None:
    payload = os.urandom(8 * 1024 * 1024)
    sent, received = _counters()
    async with ssh_pair(rekey_bytes=3 * 1024 * 1024, proxy_seed=11) as pair:
        first_key = pair.client._send_encryption._cipher._key
        session = await _round_trip(pair, payload)
        assert bytes(session.received) == payload
        assert pair.client._send_encryption._cipher._key != first_key  # keys were renewed
    # 2 x 256 packets; 2 x 96 before the first rekeys. The fast paths carried data again
    # after them (what is written during a key exchange waits in asyncssh, built by it).
    assert COUNTERS.packets_sent - sent >= 280
    assert COUNTERS.packets_received - received >= 280


def test_anything_but_an_asyncssh_channel_is_just_written_to() -> None:
    class Wrapper:  # e.g. asyncssh's line editor in front of a channel
        def __init__(self) -> None:
            self.written: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.written.append(data)

        def _flush_send_buf(self) -> None:
            pass

    wrapper = Wrapper()
    fast_flush(wrapper)
    send_channel_data(wrapper, b"through write()")
    assert wrapper.written == [b"through write()"]
    assert "_flush_send_buf" not in vars(wrapper)


@pytest.mark.parametrize(
    ("encryption", "compression"),
    [(CHACHA, None), ("aes128-ctr", None), (GCM, "zlib@openssh.com")],
)
async def test_other_ciphers_and_compression_go_through_asyncssh(
    encryption: str, compression: str | None
) -> None:
    payload = os.urandom(300 * 1024)
    sent, received = _counters()
    async with ssh_pair(encryption=encryption, compression=compression) as pair:
        session = await _round_trip(pair, payload)
        assert bytes(session.received) == payload
    assert _counters() == (sent, received)


async def test_debug_logging_of_data_goes_through_asyncssh() -> None:
    payload = os.urandom(100 * 1024)
    sent, received = _counters()
    asyncssh.set_debug_level(2)
    try:
        async with ssh_pair() as pair:
            session = await _round_trip(pair, payload)
            assert bytes(session.received) == payload
    finally:
        asyncssh.set_debug_level(1)
    assert _counters() == (sent, received)


async def test_only_sessions_that_ask_get_the_decrypted_buffer_itself() -> None:
    payload = os.urandom(200 * 1024)
    async with ssh_pair(echo=False) as pair:
        await _round_trip_one_way(pair, payload)
        assert pair.server_sessions[0].types == {bytes}
    async with ssh_pair(echo=False, session_class=OptInServerSession) as pair:
        await _round_trip_one_way(pair, payload)
        assert pair.server_sessions[0].types == {bytearray}
        assert bytes(pair.server_sessions[0].received) == payload


async def _round_trip_one_way(pair: Pair, payload: bytes) -> None:
    chan, _session = await pair.session()
    send_channel_data(chan, payload)
    chan.write_eof()
    for _ in range(500):
        if pair.server_sessions and len(pair.server_sessions[0].received) == len(payload):
            break
        await asyncio.sleep(0.01)
    assert bytes(pair.server_sessions[0].received) == payload


async def test_a_paused_session_holds_the_window_and_gets_everything_on_resume() -> None:
    payload = os.urandom(3 * 1024 * 1024)
    async with ssh_pair(echo=False, server_paused=True) as pair:
        chan, _session = await pair.session()
        send_channel_data(chan, payload)  # more than the 2 MiB window: the rest is queued
        await asyncio.sleep(0.5)
        server = pair.server_sessions[0]
        assert len(server.received) <= 32768  # paused after one packet: asyncssh holds the rest
        assert chan.get_write_buffer_size() >= len(payload) - 2 * 1024 * 1024  # no new window
        sent = COUNTERS.packets_sent
        server.chan.resume_reading()
        for _ in range(1000):
            if len(server.received) == len(payload):
                break
            await asyncio.sleep(0.01)
        assert bytes(server.received) == payload
        # the megabyte queued behind the window left on the fast path when it was widened
        assert COUNTERS.packets_sent - sent >= (len(payload) - 2 * 1024 * 1024) // 32768


async def test_queued_data_goes_through_asyncssh_without_fast_flush() -> None:
    payload = os.urandom(3 * 1024 * 1024)
    async with ssh_pair(echo=False) as pair:
        chan, session = await pair.client.create_session(asyncssh.SSHClientSession, encoding=None)
        sent = COUNTERS.packets_sent
        send_channel_data(chan, payload)  # over the window: queued, flushed by asyncssh
        for _ in range(1000):
            if pair.server_sessions and len(pair.server_sessions[0].received) == len(payload):
                break
            await asyncio.sleep(0.01)
        assert bytes(pair.server_sessions[0].received) == payload
        assert COUNTERS.packets_sent == sent


async def test_a_tampered_packet_fails_the_connection() -> None:
    payload = os.urandom(2 * 1024 * 1024)
    async with ssh_pair(echo=False, proxy_seed=5, corrupt_client_byte=600_000) as pair:
        chan, _session = await pair.session()
        with contextlib.suppress(OSError):
            send_channel_data(chan, payload)
        await asyncio.wait_for(pair.client.wait_closed(), 20)  # the server disconnected
        server = pair.server_sessions[0]
        assert len(server.received) < 600_000  # nothing from the tampered packet on


async def test_without_encrypt_into_everything_goes_through_asyncssh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gcm_channel_data, "_HAS_INTO", False)
    payload = os.urandom(100 * 1024)
    sent, received = _counters()
    async with ssh_pair() as pair:
        session = await _round_trip(pair, payload)
        assert bytes(session.received) == payload
    assert _counters() == (sent, received)


@pytest.mark.parametrize("fast", [True, False])
async def test_undecodable_text_disconnects_as_asyncssh_does(
    fast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gcm_channel_data, "_HAS_INTO", fast)
    received = COUNTERS.packets_received
    async with ssh_pair(echo=False, server_encoding="utf-8") as pair:
        chan, _session = await pair.session()
        send_channel_data(chan, b"ok \xff\xfe")
        await asyncio.wait_for(pair.client.wait_closed(), 10)  # ProtocolError: disconnected
        assert pair.server_sessions[0].received == b""
    assert (COUNTERS.packets_received > received) == fast


async def test_queued_data_stops_at_a_due_rekey_and_asyncssh_starts_it() -> None:
    async with ssh_pair(echo=False) as pair:
        chan, _session = await pair.session()
        conn = pair.client
        window, chan._send_window = chan._send_window, 0
        for i in range(200):  # queued behind a closed window, one packet each
            send_channel_data(chan, bytes([i]) * 100)
        conn._rekey_bytes = conn._rekey_bytes_sent + 1000  # due after ~8 packets
        chan._send_window = window
        chan._flush_send_buf()  # what the peer's window adjust does
        # at most one packet past the limit on the old key; asyncssh started the key exchange
        assert conn._rekey_bytes_sent < conn._rekey_bytes + 200
        assert not conn._kex_complete
        expected = b"".join(bytes([i]) * 100 for i in range(200))
        for _ in range(500):
            if len(pair.server_sessions[0].received) == len(expected):
                break
            await asyncio.sleep(0.01)
        assert bytes(pair.server_sessions[0].received) == expected


@pytest.mark.parametrize("fast", [True, False])
async def test_a_packet_without_padding_is_left_to_asyncssh(
    fast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gcm_channel_data, "_HAS_INTO", fast)
    async with ssh_pair(echo=False) as pair:
        chan, _session = await pair.session()
        await asyncio.sleep(0.05)
        conn = pair.client
        cipher = conn._send_encryption._cipher
        data = b"ABCDEF"
        plaintext = (
            bytes([0, 94]) + chan._send_chan.to_bytes(4, "big") + len(data).to_bytes(4, "big") + data
        )
        header = len(plaintext).to_bytes(4, "big")
        packet = AESGCM(cipher._key).encrypt(cipher._iv, plaintext, header)
        cipher._update_iv()
        conn._send_seq += 1
        conn._transport.write(header + packet)
        await asyncio.wait_for(pair.client.wait_closed(), 10)  # asyncssh: a decode error
        assert pair.server_sessions[0].received == b""


async def test_a_channel_class_with_its_own_write_or_flush_is_left_alone() -> None:
    async with ssh_pair(echo=False) as pair:
        chan, _session = await pair.session()
        written: list[bytes] = []

        class Framing(type(chan)):  # type: ignore[misc]  # like asyncssh's TUN channel
            def write(self, data: Any, datatype: Any = None) -> None:
                written.append(bytes(data))
                super().write(b"framed:" + bytes(data), datatype)

            def _flush_send_buf(self) -> None:
                super()._flush_send_buf()

        chan.__class__ = Framing
        del chan._flush_send_buf  # the fast flush installed by the session
        fast_flush(chan)
        assert "_flush_send_buf" not in vars(chan)
        sent = COUNTERS.packets_sent
        send_channel_data(chan, b"payload")
        assert written == [b"payload"] and COUNTERS.packets_sent == sent
        for _ in range(200):
            if pair.server_sessions[0].received == b"framed:payload":
                break
            await asyncio.sleep(0.01)
        assert pair.server_sessions[0].received == b"framed:payload"


async def test_an_oversized_packet_length_fails_the_connection() -> None:
    async with ssh_pair(echo=False) as pair:
        await pair.session()
        await asyncio.sleep(0.05)
        # a length past asyncssh's limit, then nothing more: no waiting for 64 MiB to arrive
        pair.client._transport.write((64 << 20).to_bytes(4, "big") + bytes(60))
        await asyncio.wait_for(pair.client.wait_closed(), 10)
