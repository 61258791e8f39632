"""``--expose LOCAL[:REMOTE][,...]`` and which port of a Service each REMOTE means.

A Service port has a ``port`` (what clients dial on the ClusterIP) and a ``targetPort``
(what the pods listen on: a number, or the *name* of a container port). The shadow agent
must listen where the pods listened, i.e. on the target port, so every REMOTE is resolved to
one target port number:

1. REMOTE equal to a TCP Service ``port`` means that port's target;
2. otherwise REMOTE equal to a (resolved) TCP ``targetPort`` means that target.

REMOTE defaults to LOCAL. Named target ports are resolved with the container ports of the
pods behind the Service (or the workload's template); the shadow pod then declares a
container port with the same name so the endpoints controller resolves it to the agent.
Only TCP is carried: UDP ports, and TCP ports nobody exposed, are reported as notes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PortKey = tuple[str, str]  # (container port name, protocol)


class PortMatchError(ValueError):
    """An ``--expose`` value that is malformed or matches no port of the Service."""


@dataclass(frozen=True, slots=True)
class Exposure:
    local_port: int
    remote_port: int

    def describe(self) -> str:
        return f"{self.local_port}:{self.remote_port}"


def _port(text: str, what: str, option: str) -> int:
    text = text.strip()
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise PortMatchError(f"{option} {what} {text!r} is not a port number (1-65535)")
    return int(text)


def parse_expose(text: str, *, option: str = "--expose") -> tuple[Exposure, ...]:
    """``8080``, ``3000:8080`` or ``3000:80,9000:9090``; REMOTE defaults to LOCAL."""
    exposures: list[Exposure] = []
    for item in text.split(","):
        if not item.strip():
            raise PortMatchError(f"{option} {text!r}: empty entry (use LOCAL[:REMOTE][,...])")
        local_text, sep, remote_text = item.partition(":")
        local = _port(local_text, "LOCAL", option)
        remote = _port(remote_text, "REMOTE", option) if sep else local
        exposures.append(Exposure(local, remote))
    remotes = [e.remote_port for e in exposures]
    duplicates = sorted({r for r in remotes if remotes.count(r) > 1})
    if duplicates:
        raise PortMatchError(f"{option} {text!r}: REMOTE port {duplicates[0]} given twice")
    return tuple(exposures)


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str | None
    port: int
    protocol: str
    target: int | str  # a number, or a container port name

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> ServicePort | None:
        """One entry of ``spec.ports`` (camelCase or the client's snake_case); None if bad."""
        port = spec.get("port")
        if not isinstance(port, int) or isinstance(port, bool):
            return None
        target = spec.get("targetPort", spec.get("target_port"))
        if target is None or target == "" or target == 0:
            target = port
        if isinstance(target, str) and target.isdigit():
            target = int(target)
        if not isinstance(target, int | str) or isinstance(target, bool):
            return None
        name = spec.get("name") or None
        return cls(name, port, str(spec.get("protocol") or "TCP"), target)

    def describe(self) -> str:
        text = f"{self.port}"
        if self.target != self.port:
            text += f"->{self.target}"
        text += f"/{self.protocol}"
        return text + (f" ({self.name})" if self.name else "")

    def resolve_target(self, container_ports: Mapping[PortKey, int]) -> int | None:
        if isinstance(self.target, int):
            return self.target
        return container_ports.get((self.target, self.protocol))


def container_ports_of(pod_spec: Mapping[str, Any] | None) -> dict[PortKey, int]:
    """(name, protocol) -> number for the named container ports of a pod (template) spec."""
    found: dict[PortKey, int] = {}
    for container in (pod_spec or {}).get("containers") or []:
        for port in container.get("ports") or []:
            name = port.get("name")
            number = port.get("containerPort", port.get("container_port"))
            if isinstance(name, str) and isinstance(number, int):
                found.setdefault((name, str(port.get("protocol") or "TCP")), number)
    return found


@dataclass(frozen=True, slots=True)
class PortForward:
    """The agent listens on ``target_port`` in the pod; connections go to localhost:LOCAL."""

    local_port: int
    target_port: int
    container_port_names: tuple[str, ...] = ()  # names the Service's targetPorts use
    service_ports: tuple[str, ...] = ()  # described, for messages

    def describe(self) -> str:
        via = f" (service port {', '.join(self.service_ports)})" if self.service_ports else ""
        return f"pod port {self.target_port}{via} -> localhost:{self.local_port}"


@dataclass(frozen=True, slots=True)
class PortMatch:
    forwards: tuple[PortForward, ...]
    notes: tuple[str, ...] = ()


def match_exposures(
    service: str,
    ports: Sequence[ServicePort],
    exposures: Iterable[Exposure],
    container_ports: Mapping[PortKey, int],
) -> PortMatch:
    """Resolve every exposure to a target port of ``service``; one-line errors."""
    tcp = [p for p in ports if p.protocol == "TCP"]
    available = ", ".join(p.describe() for p in ports) or "none"
    if not tcp:
        raise PortMatchError(f"service {service} has no TCP port (ports: {available})")
    resolved = {p: p.resolve_target(container_ports) for p in tcp}
    forwards: dict[int, PortForward] = {}
    for exposure in exposures:
        remote = exposure.remote_port
        chosen = [p for p in tcp if p.port == remote] or [p for p in tcp if resolved[p] == remote]
        if not chosen:
            raise PortMatchError(
                f"--expose {exposure.describe()}: {remote} is not a TCP port or targetPort of "
                f"service {service} (ports: {available}); use LOCAL:REMOTE with one of them"
            )
        targets = {resolved[p] for p in chosen}
        if None in targets:
            named = next(p for p in chosen if resolved[p] is None)
            raise PortMatchError(
                f"--expose {exposure.describe()}: service port {named.describe()} targets the "
                f"named port {named.target!r}, which no pod behind service {service} declares"
            )
        target = next(t for t in targets if t is not None)  # one REMOTE port -> one target
        # Every TCP service port that lands on this target is served by the same listener.
        same = [p for p in tcp if resolved[p] == target]
        if target in forwards:
            raise PortMatchError(
                f"--expose: two entries expose target port {target} of service {service}"
            )
        names = sorted({p.target for p in same if isinstance(p.target, str)})
        forwards[target] = PortForward(
            exposure.local_port, target, tuple(names), tuple(p.describe() for p in same)
        )
    notes = []
    for p in tcp:
        if resolved[p] not in forwards:
            notes.append(
                f"service port {p.describe()} is not exposed: its connections are refused "
                "while the service is exchanged"
            )
    for p in ports:
        if p.protocol != "TCP":
            notes.append(f"service port {p.describe()} is not carried (exchange carries TCP)")
    return PortMatch(tuple(forwards.values()), tuple(notes))


def preview_forwards(exposures: Iterable[Exposure]) -> tuple[PortForward, ...]:
    """A preview Service port REMOTE (target REMOTE) per exposure."""
    return tuple(
        PortForward(e.local_port, e.remote_port, (), (f"{e.remote_port}/TCP",)) for e in exposures
    )
