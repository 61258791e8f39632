"""The objects a ``kvpn mesh`` creates, and a member session's whole plan.

Pure: built from what was read, no I/O. The contract is ``docs/mesh-design.md``. What the
Service itself carries (the mark, :class:`~kvpn.cluster.mesh_plan.Member`,
:class:`~kvpn.cluster.mesh_plan.MeshState`) and the JSON patches that join, leave and restore
are in :mod:`kvpn.cluster.mesh_plan`; this module builds the manifests of the router pod, the
stand-in Service and the member Services, the :class:`MeshPlan` a session runs, and the
Istio example printed in manual mode.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kvpn.cluster.exchange_plan import (
    HOST_ANNOTATION,
    SERVICE_ANNOTATION,
    UNPRIVILEGED_PORT_SYSCTL,
    InterceptPodPlan,
    selector_of,
)
from kvpn.cluster.locks import format_time
from kvpn.cluster.mesh_plan import (
    MEMBER_LABEL,
    MESH_SERVICE_LABEL,
    Mark,
    Member,
    MeshMode,
    MeshState,
    labels_text,
)
from kvpn.cluster.service_ports import PortForward, PortKey, ServicePort
from kvpn.cluster.shadow_pod import (
    MANAGED_BY_LABEL,
    SESSION_LABEL,
    USER_ANNOTATION,
    restricted_container_fields,
)
from kvpn.shadow.mesh_names import (
    MESH_ANNOTATION,
    PROTOCOLS,
    ROUTER_LABEL,
    mesh_service_name,
    router_env,
    router_pod_name,
    standin_service_name,
)

ROUTER_CONTAINER = "router"


# --- objects the mesh creates ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RoutedPort:
    """A resolved numeric target port of ``S`` the router listens on."""

    port: int
    protocol: str
    names: tuple[str, ...] = ()  # container port names S's targetPorts use

    @property
    def spec(self) -> str:
        return f"{self.port}/{self.protocol}"


def routed_ports(
    ports: Sequence[ServicePort], container_ports: Mapping[PortKey, int]
) -> tuple[RoutedPort, ...]:
    """One per distinct (resolved target, protocol) of the Service; unresolvable ones skipped."""
    found: dict[tuple[int, str], set[str]] = {}
    for p in ports:
        target = p.resolve_target(container_ports)
        if target is None or p.protocol not in PROTOCOLS:  # SCTP: the router cannot relay it
            continue
        names = found.setdefault((target, p.protocol), set())
        if isinstance(p.target, str):
            names.add(p.target)
    return tuple(
        RoutedPort(port, proto, tuple(sorted(names)))
        for (port, proto), names in sorted(found.items(), key=lambda kv: (kv[0][1], kv[0][0]))
    )


def _kvpn_labels(service: str) -> dict[str, str]:
    return {MANAGED_BY_LABEL: "kvpn", MESH_SERVICE_LABEL: service}


def _port_entry_name(port: int, protocol: str) -> str:
    return f"{protocol.lower()}-{port}"


def standin_manifest(namespace: str, service: str, state: MeshState) -> dict[str, Any]:
    ports = []
    for spec in state.ports:
        number, _, protocol = spec.partition("/")
        ports.append(
            {
                "name": _port_entry_name(int(number), protocol or "TCP"),
                "port": int(number),
                "targetPort": int(number),
                "protocol": protocol or "TCP",
            }
        )
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": state.standin,
            "namespace": namespace,
            "labels": _kvpn_labels(service),
        },
        "spec": {"selector": dict(state.original_selector), "ports": ports},
    }


def member_service_manifest(
    namespace: str, service: str, member: Member, forwards: Sequence[PortForward]
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": mesh_service_name(service, member.mark),
            "namespace": namespace,
            "labels": {**_kvpn_labels(service), SESSION_LABEL: member.session},
            "annotations": {USER_ANNOTATION: member.lock.user, HOST_ANNOTATION: member.lock.host},
        },
        "spec": {
            "selector": {MEMBER_LABEL: member.session},
            "ports": [
                {
                    "name": _port_entry_name(f.target_port, "TCP"),
                    "port": f.target_port,
                    "targetPort": f.target_port,
                    "protocol": "TCP",
                }
                for f in forwards
            ],
        },
    }


def router_manifest(
    namespace: str, service: str, state: MeshState, ports: Sequence[RoutedPort], image: str
) -> dict[str, Any]:
    """The router pod: restricted like the shadow pod, Ready once it listens."""
    tcp = [p for p in ports if p.protocol == "TCP"]
    container_ports: list[dict[str, Any]] = []
    for p in ports:
        for name in p.names or (None,):
            entry: dict[str, Any] = {"containerPort": p.port, "protocol": p.protocol}
            if name:
                entry["name"] = name
            container_ports.append(entry)
    security: dict[str, Any] = {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if any(p.port < 1024 for p in ports):
        security["sysctls"] = [{"name": UNPRIVILEGED_PORT_SYSCTL, "value": "0"}]
    container: dict[str, Any] = {
        "name": ROUTER_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["router"],
        "env": [
            *router_env(
                service,
                namespace,
                state.ports,
                header=state.header,
                standin=f"{state.standin}.{namespace}.svc",
            ),
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "ports": container_ports,
        **restricted_container_fields(),
    }
    if tcp:
        container["readinessProbe"] = {
            "tcpSocket": {"port": tcp[0].port},
            "periodSeconds": 1,
        }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": state.router,
            "namespace": namespace,
            "labels": {MANAGED_BY_LABEL: "kvpn", ROUTER_LABEL: service},
            "annotations": {SERVICE_ANNOTATION: service},
        },
        "spec": {
            "restartPolicy": "Always",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 2,
            "securityContext": security,
            "containers": [container],
        },
    }


def new_mesh_state(
    service: str,
    header: str,
    original_selector: Mapping[str, str],
    ports: Sequence[RoutedPort],
    *,
    now: datetime,
) -> MeshState:
    return MeshState(
        router=router_pod_name(service),
        standin=standin_service_name(service),
        header=header,
        original_selector=selector_of(original_selector),
        ports=tuple(p.spec for p in ports),
        since=format_time(now),
    )


# --- the session's plan ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MeshPlan:
    namespace: str
    service: str
    mode: MeshMode
    mark: Mark
    member: Member
    pod: InterceptPodPlan
    state: MeshState | None  # auto mode: the mesh joined, or the one this member creates
    creates_mesh: bool
    routed: tuple[RoutedPort, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def forwards(self) -> tuple[PortForward, ...]:
        return self.pod.forwards

    @property
    def member_service(self) -> str:
        return mesh_service_name(self.service, self.mark.value)

    def describe(self) -> list[str]:
        ns, svc = self.namespace, self.service
        lines = [
            f"join the mesh of service {ns}/{svc} as {self.member.annotation} "
            f"(heartbeat every {self.member.lock.ttl // 3 or 1}s)"
        ]
        if self.mode == MeshMode.AUTO and self.state is not None:
            if self.creates_mesh:
                ports = ", ".join(p.spec for p in self.routed)
                lines += [
                    f"create stand-in service {ns}/{self.state.standin} "
                    f"(selector {labels_text(self.state.original_selector)})",
                    f"create router pod {ns}/{self.state.router} (ports {ports}, "
                    f"header {self.state.header!r})",
                    f"once it is Ready, replace the selector of service {svc}: "
                    f"{labels_text(self.state.original_selector)} -> "
                    f"{ROUTER_LABEL}={svc} (original kept in {MESH_ANNOTATION})",
                ]
            else:
                lines.append(f"join router {ns}/{self.state.router} (header {self.state.header!r})")
            lines += [
                f"create shadow pod {ns}/{self.pod.name}",
                f"create member service {ns}/{self.member_service} for {self.mark.header_line()!r}",
            ]
        else:
            lines.append(
                f"create shadow pod {ns}/{self.pod.name}; once it serves, label it "
                f"{labels_text(self.pod.serving_labels)}"
            )
        lines += [f"forward {f.describe()}" for f in self.forwards]
        return lines


def manual_example(namespace: str, service: str, mark: Mark, port: int) -> str:
    """An Istio VirtualService + DestinationRule sending the marked requests to the shadow."""
    host = f"{service}.{namespace}.svc.cluster.local"
    return f"""\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: {service}-kvpn
  namespace: {namespace}
spec:
  host: {host}
  subsets:
  - name: kvpn-{mark.value.lower()}
    labels:
      {mark.key}: {json.dumps(mark.value)}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: {service}-kvpn
  namespace: {namespace}
spec:
  hosts:
  - {host}
  http:
  - match:
    - headers:
        {mark.key.lower()}:
          exact: {json.dumps(mark.value)}
    route:
    - destination:
        host: {host}
        port:
          number: {port}
        subset: kvpn-{mark.value.lower()}
  - route:
    - destination:
        host: {host}
        port:
          number: {port}
"""
