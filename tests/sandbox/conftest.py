"""A sandbox cluster shared by the end-to-end tests (started once per test session)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from kubernetes import client

from sandbox import lifecycle
from sandbox.config import SandboxConfig
from sandbox.inside_netns import enter_netns
from tests.sandbox.support import Cluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """One sandbox for the session; the tests' own thread runs inside its laptop namespace.

    Every client a test makes (the official kubernetes client, sockets, threads it starts)
    therefore lives in the laptop namespace, exactly like a program on the user's laptop, and
    no test traffic can ever leave through the host's own routes.
    """
    config = SandboxConfig(name=f"t{os.getpid() % 100000}", netns_prefix_base="kvpnt-")
    info = lifecycle.start(config)
    restore = enter_netns(config.laptop_netns)
    try:
        yield Cluster(config, info)
    finally:
        restore()
        lifecycle.stop(config)


@pytest.fixture(scope="session")
def core(cluster: Cluster) -> client.CoreV1Api:
    return client.CoreV1Api(cluster.api_client())


@pytest.fixture(scope="session")
def apps(cluster: Cluster) -> client.AppsV1Api:
    return client.AppsV1Api(cluster.api_client())
