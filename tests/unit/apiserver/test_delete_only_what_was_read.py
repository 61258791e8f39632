"""kvpn's deletes with a uid precondition (the journal replay's) against the sandbox API server:
an object re-created under the same name since it was read is left alone."""

from __future__ import annotations

import asyncio

import kubernetes.client as k8s

from kvpn.cluster.intercept_api import KubeClients
from tests.unit.apiserver.conftest import RunningServer


def _kube(server: RunningServer) -> KubeClients:
    api = server.client()
    return KubeClients(api, k8s.CoreV1Api(api), k8s.AppsV1Api(api))


def _pod(name: str) -> k8s.V1Pod:
    container = k8s.V1Container(name="c", image="busybox")
    return k8s.V1Pod(metadata=k8s.V1ObjectMeta(name=name), spec=k8s.V1PodSpec(containers=[container]))


def _service(name: str) -> k8s.V1Service:
    port = k8s.V1ServicePort(port=80)
    return k8s.V1Service(metadata=k8s.V1ObjectMeta(name=name), spec=k8s.V1ServiceSpec(ports=[port]))


def test_a_pod_recreated_since_it_was_read_is_left_alone(server: RunningServer) -> None:
    kube = _kube(server)
    first = kube.core.create_namespaced_pod("default", _pod("replay-p")).metadata.uid
    assert asyncio.run(kube.delete_pod("default", "replay-p", uid=first))
    second = kube.core.create_namespaced_pod("default", _pod("replay-p")).metadata.uid
    assert second != first
    assert not asyncio.run(kube.delete_pod("default", "replay-p", uid=first))  # not that one
    assert kube.core.read_namespaced_pod("replay-p", "default").metadata.uid == second
    assert asyncio.run(kube.delete_pod("default", "replay-p", uid=second))
    assert not asyncio.run(kube.delete_pod("default", "replay-p", uid=second))  # gone


def test_a_service_recreated_since_it_was_read_is_left_alone(server: RunningServer) -> None:
    kube = _kube(server)
    first = kube.core.create_namespaced_service("default", _service("replay-s")).metadata.uid
    assert asyncio.run(kube.delete_service("default", "replay-s", uid=first))
    second = kube.core.create_namespaced_service("default", _service("replay-s")).metadata.uid
    assert not asyncio.run(kube.delete_service("default", "replay-s", uid=first))
    assert kube.core.read_namespaced_service("replay-s", "default").metadata.uid == second
    assert asyncio.run(kube.delete_service("default", "replay-s"))  # without: by name
    assert not asyncio.run(kube.delete_service("default", "replay-s"))
