"""What route planning needs from a kubeconfig: the context, its namespace, the API server
URL and the API server's IPv4 addresses (resolved with getaddrinfo).

Loading uses the official client's loader (``kubernetes.config``), so merged ``KUBECONFIG``
lists, exec plugins and certificates behave as everywhere else.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any
from urllib.parse import urlsplit

__all__ = ["KubeconfigError", "KubeTarget", "load_kube_target", "resolve_host"]


class KubeconfigError(ValueError):
    """The kubeconfig, the context or the API server's name is unusable (one-line message)."""


@dataclass(frozen=True)
class KubeTarget:
    context: str
    #: The context's namespace, or "default".
    namespace: str
    server: str
    host: str
    port: int
    #: ``proxy-url`` of the cluster, if any: (host, port). The laptop talks to it, not to
    #: ``host``, so it must never be routed into the tunnel either.
    proxy: tuple[str, int] | None
    #: A ``kubernetes.client.Configuration`` for this context (Any: the client is untyped).
    configuration: Any


def load_kube_target(kubeconfig: str | None, context: str | None) -> KubeTarget:
    """Load a context from a kubeconfig file (``None``: ``$KUBECONFIG`` or ~/.kube/config)."""
    import yaml
    from kubernetes import client
    from kubernetes.config import kube_config
    from kubernetes.config.config_exception import ConfigException

    load_errors = (
        ConfigException,
        OSError,
        ValueError,
        TypeError,
        AttributeError,
        KeyError,
        yaml.YAMLError,
    )
    where = kubeconfig or "the default kubeconfig"
    try:
        contexts, current = kube_config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
            kubeconfig
        )
    except load_errors as exc:
        raise KubeconfigError(f"cannot read {where}: {_one_line(exc)}") from None
    entries = [c for c in contexts or [] if isinstance(c, dict)]
    names = [c.get("name") for c in entries]
    chosen_name = context or (current.get("name") if isinstance(current, dict) else None)
    if not chosen_name:
        raise KubeconfigError(f"{where} has no current context; pass --context")
    if chosen_name not in names:
        known = ", ".join(str(n) for n in names) or "none"
        raise KubeconfigError(f"unknown context {chosen_name!r} in {where} (known: {known})")
    chosen = next(c for c in entries if c.get("name") == chosen_name)
    body = chosen.get("context")
    namespace = (body.get("namespace") if isinstance(body, dict) else None) or "default"

    configuration = client.Configuration()
    try:
        kube_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig,
            context=chosen_name,
            client_configuration=configuration,
            persist_config=False,
        )
    except load_errors as exc:
        raise KubeconfigError(
            f"cannot load context {chosen_name!r} from {where}: {_one_line(exc)}"
        ) from None
    server = str(configuration.host or "")
    parts = urlsplit(server)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host:
        raise KubeconfigError(f"context {chosen_name!r} has no usable server URL ({server!r})")
    if port is None:
        port = 80 if parts.scheme == "http" else 443
    proxy: tuple[str, int] | None = None
    proxy_url = getattr(configuration, "proxy", None)
    if proxy_url:
        proxy_parts = urlsplit(str(proxy_url))
        try:
            proxy_port = proxy_parts.port
        except ValueError:
            proxy_port = None
        if proxy_parts.hostname:
            proxy = (proxy_parts.hostname, proxy_port or 1080)
    return KubeTarget(chosen_name, namespace, server, host, port, proxy, configuration)


Resolver = Callable[..., list[Any]]


def resolve_host(
    host: str, port: int = 443, *, resolver: Resolver = socket.getaddrinfo
) -> tuple[IPv4Address, ...]:
    """Every IPv4 address of ``host`` (a literal is returned as is), in resolver order."""
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if isinstance(literal, IPv4Address):
        return (literal,)
    if literal is not None:
        raise KubeconfigError(f"API server {host} is IPv6; only IPv4 is routed for now")
    try:
        infos = resolver(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise KubeconfigError(
            f"cannot resolve the API server {host}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    found: list[IPv4Address] = []
    for info in infos:
        try:
            address = IPv4Address(info[4][0])
        except (ValueError, IndexError, TypeError):
            continue
        if address not in found:
            found.append(address)
    if not found:
        raise KubeconfigError(f"the API server {host} has no IPv4 address")
    return tuple(found)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."
