"""Read this machine's main IPv4 routing table as :class:`LocalRoute` values (pyroute2).

Only unicast routes of the main table (254) are read; routes on the kvpn TUN itself are
skipped, since they are kvpn's own. Everything applies to the calling thread's network
namespace. ``read_local_routes`` uses pyroute2's synchronous ``IPRoute`` (which cannot run
inside a running asyncio loop); ``read_local_routes_async`` is the same for async callers.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from kvpn.routes.plan import DEFAULT_TUN, LocalRoute

__all__ = ["local_route_from_message", "read_local_routes", "read_local_routes_async"]

MAIN_TABLE = 254
RTN_UNICAST = 1


def local_route_from_message(message: Any, ifnames: Mapping[int, str]) -> LocalRoute | None:
    """One netlink RTM_NEWROUTE message (anything with ``.get``) -> LocalRoute, or None if it
    is not an IPv4 unicast route of the main table or is malformed."""
    try:
        if message.get("family", socket.AF_INET) != socket.AF_INET:
            return None
        if message.get("type", RTN_UNICAST) != RTN_UNICAST:
            return None
        if message.get("table", MAIN_TABLE) != MAIN_TABLE:
            return None
        dst_len = int(message.get("dst_len") or 0)
        dst = message.get("dst") or "0.0.0.0"
        network = IPv4Network(f"{dst}/{dst_len}")
        oif = message.get("oif")
        gateway = message.get("gateway")
        if oif is None:
            # Multipath: describe it by its first next hop.
            for hop in message.get("multipath") or []:
                oif = hop.get("oif")
                gateway = gateway or hop.get("gateway")
                break
        metric = int(message.get("priority") or 0)
        return LocalRoute(
            network,
            ifnames.get(oif) if isinstance(oif, int) else None,
            IPv4Address(gateway) if gateway else None,
            metric,
        )
    except (ValueError, TypeError, AttributeError):
        return None


def _convert(
    messages: Iterable[Any], links: Iterable[Any], skip_dev: str | None
) -> list[LocalRoute]:
    ifnames: dict[int, str] = {}
    for link in links:
        index, name = link.get("index"), link.get("ifname")
        if isinstance(index, int) and isinstance(name, str):
            ifnames[index] = name
    routes: list[LocalRoute] = []
    for message in messages:
        route = local_route_from_message(message, ifnames)
        if route is not None and (skip_dev is None or route.dev != skip_dev):
            routes.append(route)
    return routes


def read_local_routes(skip_dev: str | None = DEFAULT_TUN) -> list[LocalRoute]:
    """The main table's IPv4 unicast routes, minus those on ``skip_dev`` (the kvpn TUN).

    Raises ``OSError`` if netlink cannot be read.
    """
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            links = list(ipr.get_links())
            messages = list(ipr.route("dump", family=socket.AF_INET, table=MAIN_TABLE))
    except NetlinkError as exc:
        raise OSError(f"cannot read the routing table: {exc}") from None
    return _convert(messages, links, skip_dev)


async def read_local_routes_async(skip_dev: str | None = DEFAULT_TUN) -> list[LocalRoute]:
    """:func:`read_local_routes` for callers inside a running asyncio loop."""
    from pyroute2 import AsyncIPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    ipr = AsyncIPRoute()
    try:
        links = [link async for link in await ipr.get_links()]
        messages = [
            m async for m in await ipr.route("dump", family=socket.AF_INET, table=MAIN_TABLE)
        ]
    except NetlinkError as exc:
        raise OSError(f"cannot read the routing table: {exc}") from None
    finally:
        ipr.close()
    return _convert(messages, links, skip_dev)
