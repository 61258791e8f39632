"""Data-plane counters for ``kvpn status``: traffic, flows and drops by reason."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from kvpn.net.errors import DropReason

__all__ = ["Counters"]


@dataclass(slots=True)
class Counters:
    packets_from_tun: int = 0
    bytes_from_tun: int = 0
    packets_to_tun: int = 0
    bytes_to_tun: int = 0
    tcp_dials_requested: int = 0
    tcp_dials_succeeded: int = 0
    tcp_dials_refused: int = 0
    tcp_dials_unreachable: int = 0
    tcp_dials_timed_out: int = 0
    tcp_resets_sent: int = 0
    icmp_unreachables_sent: int = 0
    udp_datagrams_out: int = 0
    udp_bytes_out: int = 0
    udp_datagrams_in: int = 0
    udp_bytes_in: int = 0
    pings_out: int = 0
    ping_replies_in: int = 0
    # gauges, refreshed by the router when read
    tcp_flows_open: int = 0
    tcp_flows_closing: int = 0
    tcp_dials_pending: int = 0
    udp_flows_open: int = 0
    echo_flows_open: int = 0
    drops: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: DropReason) -> None:
        self.drops[reason.value] = self.drops.get(reason.value, 0) + 1

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())

    def as_dict(self) -> dict[str, int]:
        """A flat snapshot: every counter, then ``drop.<reason>`` entries."""
        snapshot = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "drops"}
        snapshot.update({f"drop.{reason}": count for reason, count in sorted(self.drops.items())})
        return snapshot
