"""kvpn.tunnel.socket_splice: an app socket spliced to a real agent's direct-tcpip channel
(the data plane's relay for SSH channels): bytes, half-close, resets both ways, data the
channel held before the splice, flow control."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from kvpn.shadow.channel_ending import EndingEvent, EndingState
from kvpn.shadow.ssh_wire import watch_peer_eof
from kvpn.shadow.tcp_splice import TcpSplice
from kvpn.tunnel.socket_splice import FlowEnd, SocketSplice
from kvpn.tunnel.tcp_channel import TcpChannelSession

from .helpers import echo_server, reset_stream, running_agent, tcp_server

STEP = 20.0


@dataclass
class Counters:
    tcp_bytes_up: int = 0
    tcp_bytes_down: int = 0


@dataclass
class Spliced:
    app: socket.socket  # the application's end (blocking socket, used from a thread)
    splice: SocketSplice
    counters: Counters


@asynccontextmanager
async def spliced(port: int, *, before_splice: float = 0.0) -> AsyncIterator[Spliced]:
    """An app socket pair whose kvpn end is spliced to a channel to 127.0.0.1:port."""
    loop = asyncio.get_running_loop()
    async with running_agent() as agent:
        tunnel = await agent.connect()
        _, writer = await tunnel.open_tcp("127.0.0.1", port)
        if before_splice:
            await asyncio.sleep(before_splice)  # let the destination talk first
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        app = socket.create_connection(listener.getsockname())
        ours, _ = await loop.sock_accept(listener)
        listener.close()
        counters = Counters()
        splice = SocketSplice(writer, counters, loop)
        await loop.connect_accepted_socket(lambda: splice, ours)
        try:
            yield Spliced(app, splice, counters)
        finally:
            app.close()
            splice.reset()


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


async def test_bytes_both_ways_and_orderly_end() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    async with echo_server() as port, spliced(port) as s:

        def client() -> bytes:
            s.app.sendall(payload)
            s.app.shutdown(socket.SHUT_WR)
            return recv_all(s.app)

        echoed = await asyncio.wait_for(asyncio.to_thread(client), STEP)
        assert echoed == payload
        assert await asyncio.wait_for(s.splice.ended, STEP) is FlowEnd.ORDERLY
        assert s.counters.tcp_bytes_up == s.counters.tcp_bytes_down == len(payload)


async def test_half_closed_app_still_gets_the_reply() -> None:
    async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # until the app's FIN
        writer.write(b"reply:" + request)
        await writer.drain()
        writer.write_eof()

    async with tcp_server(reply_after_eof) as port, spliced(port) as s:

        def client() -> bytes:
            s.app.sendall(b"question")
            s.app.shutdown(socket.SHUT_WR)
            return recv_all(s.app)

        assert await asyncio.wait_for(asyncio.to_thread(client), STEP) == b"reply:question"
        assert await asyncio.wait_for(s.splice.ended, STEP) is FlowEnd.ORDERLY


async def test_a_banner_sent_before_the_splice_is_delivered() -> None:
    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hello\r\n")
        writer.write_eof()
        await reader.read()

    async with tcp_server(banner) as port, spliced(port, before_splice=0.3) as s:

        def client() -> bytes:
            data = recv_all(s.app)  # the banner, then the FIN
            s.app.shutdown(socket.SHUT_WR)
            return data

        assert await asyncio.wait_for(asyncio.to_thread(client), STEP) == b"220 hello\r\n"
        assert await asyncio.wait_for(s.splice.ended, STEP) is FlowEnd.ORDERLY


async def test_destination_reset_resets_the_app() -> None:
    async def hello_then_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(2)
        writer.write(b"hello")
        await writer.drain()
        await asyncio.sleep(0.2)
        reset_stream(writer)

    async with tcp_server(hello_then_reset) as port, spliced(port) as s:

        def client() -> tuple[bytes, type[BaseException] | None]:
            s.app.sendall(b"hi")
            received = b""
            try:
                while data := s.app.recv(100):
                    received += data
            except ConnectionResetError as exc:
                return received, type(exc)
            return received, None

        received, error = await asyncio.wait_for(asyncio.to_thread(client), STEP)
        assert received == b"hello" and error is ConnectionResetError
        assert await asyncio.wait_for(s.splice.ended, STEP) is FlowEnd.CHANNEL_RESET


async def test_app_reset_resets_the_destination() -> None:
    seen: asyncio.Future[type[BaseException] | bytes] = asyncio.get_running_loop().create_future()

    async def read_until_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = await reader.read()
        except ConnectionResetError as exc:
            seen.set_result(type(exc))
        else:
            seen.set_result(data)

    async with tcp_server(read_until_reset) as port, spliced(port) as s:
        s.app.sendall(b"x")
        await asyncio.sleep(0.2)
        s.app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.app.close()
        assert await asyncio.wait_for(s.splice.ended, STEP) is FlowEnd.APP_RESET
        assert await asyncio.wait_for(seen, STEP) is ConnectionResetError


async def test_a_slow_app_holds_the_destination_back() -> None:
    """Flow control: a destination that sends more than every buffer on the way can hold
    is held back while the app does not read, and nothing is lost."""
    total = 32 * 1024 * 1024
    sent = 0

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        chunk = b"z" * 65536
        while sent < total:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
        writer.write_eof()
        await reader.read()

    async with tcp_server(flood) as port, spliced(port) as s:
        s.app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        await asyncio.sleep(1.0)  # the app reads nothing meanwhile
        assert sent < total // 2  # held back by the windows and buffers on the way

        def client() -> int:
            count = 0
            while data := s.app.recv(1 << 20):
                count += len(data)
            s.app.shutdown(socket.SHUT_WR)
            return count

        assert await asyncio.wait_for(asyncio.to_thread(client), 60) == total
        assert await asyncio.wait_for(s.splice.ended, STEP) is FlowEnd.ORDERLY


async def test_upload_after_the_destination_finished_arrives_whole() -> None:
    """The destination sends FIN first; the app then uploads a lot and FINs: the channel
    closes only after the data and our EOF are out (else the agent resets the destination)."""
    total = 8 * 1024 * 1024
    got: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def bye_then_count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        writer.write_eof()
        await asyncio.sleep(1.0)  # reading nothing: the upload fills every buffer on the way
        count = 0
        try:
            while data := await reader.read(1 << 20):
                count += len(data)
        except ConnectionResetError:
            count = -count
        got.set_result(count)

    async with tcp_server(bye_then_count) as port, spliced(port) as s:

        def client() -> bytes:
            greeting = recv_all(s.app)
            s.app.sendall(b"u" * total)
            s.app.shutdown(socket.SHUT_WR)
            return greeting

        assert await asyncio.wait_for(asyncio.to_thread(client), 60) == b"bye"
        assert await asyncio.wait_for(got, 60) == total
        assert await asyncio.wait_for(s.splice.ended, STEP) is FlowEnd.ORDERLY


async def test_close_when_flushed_sends_the_buffered_data_and_eof_first() -> None:
    """More than the channel window is buffered when the orderly close comes: asyncssh's
    close() would drop the pending EOF (the agent resets the destination)."""
    total = 6 * 1024 * 1024  # over the 2 MiB channel window: most of it waits in our buffer
    got: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    release = asyncio.Event()

    async def slow_counter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write_eof()
        await release.wait()
        count = 0
        try:
            while data := await reader.read(1 << 20):
                count += len(data)
        except ConnectionResetError:
            count = -1
        got.set_result(count)

    async with running_agent() as agent, tcp_server(slow_counter) as port:
        tunnel = await agent.connect()
        reader, writer = await tunnel.open_tcp("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), STEP) == b""  # the destination's EOF
        writer.write(b"d" * total)
        writer.write_eof()
        assert writer.channel.get_write_buffer_size() > 0
        writer.close_when_flushed()
        release.set()
        assert await asyncio.wait_for(got, 60) == total
        assert not writer.was_reset


class FakeChannel:
    """Just what watch_peer_eof touches of an asyncssh channel."""

    def __init__(self) -> None:
        self._recv_state = "open"
        self.flushes = 0

    def _flush_recv_buf(self) -> None:
        self.flushes += 1

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self._recv_state = "closed"


class FakeDestination:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def is_closing(self) -> bool:
        return False

    def write_eof(self) -> None:
        self.calls.append("write_eof")

    def close(self) -> None:
        self.calls.append("close")

    def abort(self) -> None:
        self.calls.append("abort")

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def test_watch_peer_eof_sees_an_eof_asyncssh_holds_back() -> None:
    chan = FakeChannel()
    seen: list[bool] = []
    watch_peer_eof(chan, lambda: seen.append(True))
    chan._flush_recv_buf()  # data while open: no EOF
    assert seen == [] and chan.flushes == 1
    chan._recv_state = "eof_pending"  # what asyncssh sets before flushing, paused or not
    chan._flush_recv_buf()
    assert seen == [True] and chan.flushes == 2


async def test_the_agent_keeps_an_eof_that_a_close_overtook() -> None:
    """asyncssh, paused, replaces a pending EOF with the CLOSE that follows it: the agent's
    splice still ends in order (FIN to the destination), not with a reset."""
    splice = TcpSplice(asyncio.get_running_loop())
    chan = FakeChannel()
    dest = FakeDestination()
    splice.connection_made(chan)  # type: ignore[arg-type]
    splice._dest = dest  # type: ignore[assignment]
    splice.ending.handle(EndingEvent.SEND_EOF)  # the destination's FIN went out as our EOF
    chan._recv_state = "eof_pending"
    chan._flush_recv_buf()  # the client's EOF reached asyncssh, which holds it (paused)
    chan._recv_state = "closed"
    splice.connection_lost(None)  # the client's CLOSE: asyncssh never called eof_received
    assert "write_eof" in dest.calls and "abort" not in dest.calls
    assert splice.ending.state is EndingState.CLOSED


class FakeClientChannel(FakeChannel):
    """What asyncssh's stream session asks of a channel when it is made."""

    def get_connection(self) -> None:
        return None

    def get_encoding(self) -> tuple[None, str]:
        return None, "strict"

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def get_recv_window(self) -> int:
        return 2 * 1024 * 1024

    def get_read_datatypes(self) -> set[int]:
        return set()

    def get_write_datatypes(self) -> set[int]:
        return set()


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[object] = []

    def channel_data(self, data: bytes) -> None:
        self.events.append(data)

    def channel_eof(self) -> None:
        self.events.append("eof")

    def channel_closed(self, exc: Exception | None) -> None:
        self.events.append(("closed", exc))

    def channel_writable(self, writable: bool) -> None:
        self.events.append(("writable", writable))


async def test_the_client_keeps_an_eof_that_a_close_overtook() -> None:
    session = TcpChannelSession()
    chan = FakeClientChannel()
    session.connection_made(chan)  # type: ignore[arg-type]
    sink = RecordingSink()
    session.splice(sink)
    session.note_eof_sent()  # the app's FIN went out
    session.data_received(b"tail", None)
    chan._recv_state = "eof_pending"
    chan._flush_recv_buf()  # the agent's EOF reached asyncssh, which holds it (paused)
    session.connection_lost(None)  # the agent's CLOSE: asyncssh never called eof_received
    assert sink.events == [b"tail", "eof", ("closed", None)]
    assert session.ending.state is EndingState.CLOSED
