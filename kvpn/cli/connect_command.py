"""`kvpn connect`: wired to the data plane once it lands (issue 3)."""

from __future__ import annotations

from kvpn.cli.errors import UserError


def run_connect(
    *,
    kubeconfig: str | None,
    context: str | None,
    namespace: str | None,
    image: str | None,
    transport: str,
) -> None:
    raise UserError("connect: not built yet (issue 3); nothing was changed.", exit_code=3)
