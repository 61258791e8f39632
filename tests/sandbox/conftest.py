"""A sandbox cluster shared by the end-to-end tests (started once per test session)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from kubernetes import client

from sandbox import lifecycle
from sandbox.config import SandboxConfig
from tests.sandbox.support import Cluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    config = SandboxConfig(name=f"t{os.getpid() % 100000}")
    info = lifecycle.start(config)
    try:
        yield Cluster(config, info)
    finally:
        lifecycle.stop(config)


@pytest.fixture(scope="session")
def core(cluster: Cluster) -> client.CoreV1Api:
    return client.CoreV1Api(cluster.api_client())


@pytest.fixture(scope="session")
def apps(cluster: Cluster) -> client.AppsV1Api:
    return client.AppsV1Api(cluster.api_client())
