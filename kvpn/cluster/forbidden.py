"""One clear line for an API error, naming the permission when RBAC refused the request.

A 403 from a Kubernetes API server carries a ``kind: Status`` whose message says exactly what
was refused (``responsewriters.ForbiddenStatusError``)::

    pods "x" is forbidden: User "u" cannot create resource "pods/portforward" in API group ""
    in the namespace "default"

:func:`describe_api_error` turns that into ``403 Forbidden: not allowed to create
pods/portforward in namespace default (RBAC); ask your cluster admin for: create
pods/portforward``; another 403 or a 422 (invalid) adds the server's message; any other
error becomes ``<status> <reason>``. Pure: works on the status
code and body, so it takes the client's ``ApiException`` or anything shaped like it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_FORBIDDEN = re.compile(
    r'User "(?P<user>[^"]*)" cannot (?P<verb>\S+) resource "(?P<resource>[^"]*)" in API group '
    r'"(?P<group>[^"]*)" (?:in the namespace "(?P<namespace>[^"]*)"|at the cluster scope)'
)
MAX_MESSAGE = 300


@dataclass(frozen=True, slots=True)
class Refusal:
    """What RBAC refused, parsed from a Forbidden message."""

    user: str
    verb: str
    resource: str  # "pods" or "pods/portforward"
    group: str
    namespace: str | None  # None: at the cluster scope

    def permission(self) -> str:
        """``create pods/portforward``, ``patch deployments.apps/scale``."""
        base, _, sub = self.resource.partition("/")
        qualified = f"{base}.{self.group}" if self.group else base
        return f"{self.verb} {qualified}/{sub}" if sub else f"{self.verb} {qualified}"

    def where(self) -> str:
        return f"in namespace {self.namespace}" if self.namespace else "cluster-wide"


def parse_forbidden(message: str) -> Refusal | None:
    match = _FORBIDDEN.search(message)
    if match is None:
        return None
    return Refusal(
        match["user"], match["verb"], match["resource"], match["group"], match["namespace"]
    )


def status_message(body: object) -> str:
    """The ``message`` of a ``kind: Status`` body (bytes or text), else ""."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if not isinstance(body, str) or not body:
        return ""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    message = data.get("message") if isinstance(data, dict) else None
    return message if isinstance(message, str) else ""


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def describe_api_error(exc: object) -> str:
    """``403 Forbidden: not allowed to ...`` for RBAC refusals, else ``<status> <reason>``
    (plus the server's message when it has one); always a single line."""
    status = getattr(exc, "status", None)
    reason = str(getattr(exc, "reason", "") or "")
    head = f"{status} {reason}".strip() if status else (reason or str(exc))
    message = status_message(getattr(exc, "body", None))
    refusal = parse_forbidden(message) if status == 403 else None
    if refusal is not None:
        return _one_line(
            f"{head}: not allowed to {refusal.permission()} {refusal.where()} (RBAC); "
            f"ask your cluster admin for: {refusal.permission()}"
        )
    if status in (403, 422) and message:  # a webhook's or PodSecurity's refusal; invalid
        return _one_line(f"{head}: {message}")
    return _one_line(head)
