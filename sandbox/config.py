"""Names and addresses of one sandbox cluster, all derived from its name and CIDRs."""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?$")
NETNS_PREFIX_BASE_RE = re.compile(r"^[a-z0-9]{1,15}-$")

# The link between the laptop and the node: a /30 outside the usual cluster ranges.
LINK_NETWORK = ipaddress.IPv4Network("172.31.255.0/30")
NODE_LINK_ADDRESS = ipaddress.IPv4Address("172.31.255.1")
LAPTOP_LINK_ADDRESS = ipaddress.IPv4Address("172.31.255.2")
# "The internet" as the laptop sees it: an outside DNS server and web server held by the node.
OUTSIDE_DNS_ADDRESS = ipaddress.IPv4Address("198.18.0.53")
OUTSIDE_WEB_ADDRESS = ipaddress.IPv4Address("198.18.0.80")
APISERVER_PORT = 6443
STATE_ROOT = Path("/run/kvpn-sandbox")
NETNS_PREFIX = "kvpn-"


@dataclass(frozen=True)
class SandboxConfig:
    name: str
    pod_cidr: ipaddress.IPv4Network = field(
        default_factory=lambda: ipaddress.IPv4Network("10.244.0.0/16")
    )
    service_cidr: ipaddress.IPv4Network = field(
        default_factory=lambda: ipaddress.IPv4Network("10.96.0.0/12")
    )
    apiserver_address: ipaddress.IPv4Address = NODE_LINK_ADDRESS
    apiserver_port: int = APISERVER_PORT
    cluster_domain: str = "cluster.local"
    state_root: Path = STATE_ROOT
    # Every network namespace and /etc/netns folder of the sandbox starts with this + name + "-".
    # Tests use "kvpnt-" so that their namespaces can never be mistaken for a real sandbox's.
    netns_prefix_base: str = NETNS_PREFIX
    # Give the laptop a route to the pod CIDR via the node (off by default: reaching pods is
    # kvpn's job). The benchmark uses it for its no-tunnel baseline and for reaching sshd and
    # the shadow pod directly.
    laptop_routes_pods: bool = False

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(
                f"invalid sandbox name {self.name!r}: use 1-16 lowercase letters, digits or '-'"
            )
        if not NETNS_PREFIX_BASE_RE.match(self.netns_prefix_base):
            raise ValueError(
                f"invalid netns prefix base {self.netns_prefix_base!r}: "
                "use 1-15 lowercase letters or digits followed by '-'"
            )
        if self.pod_cidr.overlaps(self.service_cidr):
            raise ValueError(f"pod CIDR {self.pod_cidr} overlaps service CIDR {self.service_cidr}")
        for net in (self.pod_cidr, self.service_cidr):
            if net.overlaps(LINK_NETWORK) or OUTSIDE_DNS_ADDRESS in net:
                raise ValueError(f"{net} overlaps the sandbox's own link or outside networks")
        if self.pod_cidr.prefixlen > 28:
            raise ValueError(f"pod CIDR {self.pod_cidr} is too small (need /28 or larger)")
        if self.service_cidr.prefixlen > 28:
            raise ValueError(f"service CIDR {self.service_cidr} is too small (need /28 or larger)")

    # -- network namespaces ---------------------------------------------------------------

    @property
    def netns_prefix(self) -> str:
        return f"{self.netns_prefix_base}{self.name}-"

    @property
    def node_netns(self) -> str:
        return f"{self.netns_prefix}node"

    @property
    def laptop_netns(self) -> str:
        return f"{self.netns_prefix}laptop"

    def pod_netns(self, pod_uid: str) -> str:
        return f"{self.netns_prefix}pod-{hashlib.sha1(pod_uid.encode()).hexdigest()[:10]}"

    # -- addresses ------------------------------------------------------------------------

    @property
    def node_pod_cidr(self) -> ipaddress.IPv4Network:
        """The node's share of the pod CIDR (``node.spec.podCIDRs``): the first /24 or less."""
        if self.pod_cidr.prefixlen >= 24:
            return self.pod_cidr
        return next(self.pod_cidr.subnets(new_prefix=24))

    @property
    def pod_gateway(self) -> ipaddress.IPv4Address:
        """The node's address that every pod uses as its default gateway."""
        return self.node_pod_cidr.network_address + 1

    @property
    def kubernetes_service_ip(self) -> ipaddress.IPv4Address:
        return self.service_cidr.network_address + 1

    @property
    def dns_service_ip(self) -> ipaddress.IPv4Address:
        return self.service_cidr.network_address + 10

    @property
    def node_name(self) -> str:
        return f"{self.name}-control-plane"

    @property
    def node_address(self) -> ipaddress.IPv4Address:
        """The node's InternalIP, also the IP of hostNetwork pods."""
        return NODE_LINK_ADDRESS

    @property
    def apiserver_url(self) -> str:
        return f"http://{self.apiserver_address}:{self.apiserver_port}"

    # -- files ----------------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.state_root / self.name

    @property
    def kubeconfig_path(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def netns_etc_dirs(self) -> tuple[Path, ...]:
        """``/etc/netns/<ns>`` folders made for resolv.conf of the laptop and the pods."""
        return (Path("/etc/netns") / self.laptop_netns,)
