"""Find the cluster's pod and service CIDRs from the API server.

- Service CIDR: ask the API server to create (dry run) a Service with a ClusterIP that cannot be
  valid; a real API server refuses it naming the valid range ("The range of valid IPs is
  10.96.0.0/12"). Fallback: the smallest prefix covering the ClusterIPs that exist.
- Pod CIDRs: ``node.spec.podCIDRs``; fallback: the smallest prefix covering the IPs of pods that
  do not use the host network (their IPs are node addresses, not cluster CIDRs).

Every list is paginated (``limit``/``continue``), so there is no 1000-object cap. Each call that
RBAC refuses falls back to something narrower (cluster-wide -> the namespace -> nothing) and
leaves a note saying what could not be seen. Only an unreachable API server or refused
credentials stop discovery (:class:`DiscoveryError`).

The parsing and covering logic is pure; the Kubernetes calls are in ``discover``.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kvpn.routes.prefixes import exclude

__all__ = [
    "ClusterCidrs",
    "DiscoveryError",
    "covering_prefix",
    "discover",
    "exclude",
    "list_all",
    "service_cidr_from_error",
]

RANGE_RE = re.compile(r"[Tt]he range of valid IPs is ([0-9a-fA-F.:/]+)")
# An address no service CIDR contains in practice: link-local, refused by every API server.
PROBE_CLUSTER_IP = "169.254.254.254"
PAGE_SIZE = 500
#: A server that keeps answering with new continue tokens is broken; stop after this many pages.
MAX_PAGES = 10_000
REQUEST_TIMEOUT_S = 15.0

Network = ipaddress.IPv4Network


class DiscoveryError(Exception):
    """The API server could not be asked at all (unreachable, or the credentials are refused)."""


@dataclass(frozen=True)
class ClusterCidrs:
    pod_cidrs: tuple[Network, ...]
    service_cidrs: tuple[Network, ...]
    notes: tuple[str, ...] = field(default=())
    #: How each kind was found, for humans ("node.spec.podCIDRs", "the API server's range
    #: error", "covering 12 pod IPs"); empty when not found.
    pod_source: str = ""
    service_source: str = ""

    @property
    def all(self) -> tuple[Network, ...]:
        return self.pod_cidrs + self.service_cidrs


def service_cidr_from_error(message: str) -> Network | None:
    match = RANGE_RE.search(message)
    if match is None:
        return None
    try:
        net = ipaddress.ip_network(match.group(1).rstrip("."), strict=False)
    except ValueError:
        return None
    return net if isinstance(net, ipaddress.IPv4Network) else None


def covering_prefix(addresses: Iterable[str]) -> Network | None:
    """The smallest IPv4 prefix that contains every address (None if there are none)."""
    ips = []
    for text in addresses:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        if isinstance(ip, ipaddress.IPv4Address):
            ips.append(int(ip))
    if not ips:
        return None
    low, high = min(ips), max(ips)
    prefix = 32 - (low ^ high).bit_length()
    return ipaddress.IPv4Network((low, prefix), strict=False)


# -- talking to the API server -------------------------------------------------------------


@dataclass(frozen=True)
class _Refused:
    """An API call the server answered with an error status (RBAC, missing resource...)."""

    status: int
    reason: str

    def __str__(self) -> str:
        return f"{self.status} {self.reason}".strip()


def _message(exc: Any) -> str:
    body = getattr(exc, "body", None) or ""
    try:
        return str(json.loads(body).get("message", body))
    except (ValueError, AttributeError, TypeError):
        return str(body or exc)


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the API; an error status comes back as ``_Refused``; unreachable/401 raise."""
    from kubernetes.client.exceptions import ApiException

    try:
        return fn(*args, **kwargs)
    except ApiException as exc:
        status = int(getattr(exc, "status", 0) or 0)
        if status == 401:
            raise DiscoveryError(
                "the API server refused the credentials (401 Unauthorized)"
            ) from None
        if status == 0:
            raise DiscoveryError(f"cannot reach the API server: {exc.reason}") from None
        return _Refused(status, str(getattr(exc, "reason", "") or ""))
    except (OSError, _urllib3_errors()) as exc:
        raise DiscoveryError(f"cannot reach the API server: {_short(exc)}") from None


def _urllib3_errors() -> type[Exception]:
    import urllib3.exceptions

    return urllib3.exceptions.HTTPError


def _short(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    text = str(reason or exc)
    return text if len(text) <= 200 else text[:197] + "..."


def _continue_token(response: Any) -> str | None:
    meta = getattr(response, "metadata", None)
    token = getattr(meta, "var_continue", None) or getattr(meta, "_continue", None)
    return token if isinstance(token, str) and token else None


def list_all(
    list_call: Callable[..., Any],
    *args: Any,
    page_size: int = PAGE_SIZE,
    request_timeout: float = REQUEST_TIMEOUT_S,
    **kwargs: Any,
) -> list[Any] | _Refused:
    """Every item of a list call, following ``continue`` tokens page by page.

    A 410 (the continue token expired) restarts the list once from the beginning.
    """
    restarts = 0
    items: list[Any] = []
    token: str | None = None
    seen: set[str] = set()
    pages = 0
    while True:
        page_kwargs = dict(kwargs, limit=page_size, _request_timeout=request_timeout)
        if token is not None:
            page_kwargs["_continue"] = token
        response = _call(list_call, *args, **page_kwargs)
        if isinstance(response, _Refused):
            if response.status == 410 and token is not None and restarts < 1:
                restarts += 1
                items, token, seen, pages = [], None, set(), 0
                continue
            return response
        items.extend(getattr(response, "items", None) or [])
        pages += 1
        token = _continue_token(response)
        if token is None or token in seen or pages >= MAX_PAGES:
            return items
        seen.add(token)


def _attr(obj: Any, *path: str) -> Any:
    for name in path:
        if obj is None:
            return None
        obj = getattr(obj, name, None)
    return obj


# -- service CIDR ---------------------------------------------------------------------------


def _service_cidrs(
    core_v1: Any, namespace: str, notes: list[str], page_size: int, timeout: float
) -> tuple[list[Network], str]:
    probe = {
        "metadata": {"generateName": "kvpn-cidr-probe-"},
        "spec": {"clusterIP": PROBE_CLUSTER_IP, "ports": [{"port": 443}]},
    }
    from kubernetes.client.exceptions import ApiException

    try:
        core_v1.create_namespaced_service(namespace, probe, dry_run="All", _request_timeout=timeout)
        notes.append("the API server accepted a probe ClusterIP, so it did not name its range")
    except ApiException as exc:
        status = int(getattr(exc, "status", 0) or 0)
        found = service_cidr_from_error(_message(exc))
        if found is not None:
            return [found], "the API server's range error"
        if status == 401:
            raise DiscoveryError(
                "the API server refused the credentials (401 Unauthorized)"
            ) from None
        if status == 0:
            raise DiscoveryError(f"cannot reach the API server: {exc.reason}") from None
        notes.append(
            f"cannot probe the service range in namespace {namespace} "
            f"({status} {getattr(exc, 'reason', '') or ''}".rstrip()
            + "); service CIDR derived from existing ClusterIPs"
        )
    except (OSError, _urllib3_errors()) as exc:
        raise DiscoveryError(f"cannot reach the API server: {_short(exc)}") from None

    listed = list_all(
        core_v1.list_service_for_all_namespaces, page_size=page_size, request_timeout=timeout
    )
    if isinstance(listed, _Refused):
        listed_ns = list_all(
            core_v1.list_namespaced_service, namespace, page_size=page_size, request_timeout=timeout
        )
        if isinstance(listed_ns, _Refused):
            notes.append(
                f"cannot list services cluster-wide ({listed}) nor in namespace {namespace} "
                f"({listed_ns}); no service CIDR (add one with --include-cidr)"
            )
            return [], ""
        notes.append(
            f"cannot list services cluster-wide ({listed}); the service CIDR covers namespace "
            f"{namespace}'s ClusterIPs only and may be too narrow"
        )
        listed = listed_ns
    ips = [ip for s in listed for ip in _service_ips(s)]
    cover = covering_prefix(ips)
    if cover is None:
        notes.append("no ClusterIPs found; no service CIDR (add one with --include-cidr)")
        return [], ""
    return [cover], f"covering {len(ips)} ClusterIPs (approximate)"


def _service_ips(service: Any) -> list[str]:
    ips = _attr(service, "spec", "cluster_ips") or []
    single = _attr(service, "spec", "cluster_ip")
    if single and single not in ips:
        ips = [*ips, single]
    return [ip for ip in ips if isinstance(ip, str) and ip not in ("", "None")]


# -- pod CIDRs ------------------------------------------------------------------------------


def _node_facts(
    core_v1: Any, notes: list[str], page_size: int, timeout: float
) -> tuple[list[Network], set[str], bool]:
    """(pod CIDRs from node specs, node addresses, nodes readable)."""
    listed = list_all(core_v1.list_node, page_size=page_size, request_timeout=timeout)
    if isinstance(listed, _Refused):
        notes.append(f"cannot list nodes ({listed}); pod CIDR derived from pod IPs")
        return [], set(), False
    pods: list[Network] = []
    addresses: set[str] = set()
    for node in listed:
        cidrs = _attr(node, "spec", "pod_cidrs") or []
        single = _attr(node, "spec", "pod_cidr")
        if single and single not in cidrs:
            cidrs = [*cidrs, single]
        for cidr in cidrs:
            try:
                net = ipaddress.ip_network(str(cidr), strict=False)
            except ValueError:
                continue
            if isinstance(net, ipaddress.IPv4Network) and net not in pods:
                pods.append(net)
        for address in _attr(node, "status", "addresses") or []:
            text = _attr(address, "address")
            if isinstance(text, str):
                addresses.add(text)
    if not pods:
        notes.append("nodes have no spec.podCIDRs; pod CIDR derived from pod IPs")
    return pods, addresses, True


def _pod_ips(pod: Any) -> list[str]:
    if _attr(pod, "spec", "host_network"):
        return []
    ips = [_attr(entry, "ip") for entry in (_attr(pod, "status", "pod_ips") or [])]
    single = _attr(pod, "status", "pod_ip")
    if single and single not in ips:
        ips.append(single)
    return [ip for ip in ips if isinstance(ip, str) and ip]


def _pod_cidrs_from_pods(
    core_v1: Any,
    namespace: str,
    node_addresses: set[str],
    notes: list[str],
    page_size: int,
    timeout: float,
) -> tuple[list[Network], str]:
    listed = list_all(
        core_v1.list_pod_for_all_namespaces, page_size=page_size, request_timeout=timeout
    )
    if isinstance(listed, _Refused):
        listed_ns = list_all(
            core_v1.list_namespaced_pod, namespace, page_size=page_size, request_timeout=timeout
        )
        if isinstance(listed_ns, _Refused):
            notes.append(
                f"cannot list pods cluster-wide ({listed}) nor in namespace {namespace} "
                f"({listed_ns}); no pod CIDR (add one with --include-cidr)"
            )
            return [], ""
        notes.append(
            f"cannot list pods cluster-wide ({listed}); the pod CIDR covers namespace "
            f"{namespace}'s pods only and may be too narrow"
        )
        listed = listed_ns
    ips = [ip for pod in listed for ip in _pod_ips(pod) if ip not in node_addresses]
    cover = covering_prefix(ips)
    if cover is None:
        notes.append("no pod IPs found; no pod CIDR (add one with --include-cidr)")
        return [], ""
    return [cover], f"covering {len(ips)} pod IPs, hostNetwork pods left out (approximate)"


def discover(
    core_v1: Any,
    namespace: str,
    *,
    page_size: int = PAGE_SIZE,
    request_timeout: float = REQUEST_TIMEOUT_S,
) -> ClusterCidrs:
    """Ask the cluster through an official ``CoreV1Api`` client (blocking calls).

    Raises :class:`DiscoveryError` only when the API server cannot be asked at all.
    """
    notes: list[str] = []
    service, service_source = _service_cidrs(core_v1, namespace, notes, page_size, request_timeout)
    pods, node_addresses, _ = _node_facts(core_v1, notes, page_size, request_timeout)
    pod_source = "node.spec.podCIDRs" if pods else ""
    if not pods:
        pods, pod_source = _pod_cidrs_from_pods(
            core_v1, namespace, node_addresses, notes, page_size, request_timeout
        )
    return ClusterCidrs(
        tuple(pods),
        tuple(service),
        tuple(notes),
        pod_source=pod_source,
        service_source=service_source,
    )
