"""Loading the context and API server from a kubeconfig, and resolving the server's name."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from kvpn.routes.kubeconfig import KubeconfigError, load_kube_target, resolve_host

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- name: plain
  cluster:
    server: http://172.31.255.1:6443
- name: named
  cluster:
    server: https://api.example.test
    proxy-url: http://proxy.example.test:3128
    insecure-skip-tls-verify: true
users:
- name: admin
  user:
    token: abc
contexts:
- name: sandbox
  context: {cluster: plain, user: admin, namespace: team}
- name: prod
  context: {cluster: named, user: admin}
current-context: sandbox
"""


@pytest.fixture
def kubeconfig(tmp_path: Path) -> str:
    path = tmp_path / "config"
    path.write_text(KUBECONFIG)
    return str(path)


def test_current_context(kubeconfig: str) -> None:
    target = load_kube_target(kubeconfig, None)
    assert (target.context, target.namespace) == ("sandbox", "team")
    assert (target.host, target.port, target.proxy) == ("172.31.255.1", 6443, None)
    assert target.server == "http://172.31.255.1:6443"


def test_named_context_with_default_port_namespace_and_proxy(kubeconfig: str) -> None:
    target = load_kube_target(kubeconfig, "prod")
    assert (target.context, target.namespace) == ("prod", "default")
    assert (target.host, target.port) == ("api.example.test", 443)
    assert target.proxy == ("proxy.example.test", 3128)


def test_unknown_context_is_one_line(kubeconfig: str) -> None:
    with pytest.raises(KubeconfigError, match=r"unknown context 'nope' .*known: sandbox, prod"):
        load_kube_target(kubeconfig, "nope")


def test_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(KubeconfigError, match="cannot read"):
        load_kube_target(str(tmp_path / "absent"), None)
    broken = tmp_path / "broken"
    broken.write_text("this: [is not: a kubeconfig")
    with pytest.raises(KubeconfigError):
        load_kube_target(str(broken), None)


def resolver(host: str, port: Any, family: int, kind: int) -> list[Any]:
    answers = {"api.example.test": ["203.0.113.7", "203.0.113.8", "203.0.113.7"]}
    if host not in answers:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return [(family, kind, 6, "", (a, port)) for a in answers[host]]


def test_resolve_host() -> None:
    assert resolve_host("10.0.0.1", resolver=resolver) == (IPv4Address("10.0.0.1"),)
    assert resolve_host("api.example.test", resolver=resolver) == (
        IPv4Address("203.0.113.7"),
        IPv4Address("203.0.113.8"),
    )
    with pytest.raises(KubeconfigError, match="cannot resolve the API server nowhere.test"):
        resolve_host("nowhere.test", resolver=resolver)
    with pytest.raises(KubeconfigError, match="IPv6"):
        resolve_host("fd00::1", resolver=resolver)
