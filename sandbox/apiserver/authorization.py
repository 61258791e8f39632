"""Authorization for the sandbox API server: deny rules set at runtime, and SelfSubjectAccessReview.

Theory of operation
-------------------
A real API server authorizes every resource request from its *attributes* (user, verb, API
group, resource, subresource, namespace, name) and answers a refusal with 403 ``kind: Status``
``reason: Forbidden`` worded by ``responsewriters.ForbiddenStatusError``::

    pods "x" is forbidden: User "u" cannot create resource "pods/portforward" in API group ""
    in the namespace "default"

The sandbox has one identity (its kubeconfig's bearer token is the cluster admin's), so by
default everything is allowed. A test takes permissions away at runtime by writing *deny
rules* into the sandbox-only ConfigMap ``kube-system/sandbox-authz``, key ``deny``, a JSON
list of ``{"verb", "resource", "subresource"?, "namespace"?, "group"?, "user"?}`` (``"*"``
matches anything; a rule without ``subresource`` matches the main resource only, like an RBAC
rule naming ``pods`` does not grant ``pods/portforward``; ``"resource": "pods/portforward"``
is accepted too). The ConfigMap itself can always be read, changed and deleted by name, so a
test can never lock itself out. A malformed ConfigMap denies nothing (and is logged).

Attributes are derived the way ``RequestInfoFactory`` does: GET collection is ``list`` (or
``watch`` with ``?watch=true``), POST ``create``, PUT ``update``, PATCH ``patch``, DELETE
``delete`` / ``deletecollection``; a request on namespace ``x`` itself has namespace ``x``. A
WebSocket GET on ``pods/exec`` or ``pods/portforward`` also needs ``create`` (the
``AuthorizePodWebsocketUpgradeCreatePermission`` gate, on by default since 1.35).

``SelfSubjectAccessReview`` (authorization.k8s.io/v1) answers ``allowed`` from the same rules;
it is itself a ``create selfsubjectaccessreviews`` request at the cluster scope, so a rule can
forbid it too (as a cluster without ``system:basic-user`` would).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from sandbox.apiserver import resources as R
from sandbox.apiserver.store import BadRequest, Forbidden, Invalid, Obj, Store

log = logging.getLogger("sandbox.apiserver.authz")

AUTHZ_NAMESPACE = "kube-system"
AUTHZ_CONFIGMAP = "sandbox-authz"
RULES_KEY = "deny"
SANDBOX_USER = "kubernetes-admin"
SANDBOX_GROUPS = ("kubeadm:cluster-admins", "system:authenticated")
ALLOWED_REASON = (
    'RBAC: allowed by ClusterRoleBinding "kubeadm:cluster-admins" of ClusterRole '
    '"cluster-admin" to Group "kubeadm:cluster-admins"'
)

GROUP = "authorization.k8s.io"
VERSION = "v1"
SSAR_PLURAL = "selfsubjectaccessreviews"
SSAR_KIND = "SelfSubjectAccessReview"
SSAR_PATH = f"/apis/{GROUP}/{VERSION}/{SSAR_PLURAL}"
GROUP_VERSION = {"groupVersion": f"{GROUP}/{VERSION}", "version": VERSION}

_VERBS_BY_METHOD: dict[tuple[str, str], str] = {
    # (target shape, HTTP method) -> verb; subresources use the "object" row
    ("collection", "GET"): "list",
    ("collection", "POST"): "create",
    ("collection", "DELETE"): "deletecollection",
    ("object", "GET"): "get",
    ("object", "POST"): "create",
    ("object", "PUT"): "update",
    ("object", "PATCH"): "patch",
    ("object", "DELETE"): "delete",
}
_WEBSOCKET_CREATE_SUBRESOURCES = ("exec", "portforward", "attach")
_RULE_FIELDS = ("verb", "resource", "subresource", "namespace", "group", "user")


@dataclass(frozen=True, slots=True)
class Attributes:
    """What one request asks to do, as an authorizer sees it."""

    verb: str
    resource: str
    group: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    user: str = SANDBOX_USER

    def forbidden_message(self) -> str:
        """The wording of ``responsewriters.ForbiddenStatusError`` (RBAC gives no reason)."""
        resource = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        what = f'User "{self.user}" cannot {self.verb} resource "{resource}" in API group "{self.group}"'
        scope = f'in the namespace "{self.namespace}"' if self.namespace else "at the cluster scope"
        qualified = f"{self.resource}.{self.group}" if self.group else self.resource
        subject = f'{qualified} "{self.name}"' if self.name else qualified
        return f"{subject} is forbidden: {what} {scope}"

    def forbidden(self) -> Forbidden:
        details: dict[str, Any] = {}
        if self.name:
            details["name"] = self.name
        if self.group:
            details["group"] = self.group
        details["kind"] = self.resource
        return Forbidden(self.forbidden_message(), details=details)

    def is_authz_configmap(self) -> bool:
        return (
            self.resource == "configmaps"
            and not self.group
            and not self.subresource
            and self.namespace == AUTHZ_NAMESPACE
            and self.name == AUTHZ_CONFIGMAP
        )


def _matches(pattern: str | None, value: str) -> bool:
    return pattern is None or pattern == "*" or pattern == value


@dataclass(frozen=True, slots=True)
class DenyRule:
    verb: str
    resource: str
    subresource: str | None = None
    namespace: str | None = None
    group: str | None = None
    user: str | None = None

    @classmethod
    def from_json(cls, data: object) -> DenyRule:
        if not isinstance(data, dict):
            raise ValueError(f"a rule must be an object, not {data!r}")
        unknown = set(data) - set(_RULE_FIELDS)
        if unknown:
            raise ValueError(f"unknown rule fields {sorted(unknown)}")
        fields: dict[str, str | None] = {}
        for key in _RULE_FIELDS:
            value = data.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"rule field {key!r} must be a string")
            fields[key] = value
        verb, resource = fields["verb"], fields["resource"]
        if not verb or not resource:
            raise ValueError("a rule needs a verb and a resource")
        subresource = fields["subresource"]
        if "/" in resource:
            if subresource is not None:
                raise ValueError("give the subresource once: in resource or in subresource")
            resource, subresource = resource.split("/", 1)
        return cls(
            verb, resource, subresource, fields["namespace"], fields["group"], fields["user"]
        )

    def matches(self, attrs: Attributes) -> bool:
        return (
            _matches(self.verb, attrs.verb)
            and _matches(self.resource, attrs.resource)
            and (self.subresource or "") in ("*", attrs.subresource)
            and _matches(self.namespace, attrs.namespace)
            and _matches(self.group, attrs.group)
            and _matches(self.user, attrs.user)
        )


def parse_rules(text: str) -> tuple[DenyRule, ...]:
    """The rules of a ConfigMap's ``deny`` value; ValueError when it is not a list of rules."""
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError("the deny rules must be a JSON list")
    return tuple(DenyRule.from_json(item) for item in data)


def rules_configmap(rules: list[dict[str, str]]) -> Obj:
    """The ConfigMap manifest that denies ``rules`` (for tests and demos)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": AUTHZ_CONFIGMAP, "namespace": AUTHZ_NAMESPACE},
        "data": {RULES_KEY: json.dumps(rules)},
    }


def request_verbs(shape: str, method: str, *, watch: bool, subresource: str | None) -> tuple[str, ...]:
    """The verbs one HTTP request needs, in the order a server checks them."""
    row = "collection" if shape == "collection" else "object"
    verb = _VERBS_BY_METHOD.get((row, method.upper()))
    if verb is None:
        return ()
    if watch and verb in ("list", "get"):
        verb = "watch"
    if verb == "get" and subresource in _WEBSOCKET_CREATE_SUBRESOURCES:
        return ("get", "create")
    return (verb,)


class Authorizer:
    """Decides from the deny rules currently stored in ``kube-system/sandbox-authz``."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._cache: tuple[str, tuple[DenyRule, ...]] = ("", ())

    def rules(self) -> tuple[DenyRule, ...]:
        obj = self._store.find(R.CONFIGMAPS, AUTHZ_NAMESPACE, AUTHZ_CONFIGMAP)
        if obj is None:
            return ()
        version = str(obj.get("metadata", {}).get("resourceVersion", ""))
        if version and version == self._cache[0]:
            return self._cache[1]
        text = (obj.get("data") or {}).get(RULES_KEY, "[]")
        try:
            rules = parse_rules(text)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            log.warning("ignoring %s/%s: %s", AUTHZ_NAMESPACE, AUTHZ_CONFIGMAP, exc)
            rules = ()
        self._cache = (version, rules)
        return rules

    def allowed(self, attrs: Attributes) -> bool:
        if attrs.is_authz_configmap():
            return True
        return not any(rule.matches(attrs) for rule in self.rules())

    def authorize(self, attrs: Attributes) -> None:
        if not self.allowed(attrs):
            raise attrs.forbidden()

    def authorize_request(
        self,
        method: str,
        shape: str,
        rt: R.ResourceType,
        *,
        namespace: str | None,
        name: str | None,
        subresource: str | None,
        watch: bool,
    ) -> None:
        """Raise ``Forbidden`` unless every verb the request needs is allowed."""
        if rt is R.NAMESPACES and name:
            namespace = name  # a request on namespace x is "in the namespace x"
        for verb in request_verbs(shape, method, watch=watch, subresource=subresource):
            self.authorize(
                Attributes(
                    verb,
                    rt.plural,
                    rt.group,
                    subresource or "",
                    namespace or "",
                    name or "",
                )
            )

    def review(self, body: object) -> Obj:
        """The answer to a ``SelfSubjectAccessReview`` (the request itself is authorized by
        the caller)."""
        if not isinstance(body, dict):
            raise BadRequest("the body of the request must be a SelfSubjectAccessReview object")
        spec = body.get("spec")
        spec = spec if isinstance(spec, dict) else {}
        resource = spec.get("resourceAttributes")
        non_resource = spec.get("nonResourceAttributes")
        if isinstance(resource, dict) == isinstance(non_resource, dict):
            raise Invalid(
                f'{SSAR_KIND}.{GROUP} "" is invalid: spec.resourceAttributes: Invalid value: '
                '"null": exactly one of nonResourceAttributes or resourceAttributes must be '
                "specified",
                details={"group": GROUP, "kind": SSAR_KIND},
            )
        if isinstance(resource, dict):
            attrs = Attributes(
                _text(resource, "verb"),
                _text(resource, "resource"),
                _text(resource, "group"),
                _text(resource, "subresource"),
                _text(resource, "namespace"),
                _text(resource, "name"),
            )
            allowed = self.allowed(attrs)
        else:
            allowed = True  # non-resource URLs (/healthz, /version...) are never denied here
        status: Obj = {"allowed": allowed}
        if allowed:
            status["reason"] = ALLOWED_REASON
        return {
            "kind": SSAR_KIND,
            "apiVersion": f"{GROUP}/{VERSION}",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }


def _text(attributes: dict[str, Any], key: str) -> str:
    value = attributes.get(key)
    return value if isinstance(value, str) else ""


def ssar_attributes() -> Attributes:
    """What a ``POST selfsubjectaccessreviews`` asks for."""
    return Attributes("create", SSAR_PLURAL, GROUP)


def api_group() -> Obj:
    """This group's entry in ``/apis``."""
    return {"name": GROUP, "versions": [GROUP_VERSION], "preferredVersion": GROUP_VERSION}


def resource_list() -> Obj:
    """``/apis/authorization.k8s.io/v1``: the review kinds the sandbox serves."""
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{GROUP}/{VERSION}",
        "resources": [
            {
                "name": SSAR_PLURAL,
                "singularName": "selfsubjectaccessreview",
                "namespaced": False,
                "kind": SSAR_KIND,
                "verbs": ["create"],
            }
        ],
    }
