"""A new SSH tunnel to the session's shadow pod, recreating the pod when it is gone.

Used by :class:`kvpn.link_supervisor.LinkSupervisor` for every reconnect attempt. The session
keeps its key pair and its :class:`~kvpn.cluster.shadow_pod.ShadowPodPlan` for its whole life:

* the pod is there and running: connect again, pinning the host key already known;
* the pod is gone (deleted, evicted), failed, or being deleted: wait until the old object is
  gone, create it again from the same plan (same name, labels and authorized key - the
  private key never leaves the laptop), wait until it is ready and pin the *new* host key
  it announces in its log (read through the authenticated API, as at the start);
* the pod exists but is not running yet (a previous attempt created it): wait for it.

With ``--transport direct`` the tunnel goes to the pod IP while it is the one the routes were
planned around; a recreated pod usually has a new IP inside the routed pod CIDR, so the new
tunnel goes through the API server's port-forward instead (no route change needed).

``kvpn exchange``, ``preview`` and ``mesh`` use the same link with two additions: their pod is
created from its own manifest (:meth:`kvpn.cluster.exchange_plan.InterceptPodPlan.manifest`:
the same labels, so the Service selects the new pod again), and ``after_connect`` runs on
every new tunnel before it is handed out (it re-issues the remote forwards and re-applies the
serving labels); when it fails the tunnel is closed and the attempt fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncssh
from kubernetes.client.exceptions import ApiException

from kvpn.cluster.forbidden import describe_api_error
from kvpn.cluster.settled_call import call_settled
from kvpn.cluster.shadow_pod import (
    ShadowPodError,
    ShadowPodPlan,
    create_shadow_pod,
    delete_shadow_pod,
    fatal_problem,
    pod_progress,
    wait_shadow_ready,
)
from kvpn.tunnel.client import ShadowTunnel
from kvpn.tunnel.transport import DirectTransport, PortForwardTransport, Transport

__all__ = ["ShadowLink"]

API_TIMEOUT = 10
POD_GONE_TIMEOUT = 30.0
POD_READY_TIMEOUT = 60.0
#: opening the transport (TCP, TLS, websocket upgrade) and the SSH handshake, per attempt:
#: short, so an attempt that started while the network was down does not keep the session
#: waiting long after it is back (the next attempt is only a backoff away)
TRANSPORT_TIMEOUT = 5.0
SSH_TIMEOUT = 10.0


class ShadowLink:
    def __init__(
        self,
        core: Any,
        configuration: Any,
        plan: ShadowPodPlan,
        *,
        client_key: asyncssh.SSHKey,
        host_key: asyncssh.SSHKey,
        transport: str,
        direct_peer: str | None,
        out: Callable[[str], None],
        keepalive_interval: float = 2.0,
        keepalive_count_max: int = 3,
        manifest: Mapping[str, Any] | None = None,
        after_connect: Callable[[ShadowTunnel], Awaitable[None]] | None = None,
    ) -> None:
        self._core = core
        self._configuration = configuration
        self._plan = plan
        self._client_key = client_key
        self._host_key = host_key
        self._transport = transport
        self._direct_peer = direct_peer
        self._pod_ip = direct_peer
        self._out = out
        self._keepalive_interval = keepalive_interval
        self._keepalive_count_max = keepalive_count_max
        self._manifest = manifest
        self._after_connect = after_connect
        self._need_host_key = False
        self.pods_recreated = 0

    @property
    def transport_name(self) -> str:
        if self._transport == "direct" and self._pod_ip != self._direct_peer:
            return "portforward (the recreated pod's IP is routed into the TUN)"
        return self._transport

    async def connect(self) -> ShadowTunnel:
        """One attempt: make sure the pod is up (recreating it if needed), then SSH to it."""
        await self._ensure_pod()
        tunnel = await ShadowTunnel.connect(
            self._make_transport(),
            client_key=self._client_key,
            host_key=self._host_key,
            keepalive_interval=self._keepalive_interval,
            keepalive_count_max=self._keepalive_count_max,
            connect_timeout=SSH_TIMEOUT,
        )
        if self._after_connect is not None:
            try:
                await self._after_connect(tunnel)
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(tunnel.close(), TRANSPORT_TIMEOUT)
                raise
        return tunnel

    async def _create_pod(self) -> None:
        if self._manifest is None:
            await create_shadow_pod(self._core, self._plan)
            return
        plan = self._plan
        try:
            await call_settled(
                self._core.create_namespaced_pod, plan.namespace, dict(self._manifest)
            )
        except ApiException as exc:
            raise ShadowPodError(
                f"cannot create shadow pod {plan.namespace}/{plan.name}: {describe_api_error(exc)}"
            ) from None

    def _make_transport(self) -> Transport:
        plan = self._plan
        if self._transport == "direct" and self._pod_ip == self._direct_peer and self._pod_ip:
            return DirectTransport(self._pod_ip, plan.port, connect_timeout=TRANSPORT_TIMEOUT)
        return PortForwardTransport(
            self._configuration,
            plan.namespace,
            plan.name,
            plan.port,
            open_timeout=TRANSPORT_TIMEOUT,
        )

    async def _read_pod(self) -> Any | None:
        plan = self._plan
        try:
            return await asyncio.to_thread(
                self._core.read_namespaced_pod,
                plan.name,
                plan.namespace,
                _request_timeout=API_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise ShadowPodError(
                f"cannot read shadow pod {plan.namespace}/{plan.name}: {exc.status} {exc.reason}"
            ) from None

    async def _ensure_pod(self) -> None:
        plan = self._plan
        pod = await self._read_pod()
        progress = pod_progress(pod) if pod is not None else None
        deleting = pod is not None and pod.metadata.deletion_timestamp is not None
        if pod is not None and (deleting or fatal_problem(progress) is not None):  # type: ignore[arg-type]
            if not deleting:
                await delete_shadow_pod(self._core, plan)
            await self._wait_gone()
            pod = None
        if pod is None:
            self._out(f"shadow pod {plan.namespace}/{plan.name} is gone; creating it again")
            await self._create_pod()
            self.pods_recreated += 1
            self._need_host_key = True
        elif progress is not None and progress.running and not self._need_host_key:
            return
        ready = await wait_shadow_ready(
            self._core, plan, lambda progress: None, timeout=POD_READY_TIMEOUT
        )
        self._host_key = ready.host_key
        self._pod_ip = ready.pod_ip
        self._need_host_key = False
        if self._transport == "direct" and self._pod_ip != self._direct_peer:
            peer = ipaddress.IPv4Address(self._pod_ip)
            self._out(
                f"note: the new shadow pod's IP {peer} is not the one the routes were planned "
                "around; its tunnel goes through the API server's port-forward"
            )

    async def _wait_gone(self) -> None:
        deadline = time.monotonic() + POD_GONE_TIMEOUT
        while await self._read_pod() is not None:
            if time.monotonic() >= deadline:
                raise ShadowPodError(
                    f"shadow pod {self._plan.namespace}/{self._plan.name} is still being "
                    f"deleted after {POD_GONE_TIMEOUT:g} s"
                )
            await asyncio.sleep(0.5)
