"""Every error the tunnel layer raises, in one hierarchy (like asyncssh's misc.py).

``TunnelError`` covers everything that stops the tunnel from coming up or keeps it from
working; ``DialError`` covers one TCP dial through a working tunnel.
"""

from __future__ import annotations


class TunnelError(Exception):
    """The SSH tunnel to the shadow agent could not be established or broke."""


class TransportError(TunnelError):
    """The byte stream under SSH could not be opened or broke."""


class PortForwardError(TransportError):
    """The API server or kubelet refused or ended the port-forward stream."""


class HostKeyMismatch(TunnelError):
    """The server did not present the pinned host key (wrong pod or a man in the middle)."""


class AuthenticationRefused(TunnelError):
    """The agent refused the session key."""


class DialError(Exception):
    """A TCP dial through the tunnel failed (base class; also used for unclassified errors)."""


class DialRefused(DialError):
    """The destination answered RST: the app should get RST|ACK."""


class DialUnreachable(DialError):
    """No route / host unreachable / unknown name: the app should get ICMP unreachable."""


class DialTimeout(DialError):
    """No answer within the connect timeout."""


class StreamReset(ConnectionResetError):
    """The far end of a TCP stream through the tunnel reset it (the agent closed the
    channel without EOF: the destination sent RST, or the agent lost its socket)."""
