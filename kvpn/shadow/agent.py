"""The shadow agent: a minimal SSH server that runs in the shadow pod.

What it allows, and nothing else:

* public-key auth with exactly the session key in ``KVPN_AUTHORIZED_KEY``;
* ``direct-tcpip`` channels: the agent dials the destination itself with a timeout and
  reports failures with a machine-readable reason (:mod:`kvpn.shadow.dial_errors`); the
  socket is spliced to the channel by :mod:`kvpn.shadow.tcp_splice` (no early bytes lost,
  RST carried both ways as described in :mod:`kvpn.shadow.channel_ending`);
* one session subsystem, ``kvpn-datagrams`` (UDP and ICMP echo relay,
  :mod:`kvpn.shadow.datagram_relay`); shells, exec, PTYs, agent and X11 forwarding are refused;
* ``tcpip-forward`` (remote port forwarding) for ``kvpn exchange`` and ``kvpn preview``: the
  agent listens on the requested port on all addresses (or loopback) and carries each
  accepted connection back to the client as a ``forwarded-tcpip`` channel. Other listen
  addresses, host names and the agent's own SSH port are refused
  (:func:`remote_forward_refusal`).

The host key is generated in memory at start (the pod's root file system is read-only)
and announced on stdout as one line ``KVPN-HOST-KEY <openssh public key>``; the client reads
it from the pod log through the authenticated Kubernetes API and pins it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TextIO, cast

import asyncssh

from kvpn.shadow.datagram_relay import DatagramRelay, DatagramSockets, RelayLimits
from kvpn.shadow.dial_errors import DialFailure
from kvpn.shadow.relay_codec import SUBSYSTEM_NAME
from kvpn.shadow.ssh_wire import CoalescingListener
from kvpn.shadow.tcp_splice import dial_destination

logger = logging.getLogger(__name__)

HOST_KEY_LOG_PREFIX = "KVPN-HOST-KEY"
DEFAULT_PORT = 2222


# Addresses a remote forward may listen on: every address of the pod, or its loopback.
REMOTE_FORWARD_HOSTS = frozenset({"", "0.0.0.0", "::", "localhost", "127.0.0.1", "::1"})


def remote_forward_refusal(listen_host: str, listen_port: int, *, own_port: int) -> str | None:
    """Why a ``tcpip-forward`` request is refused, or None when the agent may listen."""
    if listen_host.lower() not in REMOTE_FORWARD_HOSTS:
        return f"listen address {listen_host!r} is not all addresses or loopback"
    if not 0 <= listen_port < 65536:
        return f"port {listen_port} is out of range"
    if listen_port != 0 and listen_port == own_port:
        return f"port {listen_port} is the agent's own SSH port"
    return None


class ConfigError(Exception):
    """The agent's environment is incomplete or invalid."""


def _env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {raw!r}")
    return value


@dataclass(frozen=True, slots=True)
class AgentConfig:
    authorized_key: str
    listen_host: str = "0.0.0.0"
    listen_port: int = DEFAULT_PORT
    dial_timeout: float = 10.0
    keepalive_interval: float = 15.0
    keepalive_count_max: int = 4
    login_timeout: float = 30.0
    relay_limits: RelayLimits = field(default_factory=RelayLimits)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AgentConfig:
        key = env.get("KVPN_AUTHORIZED_KEY", "").strip()
        if not key:
            raise ConfigError(
                "KVPN_AUTHORIZED_KEY is not set: the shadow agent needs the session's public "
                "key (OpenSSH format) and refuses to start without it"
            )
        raw_port = env.get("KVPN_LISTEN_PORT", str(DEFAULT_PORT))
        try:
            port = int(raw_port)
        except ValueError:
            raise ConfigError(f"KVPN_LISTEN_PORT={raw_port!r} is not a port number") from None
        if not 0 < port < 65536:
            raise ConfigError(f"KVPN_LISTEN_PORT={raw_port!r} is out of range")
        return cls(
            authorized_key=key,
            listen_host=env.get("KVPN_LISTEN_HOST", "0.0.0.0"),
            listen_port=port,
            dial_timeout=_env_float(env, "KVPN_DIAL_TIMEOUT", 10.0),
            keepalive_interval=_env_float(env, "KVPN_KEEPALIVE_INTERVAL", 15.0),
            relay_limits=RelayLimits(
                udp_idle_timeout=_env_float(env, "KVPN_UDP_IDLE_TIMEOUT", 60.0),
                ping_idle_timeout=_env_float(env, "KVPN_PING_IDLE_TIMEOUT", 10.0),
            ),
        )


def parse_authorized_key(text: str) -> asyncssh.SSHAuthorizedKeys:
    """Accept exactly one plain OpenSSH public key (options and certificates are refused)."""
    try:
        key = asyncssh.import_public_key(text.strip())
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise ConfigError(f"KVPN_AUTHORIZED_KEY is not an OpenSSH public key: {exc}") from None
    return asyncssh.import_authorized_keys(key.export_public_key().decode("ascii"))


class _AgentSession(asyncssh.SSHServerSession[bytes]):
    """A session channel: only the kvpn-datagrams subsystem is accepted."""

    def __init__(self, limits: RelayLimits, sockets: DatagramSockets) -> None:
        self._limits = limits
        self._sockets = sockets
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._relay: DatagramRelay | None = None

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan

    def pty_requested(self, term_type: str, term_size: object, term_modes: object) -> bool:
        return False

    def shell_requested(self) -> bool:
        return False

    def exec_requested(self, command: str) -> bool:
        logger.info("refused exec request")
        return False

    def subsystem_requested(self, subsystem: str) -> bool:
        if subsystem != SUBSYSTEM_NAME or self._chan is None or self._relay is not None:
            logger.info("refused subsystem %r", subsystem)
            return False
        self._relay = DatagramRelay(
            self._chan.write,
            loop=asyncio.get_running_loop(),
            limits=self._limits,
            sockets=self._sockets,
        )
        return True

    def data_received(self, data: bytes, datatype: int | None) -> None:
        if self._relay is not None and datatype is None:
            self._relay.receive_data(data)

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        if self._relay is not None:
            self._relay.pause_output()

    def resume_writing(self) -> None:
        if self._relay is not None:
            self._relay.resume_output()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._relay is not None:
            logger.info("datagram relay closed: %s", self._relay.counters)
            self._relay.close()
            self._relay = None
        self._chan = None


class _AgentServer(asyncssh.SSHServer):
    def __init__(
        self,
        config: AgentConfig,
        sockets: DatagramSockets,
        connections: set[asyncssh.SSHServerConnection],
        own_port: Callable[[], int] | None = None,
    ) -> None:
        self._config = config
        self._own_port = own_port or (lambda: config.listen_port)
        self._sockets = sockets
        self._connections = connections
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._connections.add(conn)
        logger.info("connection from %s", conn.get_extra_info("peername"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._connections.discard(self._conn)
            self._conn = None
        logger.info("connection closed%s", f": {exc}" if exc else "")

    def begin_auth(self, username: str) -> bool:
        return True  # always require auth; the key, not the user name, identifies the client

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def session_requested(self) -> _AgentSession:
        return _AgentSession(self._config.relay_limits, self._sockets)

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Awaitable[asyncssh.SSHTCPSession[bytes]]:
        # asyncssh accepts an awaitable session here and sends the channel-open
        # confirmation or failure when it completes (kvpn.shadow.tcp_splice).
        dial = dial_destination(
            dest_host, dest_port, self._config.dial_timeout, connection_closed=self._closed
        )
        return cast(Awaitable[asyncssh.SSHTCPSession[bytes]], dial)

    def _closed(self) -> bool:
        return self._conn is None or self._conn.is_closed()

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        refusal = remote_forward_refusal(listen_host, listen_port, own_port=self._own_port())
        if refusal is not None:
            logger.info("refused remote forward %s:%d: %s", listen_host, listen_port, refusal)
            return False
        # asyncssh listens (a bind error is reported to the client as a refusal) and opens a
        # forwarded-tcpip channel to the client for each connection it accepts.
        logger.info("remote forward: listening on %s:%d", listen_host or "*", listen_port)
        return True

    def unix_connection_requested(self, dest_path: str) -> bool:
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        return False


class ShadowAgent:
    """The SSH server, ready to :meth:`start` (tests run it in-process on 127.0.0.1)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        host_key: asyncssh.SSHKey | None = None,
        sockets: DatagramSockets | None = None,
    ) -> None:
        self._config = config
        self._authorized = parse_authorized_key(config.authorized_key)
        self._host_key = host_key or asyncssh.generate_private_key("ssh-ed25519")
        self._sockets = sockets or DatagramSockets()
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._connections: set[asyncssh.SSHServerConnection] = set()

    @property
    def host_public_key(self) -> asyncssh.SSHKey:
        return self._host_key.convert_to_public()

    def host_key_line(self) -> str:
        public = self._host_key.export_public_key().decode("ascii").strip()
        return f"{HOST_KEY_LOG_PREFIX} {public}"

    @property
    def port(self) -> int:
        if self._acceptor is None:
            raise RuntimeError("agent is not listening")
        return self._acceptor.get_port()

    async def start(self) -> None:
        config = self._config
        self._acceptor = await asyncssh.listen(
            config.listen_host,
            config.listen_port,
            server_factory=lambda: _AgentServer(
                config, self._sockets, self._connections, own_port=self._own_port
            ),
            server_host_keys=[self._host_key],
            authorized_client_keys=self._authorized,
            password_auth=False,
            kbdint_auth=False,
            gss_host=None,
            allow_pty=False,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_scp=False,
            encoding=None,
            keepalive_interval=config.keepalive_interval,
            keepalive_count_max=config.keepalive_count_max,
            login_timeout=config.login_timeout,
            tunnel=CoalescingListener(reuse_address=True),  # cheaper packets: ssh_wire
        )

    def _own_port(self) -> int:
        return self._acceptor.get_port() if self._acceptor is not None else self._config.listen_port

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def close(self) -> None:
        """Stop listening and close every client connection."""
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()
            self._acceptor = None
        connections = list(self._connections)
        for conn in connections:
            conn.close()
        for conn in connections:
            await conn.wait_closed()


async def run_agent(config: AgentConfig, out: TextIO) -> None:
    """Serve until SIGTERM/SIGINT (the agent is PID 1 in its container)."""
    agent = ShadowAgent(config)
    await agent.start()
    print(agent.host_key_line(), file=out, flush=True)
    logger.info("listening on %s:%d", config.listen_host, agent.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await agent.close()


def main(environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    logging.basicConfig(
        level=env.get("KVPN_LOG_LEVEL", "INFO").upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    try:
        config = AgentConfig.from_env(env)
        parse_authorized_key(config.authorized_key)
    except ConfigError as exc:
        print(f"kvpn shadow agent: {exc}", file=sys.stderr, flush=True)
        return 2
    from kvpn.event_loop import EventLoopChoiceError
    from kvpn.event_loop import run as run_event_loop  # uvloop when installed

    try:
        run_event_loop(run_agent(config, sys.stdout), env=env)
    except EventLoopChoiceError as exc:
        print(f"kvpn shadow agent: {exc}", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:
        print(f"kvpn shadow agent: cannot listen: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


__all__ = [
    "HOST_KEY_LOG_PREFIX",
    "AgentConfig",
    "ConfigError",
    "DialFailure",
    "ShadowAgent",
    "main",
    "parse_authorized_key",
    "remote_forward_refusal",
]
