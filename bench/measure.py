"""The benchmark's measuring client: one small program per measurement, run in the laptop netns.

``python -m bench.measure KIND --host H --port P [options]`` prints one JSON object on stdout
(``{"ok": true, ...}`` or ``{"ok": false, "error": ...}``). The orchestrator (bench/run.py)
starts it with ``ip netns exec <laptop netns>``, so every socket it opens lives in the laptop
namespace, exactly like a program on the user's laptop. Every loop is bounded in count and
time, and every socket has a timeout.

Kinds (table ``KINDS``): ``up``/``down`` (bulk TCP, N parallel streams, for S seconds),
``rtt`` (64-byte request/response on one connection), ``connrate`` (connect, one 64-byte
request, close, in a loop), ``conc`` (N concurrent connections, each doing one request, all
held open; with ``--hold`` it then waits for a line on stdin before closing them, so the
orchestrator can read kvpn's RSS meanwhile), ``dns`` (UDP DNS lookup latency),
``whoami`` (the address the server sees), ``wait`` (until the port accepts connections).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.server import (
    CHUNK,
    OP_DOWNLOAD,
    OP_ECHO,
    OP_UPLOAD,
    OP_WHOAMI,
    header,
    raise_fd_limit,
)

MESSAGE = b"x" * 64
CONNECT_TIMEOUT_S = 10.0
IO_GRACE_S = 30.0  # after the timed part, how long draining may take before we give up
DNS_TIMEOUT_S = 2.0

Result = dict[str, Any]


def _connect(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


# -- bulk ------------------------------------------------------------------------------------


def _upload_stream(sock: socket.socket, seconds: float) -> int:
    data = bytes(CHUNK)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    (count,) = struct.unpack(">Q", _recv_exactly(sock, 8))
    return int(count)


def _download_stream(sock: socket.socket, _seconds: float) -> int:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    while n := sock.recv_into(view):
        total += n
    return total


def _bulk(
    args: argparse.Namespace, op: bytes, stream: Callable[[socket.socket, float], int]
) -> Result:
    socks = [_connect(args.host, args.port) for _ in range(args.streams)]
    for sock in socks:
        sock.settimeout(args.seconds + IO_GRACE_S)
    counts = [0] * len(socks)
    errors: list[str] = []
    barrier = threading.Barrier(len(socks) + 1)

    def run(i: int, sock: socket.socket) -> None:
        try:
            barrier.wait()
            sock.sendall(header(op, int(args.seconds * 1000)))
            counts[i] = stream(sock, args.seconds)
        except OSError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            sock.close()

    threads = [threading.Thread(target=run, args=(i, s), daemon=True) for i, s in enumerate(socks)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join(args.seconds + 2 * IO_GRACE_S)
    elapsed = time.perf_counter() - start
    stuck = sum(thread.is_alive() for thread in threads)
    if stuck:
        errors.append(f"{stuck} stream(s) still running after the time bound")
    return {
        "ok": not errors,
        "bytes": sum(counts),
        "seconds": elapsed,
        "streams": len(socks),
        "errors": errors[:5],
    }


def measure_up(args: argparse.Namespace) -> Result:
    return _bulk(args, OP_UPLOAD, _upload_stream)


def measure_down(args: argparse.Namespace) -> Result:
    return _bulk(args, OP_DOWNLOAD, _download_stream)


# -- latency and connections -----------------------------------------------------------------


def measure_rtt(args: argparse.Namespace) -> Result:
    """Round trips of 64 bytes on one connection, after ``--warmup`` unrecorded ones."""
    samples: list[float] = []
    with _connect(args.host, args.port) as sock:
        sock.settimeout(IO_GRACE_S)
        sock.sendall(header(OP_ECHO))
        deadline = time.monotonic() + args.seconds
        for i in range(args.warmup + args.count):
            if time.monotonic() >= deadline:
                break
            start = time.perf_counter_ns()
            sock.sendall(MESSAGE)
            _recv_exactly(sock, len(MESSAGE))
            if i >= args.warmup:
                samples.append((time.perf_counter_ns() - start) / 1000.0)
    return {"ok": bool(samples), "samples_us": samples}


def _one_request(host: str, port: int) -> None:
    with _connect(host, port) as sock:
        sock.settimeout(IO_GRACE_S)
        sock.sendall(header(OP_ECHO) + MESSAGE)
        _recv_exactly(sock, len(MESSAGE))


def measure_connrate(args: argparse.Namespace) -> Result:
    """Connect, one request, close - as many times as fit in ``--seconds`` (at most ``--count``)."""
    done = 0
    errors: list[str] = []
    start = time.perf_counter()
    deadline = time.monotonic() + args.seconds
    while done < args.count and time.monotonic() < deadline and len(errors) < 10:
        try:
            _one_request(args.host, args.port)
            done += 1
        except OSError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    elapsed = time.perf_counter() - start
    return {"ok": not errors, "connections": done, "seconds": elapsed, "errors": errors[:5]}


async def _concurrent(args: argparse.Namespace) -> Result:
    """``--count`` connections at once; each has ``--seconds`` to connect and to be answered."""
    writers: list[asyncio.StreamWriter] = []
    errors: list[str] = []

    async def one() -> bool:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(args.host, args.port), args.seconds
            )
        except (OSError, TimeoutError) as exc:
            errors.append(f"connect: {type(exc).__name__}: {exc}")
            return False
        writers.append(writer)
        try:
            writer.write(header(OP_ECHO) + MESSAGE)
            await asyncio.wait_for(reader.readexactly(len(MESSAGE)), args.seconds)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            errors.append(f"request: {type(exc).__name__}: {exc}")
            return False
        return True

    start = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(args.count)))
    elapsed = time.perf_counter() - start
    result: Result = {
        "ok": all(results),
        "succeeded": sum(results),
        "attempted": args.count,
        "seconds": elapsed,
        "errors": sorted(set(errors))[:5],
    }
    if args.hold:
        # Tell the orchestrator everything is open, then wait (bounded) for its go-ahead.
        print(json.dumps(result), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, _wait_for_line, args.hold_max)
        result = {}
    for writer in writers:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
    return result


def _wait_for_line(timeout: float) -> None:
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    if ready:
        sys.stdin.readline()


def measure_conc(args: argparse.Namespace) -> Result:
    return asyncio.run(_concurrent(args))


def measure_whoami(args: argparse.Namespace) -> Result:
    with _connect(args.host, args.port) as sock:
        sock.settimeout(IO_GRACE_S)
        sock.sendall(header(OP_WHOAMI))
        data = b""
        while chunk := sock.recv(100):
            data += chunk
    return {"ok": bool(data), "peer": data.decode(errors="replace")}


def measure_wait(args: argparse.Namespace) -> Result:
    """Until ``host:port`` accepts a TCP connection (a tunnel is up), at most ``--seconds``."""
    deadline = time.monotonic() + args.seconds
    last = ""
    while time.monotonic() < deadline:
        try:
            with _connect(args.host, args.port, timeout=1.0):
                return {"ok": True}
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
    return {"ok": False, "error": last or "timed out"}


# -- DNS -------------------------------------------------------------------------------------


def dns_query(name: str, query_id: int) -> bytes:
    """A standard recursive query for the A record of ``name`` (RFC 1035 section 4.1)."""
    labels = [label.encode("ascii") for label in name.rstrip(".").split(".")]
    qname = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    return struct.pack(">HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + qname + struct.pack(">HH", 1, 1)


def dns_response_matches(data: bytes, query_id: int) -> bool:
    """Whether ``data`` is a response (QR set) to the query with ``query_id``."""
    if len(data) < 12:
        return False
    got_id, flags = struct.unpack(">HH", data[:4])
    return got_id == query_id and bool(flags & 0x8000)


def measure_dns(args: argparse.Namespace) -> Result:
    """Look up each name once over UDP (``{i}`` in ``--name`` makes every name distinct)."""
    samples: list[float] = []
    failures = 0
    deadline = time.monotonic() + args.seconds
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(DNS_TIMEOUT_S)
        sock.connect((args.host, args.port))
        for i in range(args.count):
            if time.monotonic() >= deadline:
                break
            query_id = (i * 7919 + 1) & 0xFFFF
            start = time.perf_counter_ns()
            try:
                sock.send(dns_query(args.name.format(i=i), query_id))
                while not dns_response_matches(sock.recv(4096), query_id):
                    pass
            except OSError:
                failures += 1
                continue
            samples.append((time.perf_counter_ns() - start) / 1e6)
    return {"ok": bool(samples) and failures == 0, "samples_ms": samples, "failures": failures}


KINDS: dict[str, Callable[[argparse.Namespace], Result]] = {
    "up": measure_up,
    "down": measure_down,
    "rtt": measure_rtt,
    "connrate": measure_connrate,
    "conc": measure_conc,
    "whoami": measure_whoami,
    "wait": measure_wait,
    "dns": measure_dns,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="One benchmark measurement; prints JSON.")
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=2.0, help="time bound")
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--count", type=int, default=1000, help="count bound")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("--hold-max", type=float, default=60.0)
    parser.add_argument("--name", default="kubernetes.default.svc.cluster.local")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    raise_fd_limit()
    try:
        result = KINDS[args.kind](args)
    except OSError as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    if result:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
