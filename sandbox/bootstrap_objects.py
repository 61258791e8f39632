"""The objects a fresh sandbox cluster starts with, as plain manifests.

Namespaces, the node, the ``default/kubernetes`` service, cluster DNS (``kube-system/kube-dns``)
and the demo workload ``default/echo``.
"""

from __future__ import annotations

from typing import Any

from sandbox.config import SandboxConfig

Obj = dict[str, Any]

ECHO_IMAGE = "kvpn-sandbox/echo:latest"
DNS_IMAGE = "kvpn-sandbox/dns:latest"
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


def namespaces() -> list[Obj]:
    return [
        {"metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}}}
        for ns in SYSTEM_NAMESPACES
    ]


def node(config: SandboxConfig) -> Obj:
    return {
        "metadata": {
            "name": config.node_name,
            "labels": {
                "kubernetes.io/hostname": config.node_name,
                "kubernetes.io/os": "linux",
                "node-role.kubernetes.io/control-plane": "",
            },
        },
        "spec": {
            "podCIDR": str(config.node_pod_cidr),
            "podCIDRs": [str(config.node_pod_cidr)],
        },
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": str(config.node_address)},
                {"type": "Hostname", "address": config.node_name},
            ],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "kubelet is posting ready status",
                }
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "bootID": "",
                "containerRuntimeVersion": "sandbox://0.1.0",
                "kernelVersion": "",
                "kubeProxyVersion": "v1.31.0",
                "kubeletVersion": "v1.31.0",
                "machineID": "",
                "operatingSystem": "linux",
                "osImage": "kvpn sandbox",
                "systemUUID": "",
            },
        },
    }


def kubernetes_service(config: SandboxConfig) -> tuple[Obj, Obj]:
    service = {
        "metadata": {
            "name": "kubernetes",
            "namespace": "default",
            "labels": {"component": "apiserver", "provider": "kubernetes"},
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": str(config.kubernetes_service_ip),
            "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}],
        },
    }
    endpoints = {
        "metadata": {"name": "kubernetes", "namespace": "default"},
        "subsets": [
            {
                "addresses": [{"ip": str(config.apiserver_address)}],
                "ports": [{"name": "https", "port": config.apiserver_port, "protocol": "TCP"}],
            }
        ],
    }
    return service, endpoints


def _deployment(
    name: str, namespace: str, labels: dict[str, str], replicas: int, container: Obj
) -> Obj:
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": dict(labels)},
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {"containers": [container], "terminationGracePeriodSeconds": 5},
            },
        },
    }


def cluster_dns(config: SandboxConfig) -> tuple[Obj, Obj]:
    labels = {"k8s-app": "kube-dns"}
    container = {
        "name": "coredns",
        "image": DNS_IMAGE,
        "env": [
            {"name": "CLUSTER_DOMAIN", "value": config.cluster_domain},
        ],
        "ports": [
            {"name": "dns", "containerPort": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
        ],
        "readinessProbe": {"tcpSocket": {"port": 53}, "periodSeconds": 1},
    }
    deployment = _deployment("coredns", "kube-system", labels, 1, container)
    service = {
        "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": dict(labels)},
        "spec": {
            "selector": dict(labels),
            "clusterIP": str(config.dns_service_ip),
            "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
            ],
        },
    }
    return deployment, service


def echo() -> tuple[Obj, Obj]:
    labels = {"app": "echo"}
    container = {
        "name": "echo",
        "image": ECHO_IMAGE,
        "env": [
            {"name": "PORT", "value": "8080"},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {
                "name": "POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            },
        ],
        "ports": [
            {"name": "http", "containerPort": 8080, "protocol": "TCP"},
            {"name": "udp-echo", "containerPort": 8080, "protocol": "UDP"},
        ],
        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
    }
    deployment = _deployment("echo", "default", labels, 2, container)
    service = {
        "metadata": {"name": "echo", "namespace": "default", "labels": dict(labels)},
        "spec": {
            "selector": dict(labels),
            "ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
                {"name": "udp-echo", "port": 8080, "protocol": "UDP", "targetPort": 8080},
            ],
        },
    }
    return deployment, service
