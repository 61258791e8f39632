"""Find the cluster's pod and service CIDRs from the API server.

- Service CIDR: ask the API server to create (dry run) a Service with a ClusterIP that cannot be
  valid; a real API server refuses it naming the valid range ("The range of valid IPs is
  10.96.0.0/12"). Fallback: the smallest prefix covering the ClusterIPs that exist.
- Pod CIDRs: ``node.spec.podCIDRs``; fallback: the smallest prefix covering the IPs of pods that
  do not use the host network (their IPs are node addresses, not cluster CIDRs).

The parsing and covering logic is pure; the Kubernetes calls are in ``discover``.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

RANGE_RE = re.compile(r"[Tt]he range of valid IPs is ([0-9a-fA-F.:/]+)")
# An address no service CIDR contains in practice: link-local, refused by every API server.
PROBE_CLUSTER_IP = "169.254.254.254"

Network = ipaddress.IPv4Network


@dataclass(frozen=True)
class ClusterCidrs:
    pod_cidrs: tuple[Network, ...]
    service_cidrs: tuple[Network, ...]
    notes: tuple[str, ...] = field(default=())

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


def _message(exc: Any) -> str:
    body = getattr(exc, "body", None) or ""
    try:
        return str(json.loads(body).get("message", body))
    except (ValueError, AttributeError):
        return str(body or exc)


def discover(core_v1: Any, namespace: str) -> ClusterCidrs:
    """Ask the cluster through an official ``CoreV1Api`` client (blocking calls)."""
    from kubernetes.client.exceptions import ApiException

    notes: list[str] = []
    service: list[Network] = []
    probe = {
        "metadata": {"generateName": "kvpn-cidr-probe-"},
        "spec": {"clusterIP": PROBE_CLUSTER_IP, "ports": [{"port": 443}]},
    }
    try:
        core_v1.create_namespaced_service(namespace, probe, dry_run="All")
        notes.append("the API server accepted a probe ClusterIP; service CIDR not named")
    except ApiException as exc:
        found = service_cidr_from_error(_message(exc))
        if found is not None:
            service.append(found)
        else:
            notes.append(f"service CIDR probe refused without a range ({exc.status})")
    if not service:
        try:
            items = core_v1.list_service_for_all_namespaces().items
        except ApiException:
            items = core_v1.list_namespaced_service(namespace).items
            notes.append("services listed in this namespace only")
        cover = covering_prefix(
            s.spec.cluster_ip for s in items if s.spec.cluster_ip not in (None, "", "None")
        )
        if cover is not None:
            service.append(cover)

    pods: list[Network] = []
    try:
        for node in core_v1.list_node().items:
            for cidr in node.spec.pod_cid_rs or (
                [node.spec.pod_cidr] if node.spec.pod_cidr else []
            ):
                net = ipaddress.ip_network(cidr, strict=False)
                if isinstance(net, ipaddress.IPv4Network) and net not in pods:
                    pods.append(net)
    except ApiException as exc:
        notes.append(f"nodes not readable ({exc.status}); pod CIDR derived from pod IPs")
    if not pods:
        try:
            items = core_v1.list_pod_for_all_namespaces().items
        except ApiException:
            items = core_v1.list_namespaced_pod(namespace).items
        cover = covering_prefix(
            p.status.pod_ip for p in items if p.status.pod_ip and not p.spec.host_network
        )
        if cover is not None:
            pods.append(cover)
    return ClusterCidrs(tuple(pods), tuple(service), tuple(notes))


def exclude(networks: Iterable[Network], excluded: Iterable[Network]) -> list[Network]:
    """``networks`` minus ``excluded``, as the minimal list of prefixes."""
    result = list(ipaddress.collapse_addresses(networks))
    for ex in excluded:
        nxt: list[Network] = []
        for net in result:
            if not net.overlaps(ex):
                nxt.append(net)
            elif ex.supernet_of(net):
                continue
            else:
                nxt.extend(net.address_exclude(ex))
        result = nxt
    return sorted(ipaddress.collapse_addresses(result))
