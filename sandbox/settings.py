"""The sandbox's settings file (``sandbox.json``) and its kubeconfigs."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import yaml

from sandbox.config import SandboxConfig


def dump_settings(config: SandboxConfig, token: str) -> dict[str, Any]:
    return {
        "name": config.name,
        "pod_cidr": str(config.pod_cidr),
        "service_cidr": str(config.service_cidr),
        "apiserver_address": str(config.apiserver_address),
        "apiserver_port": config.apiserver_port,
        "cluster_domain": config.cluster_domain,
        "state_root": str(config.state_root),
        "netns_prefix_base": config.netns_prefix_base,
        "laptop_routes_pods": config.laptop_routes_pods,
        "token": token,
    }


def load_settings(data: dict[str, Any]) -> tuple[SandboxConfig, str]:
    config = SandboxConfig(
        name=data["name"],
        pod_cidr=ipaddress.IPv4Network(data["pod_cidr"]),
        service_cidr=ipaddress.IPv4Network(data["service_cidr"]),
        apiserver_address=ipaddress.IPv4Address(data["apiserver_address"]),
        apiserver_port=int(data["apiserver_port"]),
        cluster_domain=data["cluster_domain"],
        state_root=Path(data["state_root"]),
        netns_prefix_base=data.get("netns_prefix_base", "kvpn-"),
        laptop_routes_pods=bool(data.get("laptop_routes_pods", False)),
    )
    return config, str(data["token"])


def kubeconfig(config: SandboxConfig, token: str, *, namespace: str = "default") -> str:
    """A kubeconfig for the sandbox's API server, with the bearer token inline."""
    cluster = f"kvpn-sandbox-{config.name}"
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": {"server": config.apiserver_url}}],
        "users": [{"name": f"{cluster}-admin", "user": {"token": token}}],
        "contexts": [
            {
                "name": cluster,
                "context": {
                    "cluster": cluster,
                    "user": f"{cluster}-admin",
                    "namespace": namespace,
                },
            }
        ],
        "current-context": cluster,
        "preferences": {},
    }
    return str(yaml.safe_dump(doc, sort_keys=False))
