"""Names and router configuration shared by ``kvpn mesh`` (control side) and the router pod.

Pure functions only: no Kubernetes, no sockets. The contract is ``docs/mesh-design.md``:

* ``mesh_service_name(S, VALUE)`` = ``kvpn-mesh-`` + first 10 hex digits of
  ``sha256(f"{S}\\n{VALUE}")``: the member Service the router dials for a request whose
  header equals ``VALUE``. The router keeps no table, it derives this name per request.
* ``router_pod_name(S)`` = ``kvpn-router-<S>``, ``standin_service_name(S)`` =
  ``<S>-kvpn-standin``. Kubernetes names used as DNS labels are at most 63 characters; when
  the plain name is longer, the service part is shortened and followed by ``-<hash8>`` of the
  full service name, so two long names never collide and the suffix stays readable.
* ``router_env(...)`` builds the pod's environment; :class:`RouterSettings` parses it back
  (the router calls :meth:`RouterSettings.from_env`). Both live here so they cannot drift.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

ROUTER_LABEL = "kvpn.dev/mesh-router"
MESH_ANNOTATION = "kvpn.dev/mesh"
MEMBER_ANNOTATION_PREFIX = "kvpn.dev/mesh-member."
DEFAULT_HEADER = "version"
MAX_NAME_LENGTH = 63

ENV_SERVICE = "KVPN_ROUTER_SERVICE"
ENV_NAMESPACE = "KVPN_ROUTER_NAMESPACE"
ENV_HEADER = "KVPN_ROUTER_HEADER"
ENV_STANDIN = "KVPN_ROUTER_STANDIN"
ENV_PORTS = "KVPN_ROUTER_PORTS"
ENV_MEMBER_DOMAIN = "KVPN_ROUTER_MEMBER_DOMAIN"

PROTOCOLS = ("TCP", "UDP")

# RFC 9110 section 5.6.2: a header field name is a token.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class MeshNameError(ValueError):
    """A service name, header name or port list cannot be used for a mesh."""


def _short_hash(text: str, length: int) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def _bounded(prefix: str, service: str, suffix: str) -> str:
    """``prefix + service + suffix`` if it fits in 63 characters, else a shortened, unique form."""
    name = f"{prefix}{service}{suffix}"
    if len(name) <= MAX_NAME_LENGTH:
        return name
    tag = "-" + _short_hash(service, 8)
    room = MAX_NAME_LENGTH - len(prefix) - len(suffix) - len(tag)
    head = service[: max(room, 0)].rstrip("-.")
    return f"{prefix}{head}{tag}{suffix}"


def mesh_service_name(service: str, value: str) -> str:
    """Name of the member Service of the developer whose mark value is ``value``."""
    return "kvpn-mesh-" + _short_hash(f"{service}\n{value}", 10)


def router_pod_name(service: str) -> str:
    """Name of the router pod of the mesh on ``service``."""
    return _bounded("kvpn-router-", service, "")


def standin_service_name(service: str) -> str:
    """Name of the stand-in Service (the original selector of ``service``)."""
    return _bounded("", service, "-kvpn-standin")


def member_domain(namespace: str) -> str:
    """Default DNS suffix of member Services: ``<namespace>.svc``."""
    return f"{namespace}.svc"


def member_host(service: str, value: str, domain: str) -> str:
    """DNS name the router dials for mark ``value``: ``<member service>.<domain>``."""
    return f"{mesh_service_name(service, value)}.{domain}"


def standin_host(service: str, namespace: str) -> str:
    """Default DNS name of the stand-in Service: ``<S>-kvpn-standin.<N>.svc``."""
    return f"{standin_service_name(service)}.{namespace}.svc"


def is_header_name(name: str) -> bool:
    """Whether ``name`` is a valid HTTP field name (RFC 9110 token)."""
    return bool(_TOKEN.match(name))


@dataclass(frozen=True, slots=True)
class RoutedPort:
    """One port the router listens on: ``port/protocol`` (``8080/TCP``)."""

    port: int
    protocol: str = "TCP"

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise MeshNameError(f"port {self.port} is out of range")
        if self.protocol not in PROTOCOLS:
            raise MeshNameError(f"protocol {self.protocol!r} is not TCP or UDP")

    @property
    def spec(self) -> str:
        return f"{self.port}/{self.protocol}"


def parse_port_spec(text: str) -> RoutedPort:
    """``"8080/TCP"`` (or ``"8080"`` = TCP) to a :class:`RoutedPort`."""
    raw = text.strip()
    number, _, protocol = raw.partition("/")
    if not number.isdigit():
        raise MeshNameError(f"port spec {text!r} is not PORT/PROTO")
    return RoutedPort(int(number), (protocol or "TCP").upper())


def parse_port_specs(text: str) -> tuple[RoutedPort, ...]:
    """A comma list of port specs; duplicates dropped, order kept; empty is an error."""
    ports: list[RoutedPort] = []
    for item in text.split(","):
        if item.strip():
            port = parse_port_spec(item)
            if port not in ports:
                ports.append(port)
    if not ports:
        raise MeshNameError("no ports given")
    return tuple(ports)


def format_port_specs(ports: Iterable[RoutedPort]) -> str:
    return ",".join(port.spec for port in ports)


@dataclass(frozen=True, slots=True)
class RouterSettings:
    """The router's configuration, as carried by its environment."""

    service: str
    namespace: str
    ports: tuple[RoutedPort, ...]
    header: str = DEFAULT_HEADER
    standin: str = ""
    member_domain: str = ""

    def __post_init__(self) -> None:
        if not self.service:
            raise MeshNameError("service name is empty")
        if not self.namespace:
            raise MeshNameError("namespace is empty")
        if not is_header_name(self.header):
            raise MeshNameError(f"header {self.header!r} is not a valid HTTP field name")
        if not self.ports:
            raise MeshNameError("no ports given")
        if not self.standin:
            object.__setattr__(self, "standin", standin_host(self.service, self.namespace))
        if not self.member_domain:
            object.__setattr__(self, "member_domain", member_domain(self.namespace))

    def member_host(self, value: str) -> str:
        return member_host(self.service, value, self.member_domain)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RouterSettings:
        """Parse ``KVPN_ROUTER_*``; raises :class:`MeshNameError` when incomplete or invalid."""
        for name in (ENV_SERVICE, ENV_NAMESPACE, ENV_PORTS):
            if not env.get(name):
                raise MeshNameError(f"{name} is not set")
        return cls(
            service=env[ENV_SERVICE],
            namespace=env[ENV_NAMESPACE],
            ports=parse_port_specs(env[ENV_PORTS]),
            header=env.get(ENV_HEADER) or DEFAULT_HEADER,
            standin=env.get(ENV_STANDIN) or "",
            member_domain=env.get(ENV_MEMBER_DOMAIN) or "",
        )

    def to_env(self) -> list[dict[str, str]]:
        """The pod ``env`` list (``[{"name": ..., "value": ...}]``)."""
        pairs = (
            (ENV_SERVICE, self.service),
            (ENV_NAMESPACE, self.namespace),
            (ENV_HEADER, self.header),
            (ENV_STANDIN, self.standin),
            (ENV_PORTS, format_port_specs(self.ports)),
            (ENV_MEMBER_DOMAIN, self.member_domain),
        )
        return [{"name": name, "value": value} for name, value in pairs]


def router_env(
    service: str,
    namespace: str,
    ports: Iterable[RoutedPort | str],
    *,
    header: str = DEFAULT_HEADER,
    standin: str | None = None,
    member_domain: str | None = None,
) -> list[dict[str, str]]:
    """Environment of the router pod for a mesh on ``service`` in ``namespace``.

    ``ports`` are :class:`RoutedPort` or ``"8080/TCP"`` strings (resolved numeric target
    ports). ``standin`` defaults to ``<S>-kvpn-standin.<N>.svc``, ``member_domain`` to
    ``<N>.svc``. Raises :class:`MeshNameError` on invalid input.
    """
    parsed = tuple(p if isinstance(p, RoutedPort) else parse_port_spec(p) for p in ports)
    settings = RouterSettings(
        service=service,
        namespace=namespace,
        ports=parse_port_specs(format_port_specs(parsed)) if parsed else (),
        header=header,
        standin=standin or "",
        member_domain=member_domain or "",
    )
    return settings.to_env()
