"""Kubernetes ``pods/portforward`` websocket framing, one forwarded port (sans-IO).

Theory of operation (subprotocol ``v4.channel.k8s.io``, binary): every websocket message
starts with one channel byte. Forwarded port *i* uses data channel ``2i`` and error channel
``2i+1``; kvpn forwards one port, so channel 0 carries the byte stream and channel 1 error
text. Before anything else the server sends, on each channel, the port number as two
little-endian bytes (normally one 3-byte message ``[ch, port & 0xff, port >> 8]``; this
decoder also accepts the prefix split across messages or followed by data). Client data
goes out as ``[0] + payload``. The protocol has no half-close: either side ends the stream
by closing the websocket. Anything on the error channel after the port prefix is an error
message (for example the kubelet's "error forwarding port 2222 to pod ...: connection
refused").

Malformed messages (empty, unknown channel) are dropped and counted; a port prefix that
names a different port is reported as an error, since the stream is not the one asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

DATA_CHANNEL = 0
ERROR_CHANNEL = 1
SUBPROTOCOL = "v4.channel.k8s.io"
_PORT_PREFIX_LEN = 2


@dataclass(frozen=True, slots=True)
class PortConfirmed:
    channel: int
    port: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    data: bytes


@dataclass(frozen=True, slots=True)
class ErrorReceived:
    message: str


PortForwardEvent = PortConfirmed | DataReceived | ErrorReceived


class PortForwardFraming:
    """Decode server messages and encode client data for a single forwarded port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._prefix: dict[int, bytearray] = {DATA_CHANNEL: bytearray(), ERROR_CHANNEL: bytearray()}
        self._confirmed: set[int] = set()
        self.malformed = 0

    @property
    def ready(self) -> bool:
        """Both channels have announced their port."""
        return len(self._confirmed) == 2

    def receive_message(self, message: bytes) -> list[PortForwardEvent]:
        if not message:
            self.malformed += 1
            return []
        channel = message[0]
        payload = message[1:]
        if channel not in self._prefix:
            self.malformed += 1
            return []
        events: list[PortForwardEvent] = []
        if channel not in self._confirmed:
            prefix = self._prefix[channel]
            take = _PORT_PREFIX_LEN - len(prefix)
            prefix += payload[:take]
            payload = payload[take:]
            if len(prefix) < _PORT_PREFIX_LEN:
                return events
            self._confirmed.add(channel)
            announced = int.from_bytes(prefix, "little")
            if announced != self.port:
                self.malformed += 1
                events.append(
                    ErrorReceived(
                        f"port-forward stream announced port {announced}, expected {self.port}"
                    )
                )
                return events
            events.append(PortConfirmed(channel, announced))
        if payload:
            if channel == DATA_CHANNEL:
                events.append(DataReceived(bytes(payload)))
            else:
                events.append(ErrorReceived(bytes(payload).decode("utf-8", "replace").strip()))
        return events

    @staticmethod
    def encode_data(payload: bytes) -> bytes:
        return bytes([DATA_CHANNEL]) + payload
