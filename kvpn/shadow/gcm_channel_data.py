"""Channel data through an AES-GCM asyncssh connection, sent and received with few copies.

asyncssh builds an ``SSH_MSG_CHANNEL_DATA`` packet by concatenation: the channel's ``write``
copies the data into its send buffer and slices a packet's worth off it, ``String()``
prefixes the length, the channel prefixes its number, the connection prefixes the message
type, then the padding length, appends the padding, encrypts, splits the tag off and joins
header, ciphertext and tag again - eleven copies of every byte on its way to the socket, and
a ``getrandom()`` per packet. Receiving, it appends each read to a bytes buffer, slices the
packet off, joins its pieces and the tag for the decryption, slices the payload and then the
string out of the plaintext: seven more. perf on ``kvpn connect`` during an upload:
``memmove`` took more of its CPU than AES-GCM did.

:func:`send_channel_data` puts the same packets on the wire - the plaintext packet is the
one asyncssh would build, given the same padding (``tests/unit/shadow/test_gcm_channel_data.py``
checks this against the installed asyncssh) - by copying each piece of data once into a
reused plaintext buffer and encrypting it (``AESGCM.encrypt_into``) straight into the buffer
handed to the transport; the packets of one write leave together (one ``writev()`` with
uvloop). Padding comes from a pool of ``os.urandom`` bytes. What asyncssh
has queued (written while the window was short) leaves the same way when the peer widens the
window, on channels given :func:`fast_flush`.

:class:`GcmChannelDataReader` sits between the socket and asyncssh's ``data_received``
(:class:`kvpn.shadow.ssh_wire.CoalescingProtocol`): it decrypts each complete packet itself
(``AESGCM.decrypt_into``), hands a channel's data to the channel exactly as asyncssh's
``_process_data`` would (``_accept_data``: window, pause buffering, window adjusts), and
gives every other packet to asyncssh unchanged, still encrypted (asyncssh decrypts it again;
those are the few small control packets). Sessions that say ``accepts_bytearray_data`` get
the decrypted buffer itself, with the packet framing cut off in place (no copy); others get
``bytes``, as from asyncssh.

Both take their path only while asyncssh would do the same thing: key exchange and
authentication done, no rekey due (checked before every packet) or in progress, no
compression, asyncssh's own AES-GCM classes, debug logging below level 2 (asyncssh logs each
data packet from 2 on), a channel that is open with asyncssh's own data handling (its class
overrides neither ``write`` nor the data handling). Anything else - also an asyncssh or
cryptography whose internals do not look as expected - goes through asyncssh. Both update
asyncssh's private state (sequence numbers, IVs, rekey byte count, channel windows) exactly
as asyncssh's own code does; a packet that does not decrypt or parse is given to asyncssh,
which fails the connection with its own error.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, cast

# asyncssh's own classes: the fast paths are taken only for exactly these
from asyncssh import DisconnectError
from asyncssh.channel import SSHChannel
from asyncssh.crypto.cipher import GCMCipher
from asyncssh.encryption import GCMEncryption
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "COUNTERS",
    "FastPathCounters",
    "GcmChannelDataReader",
    "fast_flush",
    "feed_in_pieces",
    "send_channel_data",
]

MSG_CHANNEL_DATA = 94  # RFC 4254
GCM_TAG_LENGTH = 16
LENGTH_FIELD = 4
DATA_HEADER = 10  # padding length, message type, recipient channel, string length
MIN_PADDING = 4  # RFC 4253 section 6
PADDING_POOL = 4096  # bytes of os.urandom() drawn at a time for packet padding
DATA_LOG_LEVEL = 2  # asyncssh logs each data write/receipt from this debug level on
SEQUENCE_MASK = 0xFFFFFFFF

_HAS_INTO = hasattr(AESGCM, "encrypt_into") and hasattr(AESGCM, "decrypt_into")
_STATE_ERRORS = (AttributeError, KeyError, TypeError)


class FastPathCounters:
    """Packets that took the fast paths, and what went through asyncssh instead."""

    __slots__ = ("handed_to_asyncssh", "packets_received", "packets_sent", "writes_to_asyncssh")

    def __init__(self) -> None:
        self.packets_sent = 0
        self.writes_to_asyncssh = 0  # send_channel_data calls (or their rest) via chan.write
        self.packets_received = 0
        self.handed_to_asyncssh = 0  # packets (or reads, outside the fast path) given over


COUNTERS = FastPathCounters()


class _Aead:
    """One AESGCM object per key: asyncssh makes new key bytes at every rekey."""

    __slots__ = ("aead", "key")

    def __init__(self) -> None:
        self.key: bytes | None = None
        self.aead: AESGCM | None = None

    def for_key(self, key: bytes) -> AESGCM:
        if key is not self.key or self.aead is None:
            self.aead = AESGCM(key)
            self.key = key
        return self.aead


def _debug_logging(conn: Any) -> bool:
    return bool(conn.logger._debug_level >= DATA_LOG_LEVEL)


def _rekey_due(conn: Any) -> bool:
    return bool(
        conn._rekey_bytes_sent >= conn._rekey_bytes
        or (conn._rekey_seconds and time.monotonic() >= conn._rekey_time)
    )


def _gcm(encryption: Any) -> bool:
    return type(encryption) is GCMEncryption and type(encryption._cipher) is GCMCipher


def _connection_ready(conn: Any, encryption: Any) -> bool:
    return bool(
        conn._transport is not None
        and conn._auth_complete
        and conn._kex_complete
        and _gcm(encryption)
        and not _debug_logging(conn)
    )


# ---------------------------------------------------------------------------- sending


class _Sender:
    """Per connection: the AEAD object, the plaintext buffer and the padding pool."""

    __slots__ = ("aead", "padding", "padding_at", "plaintext")

    def __init__(self) -> None:
        self.aead = _Aead()
        self.plaintext = bytearray()  # reused: encrypt_into has read it before we return
        self.padding = b""
        self.padding_at = 0

    def take_padding(self, count: int) -> bytes:
        at = self.padding_at
        if at + count > len(self.padding):
            self.padding = os.urandom(PADDING_POOL)
            at = 0
        self.padding_at = at + count
        return self.padding[at : at + count]


def _sender(conn: Any) -> _Sender:
    sender: _Sender | None = getattr(conn, "_kvpn_gcm_sender", None)
    if sender is None:
        sender = _Sender()
        conn._kvpn_gcm_sender = sender
    return sender


def _can_send(conn: Any) -> bool:
    return bool(
        _connection_ready(conn, conn._send_encryption)
        and not conn._compressor
        and not _rekey_due(conn)
    )


def _send_packets(chan: Any, conn: Any, data: memoryview) -> int:
    """Send *data* (within the channel's window) as data packets; the number of bytes
    sent, fewer than all when a rekey falls due (checked before every packet, as asyncssh's
    send_packet does) or the connection changes."""
    sender = _sender(conn)
    cipher = conn._send_encryption._cipher
    aead = sender.aead.for_key(cipher._key)
    packet_size = chan._send_pktsize
    header_length = conn._send_enchdrlen
    block_size = conn._send_blocksize
    channel_number = chan._send_chan.to_bytes(4, "big")
    length = len(data)
    offset = 0
    wires: list[bytearray] = []
    if packet_size <= 0:  # a peer that allows no data: asyncssh's problem, not ours
        return 0
    while offset < length:
        if _rekey_due(conn) or not conn._kex_complete or conn._transport is None:
            break
        piece = data[offset : offset + packet_size]
        count = len(piece)
        payload_length = DATA_HEADER - 1 + count  # type, channel, string length, data
        padding = -(header_length + payload_length) % block_size
        if padding < MIN_PADDING:
            padding += block_size
        packet_length = 1 + payload_length + padding
        if len(sender.plaintext) < packet_length:
            sender.plaintext = bytearray(packet_length)
        plaintext = memoryview(sender.plaintext)[:packet_length]
        plaintext[0] = padding
        plaintext[1] = MSG_CHANNEL_DATA
        plaintext[2:6] = channel_number
        plaintext[6:10] = count.to_bytes(4, "big")
        plaintext[DATA_HEADER : DATA_HEADER + count] = piece
        plaintext[DATA_HEADER + count :] = sender.take_padding(padding)
        header = packet_length.to_bytes(LENGTH_FIELD, "big")
        wire = bytearray(LENGTH_FIELD + packet_length + GCM_TAG_LENGTH)
        wire[:LENGTH_FIELD] = header
        aead.encrypt_into(cipher._iv, plaintext, header, memoryview(wire)[LENGTH_FIELD:])
        cipher._update_iv()
        chan._send_window -= count
        wires.append(wire)
        conn._send_seq = (conn._send_seq + 1) & SEQUENCE_MASK
        conn._rekey_bytes_sent += packet_length
        COUNTERS.packets_sent += 1
        offset += count
    transport = conn._transport
    if transport is not None:
        try:  # one writev() for the lot with uvloop (kvpn's CoalescingTransport passes it on)
            transport.writelines(wires)
        except ConnectionError:  # as asyncssh's _send
            pass
    return offset


def send_channel_data(chan: Any, data: bytes | bytearray | memoryview) -> None:
    """Write *data* to asyncssh channel *chan*: like ``chan.write(data)``, with one copy of
    the data when it can (see the module docstring)."""
    length = len(data)
    try:
        conn = chan._conn
        fast = bool(
            _HAS_INTO
            and isinstance(chan, SSHChannel)  # not a wrapper such as asyncssh's line editor
            and type(chan).write is SSHChannel.write  # nor a channel that frames its data
            and length
            and conn is not None
            and chan._send_state == "open"
            and not chan._send_buf
            and chan._send_window >= length
            and chan._send_chan is not None
            and chan._encoding is None
            and _can_send(conn)
        )
    except _STATE_ERRORS:
        fast = False
    if not fast:
        COUNTERS.writes_to_asyncssh += 1
        chan.write(data)  # queued; a channel with fast_flush() still sends it fast
        return
    with memoryview(data) as view:
        sent = _send_packets(chan, conn, view)
        if sent < length:
            COUNTERS.writes_to_asyncssh += 1
            chan.write(view[sent:])  # a rekey fell due: asyncssh starts it, queues the rest


def fast_flush(chan: Any) -> None:
    """Make asyncssh channel *chan* send what it has queued (data written while its window
    was short, flushed when the peer widens it) as :func:`send_channel_data` does; asyncssh's
    own flush then does the rest (extended data, what is left at a rekey, a pending EOF or
    close). Without asyncssh's ``_flush_send_buf``, nothing changes."""
    original = getattr(chan, "_flush_send_buf", None)
    if (
        original is None
        or not isinstance(chan, SSHChannel)
        or type(chan)._flush_send_buf is not SSHChannel._flush_send_buf
    ):
        return

    def flush_send_buf() -> None:
        try:
            conn = chan._conn
            fast = bool(
                _HAS_INTO and conn is not None and chan._send_chan is not None and _can_send(conn)
            )
        except _STATE_ERRORS:
            fast = False
        while fast and chan._send_buf and chan._send_window:
            buf, datatype = chan._send_buf[0]
            if datatype is not None:
                break
            count = min(len(buf), chan._send_window)
            with memoryview(buf) as view:
                sent = _send_packets(chan, conn, view[:count])
            chan._send_buf_len -= sent
            if sent == len(buf):
                del chan._send_buf[0]
            else:
                try:
                    del buf[:sent]  # O(1) at the front of a bytearray
                except BufferError:
                    chan._send_buf[0] = (buf[sent:], datatype)
            if sent < count:
                break  # a rekey fell due
        original()

    setattr(chan, "_flush_send_buf", flush_send_buf)  # noqa: B010 - see ssh_wire.watch_peer_eof


# ---------------------------------------------------------------------------- receiving


def feed_in_pieces(
    feed: Callable[[bytes], None], data: bytes | bytearray | memoryview, size: int
) -> None:
    """Hand *data* to asyncssh's ``data_received`` (*feed*) in pieces of at most *size*: its
    input buffer costs a copy of what it holds per packet. It only appends what it is given
    to a bytes buffer, so views of *data* save a copy."""
    if len(data) <= size:
        feed(cast(bytes, data))
        return
    view = memoryview(data)
    for start in range(0, len(view), size):
        feed(cast(bytes, view[start : start + size]))


class GcmChannelDataReader:
    """What the socket reads goes through :meth:`data_received` to asyncssh connection
    *conn*, whose ``data_received`` is *feed*; channel data packets are decrypted and
    delivered here (see the module docstring). *feed_size* cuts what goes to asyncssh into
    pieces (its input buffer is quadratic in the size of a read)."""

    def __init__(self, conn: Any, feed: Callable[[bytes], None], *, feed_size: int) -> None:
        self._conn = conn
        self._feed = feed
        self._feed_size = max(1, feed_size)
        self._pending = bytearray()  # the start of a packet not complete yet (ours, not asyncssh's)
        self._aead = _Aead()

    def data_received(self, data: bytes) -> None:
        conn = self._conn
        if not self._ready(conn):
            self._give_all(data)
            return
        conn._reset_keepalive_timer()  # as asyncssh does for every read
        taken = conn._inpbuf  # asyncssh is at a packet boundary: what it holds starts one
        if taken:
            conn._inpbuf = b""
            self._pending[:0] = taken
        if self._pending:
            self._pending += data
            self._process(self._pending, owned=True)
        else:
            self._process(data, owned=False)

    # ------------------------------------------------------------------------ helpers

    def _ready(self, conn: Any) -> bool:
        try:
            return bool(
                _HAS_INTO
                and conn._recv_handler == conn._recv_pkthdr
                and _connection_ready(conn, conn._recv_encryption)
                and not conn._decompressor
            )
        except _STATE_ERRORS:
            return False

    def _give(self, data: bytes | bytearray | memoryview) -> None:
        feed_in_pieces(self._feed, data, self._feed_size)

    def _give_all(self, data: bytes | bytearray | memoryview) -> None:
        """Give what is pending and *data* to asyncssh."""
        COUNTERS.handed_to_asyncssh += 1
        if self._pending:
            pending, self._pending = self._pending, bytearray()
            self._give(pending)
        if data:
            self._give(data)

    def _process(self, buffer: bytes | bytearray, *, owned: bool) -> None:
        """Deliver the complete packets at the start of *buffer* (``_pending`` itself when
        *owned*); keep the incomplete rest for the next read, or give all that is left to
        asyncssh once the fast path stops applying."""
        conn = self._conn
        view = memoryview(buffer)
        end = len(view)
        at = 0
        stopped = False
        try:
            while end - at >= LENGTH_FIELD:
                if not self._ready(conn):
                    stopped = True
                    break
                length = int.from_bytes(view[at : at + LENGTH_FIELD], "big")
                if length > conn._max_recv_pktlen or length < DATA_HEADER:
                    stopped = True  # asyncssh fails the connection with its own error
                    break
                size = LENGTH_FIELD + length + GCM_TAG_LENGTH
                if end - at < size:
                    break
                if not self._deliver(conn, view[at : at + size], length):
                    COUNTERS.handed_to_asyncssh += 1
                    self._feed(cast(bytes, view[at : at + size]))
                at += size
        except Exception as exc:  # as asyncssh's _recv_data does with an error in a handler
            view.release()
            self._pending = bytearray()
            if isinstance(exc, DisconnectError):  # e.g. undecodable data on a text channel
                conn._send_disconnect(exc.code, exc.reason, exc.lang)
                conn._force_close(exc)
            else:
                conn.internal_error()
            return
        if owned:
            view.release()
            try:
                del self._pending[:at]  # O(1): CPython moves the start of a bytearray
            except BufferError:  # a view of it still alive somewhere: copy instead
                self._pending = self._pending[at:]
        else:
            self._pending = bytearray(view[at:])
            view.release()
        if stopped and self._pending:
            self._give_all(b"")

    def _deliver(self, conn: Any, packet: memoryview, length: int) -> bool:
        """Decrypt one complete packet; deliver it if it is data for a channel asyncssh
        would deliver it to. False: asyncssh must have it (nothing was changed)."""
        cipher = conn._recv_encryption._cipher
        plaintext = bytearray(length)
        try:
            self._aead.for_key(cipher._key).decrypt_into(
                cipher._iv, packet[LENGTH_FIELD:], packet[:LENGTH_FIELD], plaintext
            )
        except InvalidTag:
            return False
        padding = plaintext[0]
        data_length = int.from_bytes(plaintext[6:10], "big")
        if (
            padding < MIN_PADDING  # asyncssh fails 0 (and accepts 1-3): it decides
            or plaintext[1] != MSG_CHANNEL_DATA
            or length - 1 - padding != DATA_HEADER - 1 + data_length  # check_end
        ):
            return False
        chan = conn._channels.get(int.from_bytes(plaintext[2:6], "big"))
        if (
            chan is None
            or chan._recv_state != "open"
            or data_length > chan._recv_window
            or type(chan)._accept_data is not SSHChannel._accept_data
        ):
            return False
        cipher._update_iv()
        conn._recv_seq = (conn._recv_seq + 1) & SEQUENCE_MASK
        conn._auth_final = True
        COUNTERS.packets_received += 1
        data: bytes | bytearray
        if getattr(chan._session, "accepts_bytearray_data", False) and chan._encoding is None:
            del plaintext[DATA_HEADER + data_length :]
            del plaintext[:DATA_HEADER]
            data = plaintext
        else:
            data = bytes(memoryview(plaintext)[DATA_HEADER : DATA_HEADER + data_length])
        chan._accept_data(data)
        return True
