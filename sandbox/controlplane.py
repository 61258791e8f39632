"""The sandbox's control plane process: API server, controllers, kubelet, kube-proxy, outside DNS.

Started by ``kvpn-sandbox up`` inside the node's network namespace (but in the root mount
namespace, so the kubelet can create pod namespaces). It reads its settings from
``<state dir>/sandbox.json``, writes ``<state dir>/ready`` once the API server answers and the
system workloads are available (or ``<state dir>/failed`` with the reason), and on SIGTERM stops
every pod process and removes its nftables table before exiting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from pathlib import Path

from aiohttp import web

from sandbox import bootstrap_objects, network
from sandbox.apiserver.api import Api
from sandbox.apiserver.app import build_app
from sandbox.apiserver.pod_streams import PodStreams
from sandbox.apiserver.resources import DEPLOYMENTS, ENDPOINTS, NAMESPACES, NODES, SERVICES
from sandbox.apiserver.store import Store
from sandbox.config import OUTSIDE_DNS_ADDRESS, OUTSIDE_WEB_ADDRESS, SandboxConfig
from sandbox.controllers import Controllers
from sandbox.kube_proxy import KubeProxy
from sandbox.kubelet import Kubelet
from sandbox.outside_dns import OutsideDns, OutsideWeb
from sandbox.settings import load_settings

log = logging.getLogger("sandbox.controlplane")

READY_TIMEOUT_S = 90.0
# Events a watch can resume from, like a real API server's watch cache: older -> 410 Gone.
WATCH_HISTORY = 1000


def bootstrap(api: Api, config: SandboxConfig) -> None:
    for ns in bootstrap_objects.namespaces():
        api.create(NAMESPACES, None, ns)
    api.create(NODES, None, bootstrap_objects.node(config))
    service, endpoints = bootstrap_objects.kubernetes_service(config)
    api.create(SERVICES, "default", service)
    api.create(ENDPOINTS, "default", endpoints)
    dns_deployment, dns_service = bootstrap_objects.cluster_dns(config)
    api.create(DEPLOYMENTS, "kube-system", dns_deployment)
    api.create(SERVICES, "kube-system", dns_service)
    echo_deployment, echo_service = bootstrap_objects.echo()
    api.create(DEPLOYMENTS, "default", echo_deployment)
    api.create(SERVICES, "default", echo_service)


def _available(api: Api, namespace: str, name: str) -> bool:
    dep = api.get(DEPLOYMENTS, namespace, name)
    want = dep.get("spec", {}).get("replicas", 1)
    return bool(dep.get("status", {}).get("availableReplicas", 0) >= want)


async def _wait_available(api: Api, deadline: float) -> str | None:
    """None once the system workloads are available, else what is still missing."""
    wanted = (("kube-system", "coredns"), ("default", "echo"))
    while True:
        missing = [f"{ns}/{name}" for ns, name in wanted if not _available(api, ns, name)]
        if not missing:
            return None
        if time.monotonic() > deadline:
            return "deployments not available in time: " + ", ".join(missing)
        await asyncio.sleep(0.1)


async def run(config: SandboxConfig, token: str) -> int:
    state_dir = config.state_dir
    store = Store(history=WATCH_HISTORY)
    api = Api(store, config)
    bootstrap(api, config)

    kubelet = Kubelet(api, config, network)
    app = build_app(api, token=token, streams=PodStreams(kubelet))
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, str(config.apiserver_address), config.apiserver_port)
    await site.start()

    outside_dns = OutsideDns(str(OUTSIDE_DNS_ADDRESS))
    outside_web = OutsideWeb(str(OUTSIDE_WEB_ADDRESS))
    await outside_dns.start()
    await outside_web.start()

    controllers = Controllers(api, config)
    kube_proxy = KubeProxy(api, config)
    tasks = [
        asyncio.create_task(component.run(), name=type(component).__name__)
        for component in (controllers, kubelet, kube_proxy)
    ]

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    problem = await _wait_available(api, time.monotonic() + READY_TIMEOUT_S)
    if problem is None:
        (state_dir / "ready").write_text("ready\n")
        log.info("sandbox %s ready", config.name)
    else:
        (state_dir / "failed").write_text(problem + "\n")
        log.error("sandbox %s failed: %s", config.name, problem)

    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    for task in done:
        if task is not stopper and task.exception() is not None:
            log.error("component %s died", task.get_name(), exc_info=task.exception())
            exit_code = 1

    log.info("stopping sandbox %s", config.name)
    for component in (kubelet, kube_proxy, controllers):
        with contextlib.suppress(Exception):
            await component.stop()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await outside_web.stop()
    await outside_dns.stop()
    await runner.cleanup()
    return exit_code


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sandbox.controlplane")
    parser.add_argument("--state-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    settings_file = args.state_dir / "sandbox.json"
    config, token = load_settings(json.loads(settings_file.read_text()))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sys.exit(asyncio.run(run(config, token)))


if __name__ == "__main__":
    main()
