"""`kvpn connect`: thin wrapper around kvpn.connect_session."""

from __future__ import annotations

from kvpn.cli.errors import UserError


def run_connect(
    *,
    kubeconfig: str | None,
    context: str | None,
    namespace: str | None,
    image: str | None,
    transport: str,
    offload: bool = True,
    dns_mode: str = "auto",
    cluster_domain: str = "cluster.local",
    include_cidrs: tuple[str, ...] = (),
    exclude_cidrs: tuple[str, ...] = (),
    on_conflict: str = "keep",
    clean_leftovers: bool | None = None,
) -> None:
    from kvpn.connect_session import ConnectOptions, run_connect_blocking

    code = run_connect_blocking(
        ConnectOptions(
            kubeconfig=kubeconfig,
            context=context,
            namespace=namespace,
            image=image,
            transport=transport,
            offload=offload,
            dns_mode=dns_mode,
            cluster_domain=cluster_domain,
            include_cidrs=include_cidrs,
            exclude_cidrs=exclude_cidrs,
            on_conflict=on_conflict,
            clean_leftovers=clean_leftovers,
        )
    )
    if code:
        raise UserError("disconnected after an error", exit_code=code)
