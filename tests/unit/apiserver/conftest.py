"""A sandbox API server on 127.0.0.1 (random port) in a thread, driven by the official client."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import kubernetes.client as k8s
import pytest
from aiohttp import web

from sandbox.apiserver import resources as R
from sandbox.apiserver.api import Api
from sandbox.apiserver.app import build_app
from sandbox.apiserver.store import Store
from sandbox.config import SandboxConfig

TOKEN = "test-token-123"


@dataclass
class RunningServer:
    api: Api
    loop: asyncio.AbstractEventLoop
    port: int
    runner: web.AppRunner

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, token: str | None = TOKEN) -> k8s.ApiClient:
        cfg = k8s.Configuration(host=self.url)
        if token is not None:
            cfg.api_key = {"authorization": token}
            cfg.api_key_prefix = {"authorization": "Bearer"}
        return k8s.ApiClient(cfg)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop thread (the store is not thread-safe)."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=10)


def start_server(history: int = 20000) -> tuple[RunningServer, threading.Thread]:
    store = Store(history=history)
    api = Api(store, SandboxConfig(name="t"))
    for ns in ("default", "kube-system"):
        api.create(R.NAMESPACES, None, {"metadata": {"name": ns}})
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    app = build_app(api, token=TOKEN, streams=None, bookmark_interval=0.3)
    runner = web.AppRunner(app)

    async def start() -> int:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return int(runner.addresses[0][1])

    port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    return RunningServer(api, loop, port, runner), thread


def stop_server(server: RunningServer, thread: threading.Thread) -> None:
    asyncio.run_coroutine_threadsafe(server.runner.cleanup(), server.loop).result(timeout=10)
    server.loop.call_soon_threadsafe(server.loop.stop)
    thread.join(timeout=10)
    server.loop.close()


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    srv, thread = start_server()
    try:
        yield srv
    finally:
        stop_server(srv, thread)


@pytest.fixture
def small_history_server() -> Iterator[RunningServer]:
    srv, thread = start_server(history=4)
    try:
        yield srv
    finally:
        stop_server(srv, thread)
