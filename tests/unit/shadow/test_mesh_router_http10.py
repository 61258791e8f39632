"""The mesh router relays answers of HTTP/1.0 backends (``python -m http.server``) to HTTP/1.1
clients: h11 only writes HTTP/1.1, so the status line is rewritten and the body re-framed."""

from __future__ import annotations

import asyncio

import pytest

from kvpn.shadow.mesh_names import RoutedPort, RouterSettings
from kvpn.shadow.mesh_router import MeshRouter
from tests.unit.shadow.test_mesh_router import common_port

BACKEND_IP = "127.0.0.4"


async def _http10_backend(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, length: bool
) -> None:
    await reader.readuntil(b"\r\n\r\n")
    head = b"HTTP/1.0 200 OK\r\nServer: old\r\n"
    if length:
        head += b"Content-Length: 8\r\n"
    writer.write(head + b"\r\nfrom 1.0")
    await writer.drain()
    writer.close()  # HTTP/1.0: the end of the body is the end of the connection


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "until-close"])
async def test_http10_backend_answer_reaches_an_http11_client(length: bool) -> None:
    port = common_port(["127.0.0.1", BACKEND_IP])
    backend = await asyncio.start_server(
        lambda r, w: _http10_backend(r, w, length=length), BACKEND_IP, port
    )

    async def resolve(host: str) -> list[str]:
        return [BACKEND_IP]

    router = MeshRouter(
        RouterSettings(service="echo", namespace="dev", ports=(RoutedPort(port, "TCP"),)),
        resolve=resolve,
        listen_host="127.0.0.1",
    )
    await router.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: echo\r\nversion: a\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        if length:
            body = await asyncio.wait_for(reader.readexactly(8), 5)
        else:
            assert b"transfer-encoding: chunked" in head.lower()
            body = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
            body = body.split(b"\r\n")[1]
        assert body == b"from 1.0"
        assert router.stats.bad_gateway == 0
        writer.close()
    finally:
        await router.close()
        backend.close()
