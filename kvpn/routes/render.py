"""Text and JSON views of a route plan (pure: strings and dicts in, strings out)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any

from kvpn.routes.plan import Exclusion, RoutePlan

__all__ = ["RoutesView", "render_text", "view_json"]


@dataclass(frozen=True)
class RoutesView:
    """What ``kvpn routes`` shows: a plan, or a live session's plan plus what is on the TUN."""

    plan: RoutePlan
    context: str
    namespace: str
    live: bool
    session_id: str | None = None
    pid: int | None = None
    #: Live only: installed prefixes that are not (or no longer) on the TUN.
    missing_on_tun: tuple[IPv4Network, ...] = ()
    notes: tuple[str, ...] = ()


def _exclusion_effect(exclusion: Exclusion) -> str:
    if not exclusion.cuts:
        return "outside every cluster CIDR, nothing to split"
    return "cuts " + ", ".join(str(n) for n in exclusion.cuts)


def _table(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append(indent + "  ".join([*cells, row[-1]]).rstrip())
    return lines


def render_text(view: RoutesView) -> str:
    plan = view.plan
    if view.live:
        head = (
            f"kvpn routes: live session {view.session_id} (pid {view.pid}, {plan.tun}), "
            f"context {view.context}, namespace {view.namespace}"
        )
    else:
        head = (
            f"kvpn routes: plan for context {view.context}, namespace {view.namespace} "
            "(not connected)"
        )
    lines = [head, "", "Cluster CIDRs:"]
    lines += _table([[str(c.network), c.kind.value, c.source] for c in plan.cluster_cidrs]) or [
        "  none found"
    ]

    verb = "Installed on" if view.live else "To install on"
    lines += ["", f"{verb} {plan.tun} ({len(plan.installed)} prefixes):"]
    if plan.refused:
        lines.append("  none: the plan is refused (--on-conflict=fail met a conflict)")
    elif not plan.installed:
        lines.append("  none")
    else:
        lines += [f"  {net}" for net in plan.installed]
    if view.missing_on_tun:
        lines.append(
            f"  missing on {plan.tun} right now: " + ", ".join(str(n) for n in view.missing_on_tun)
        )

    lines += ["", "Exclusions:"]
    lines += _table(
        [
            [str(e.network), e.reason.value, f"{e.detail}; {_exclusion_effect(e)}"]
            for e in plan.exclusions
        ]
    ) or ["  none"]

    lines += ["", f"Conflicts with local routes (--on-conflict={plan.on_conflict.value}):"]
    lines += [f"  {c.describe()}" for c in plan.conflicts] or ["  none"]

    notes = (*plan.notes, *view.notes)
    if notes:
        lines += ["", "Notes:"]
        lines += [f"  - {note}" for note in notes]
    return "\n".join(lines)


def view_json(view: RoutesView) -> dict[str, Any]:
    return {
        "mode": "live" if view.live else "plan",
        "context": view.context,
        "namespace": view.namespace,
        "session": None
        if not view.live
        else {"id": view.session_id, "pid": view.pid, "tun": view.plan.tun},
        "plan": view.plan.to_json(),
        "missing_on_tun": [str(n) for n in view.missing_on_tun],
        "notes": list(view.notes),
    }
