"""Authorization in the sandbox API server: deny rules from ``kube-system/sandbox-authz``, 403
answers worded like a real server's, and SelfSubjectAccessReview, through the official client."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import kubernetes.client as k8s
import pytest
from kubernetes.client.rest import ApiException

from sandbox.apiserver import authorization as authz
from sandbox.apiserver.authorization import Attributes, DenyRule, parse_rules, request_verbs
from tests.unit.apiserver.conftest import RunningServer
from tests.unit.apiserver.test_http import _deployment, _pod, _raw

USER = authz.SANDBOX_USER


class Rules:
    """Sets the deny rules for one test, and always removes them."""

    def __init__(self, server: RunningServer) -> None:
        self.core = k8s.CoreV1Api(server.client())

    def deny(self, *rules: dict[str, str]) -> None:
        body = authz.rules_configmap(list(rules))
        try:
            self.core.replace_namespaced_config_map(authz.AUTHZ_CONFIGMAP, "kube-system", body)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.core.create_namespaced_config_map("kube-system", body)

    def clear(self) -> None:
        try:
            self.core.delete_namespaced_config_map(authz.AUTHZ_CONFIGMAP, "kube-system")
        except ApiException as exc:
            if exc.status != 404:
                raise


@pytest.fixture
def rules(server: RunningServer) -> Iterator[Rules]:
    r = Rules(server)
    try:
        yield r
    finally:
        r.clear()


def _ns(server: RunningServer) -> str:
    name = f"a-{uuid.uuid4().hex[:8]}"
    k8s.CoreV1Api(server.client()).create_namespace({"metadata": {"name": name}})
    return name


def _forbidden(exc: ApiException) -> dict[str, object]:
    assert exc.status == 403
    body: dict[str, object] = json.loads(exc.body)
    assert body["kind"] == "Status" and body["reason"] == "Forbidden" and body["code"] == 403
    assert body["status"] == "Failure"
    return body


def _can(server: RunningServer, **attributes: str) -> bool:
    review = k8s.AuthorizationV1Api(server.client()).create_self_subject_access_review(
        {"spec": {"resourceAttributes": attributes}}
    )
    assert isinstance(review, k8s.V1SelfSubjectAccessReview)
    return bool(review.status.allowed)


# -- pure parts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "method", "watch", "sub", "verbs"),
    [
        ("collection", "GET", False, None, ("list",)),
        ("collection", "GET", True, None, ("watch",)),
        ("collection", "POST", False, None, ("create",)),
        ("collection", "DELETE", False, None, ("deletecollection",)),
        ("object", "GET", False, None, ("get",)),
        ("object", "PUT", False, None, ("update",)),
        ("object", "PATCH", False, None, ("patch",)),
        ("object", "DELETE", False, None, ("delete",)),
        ("scale", "PATCH", False, "scale", ("patch",)),
        ("log", "GET", False, "log", ("get",)),
        ("portforward", "GET", False, "portforward", ("get", "create")),
        ("exec", "POST", False, "exec", ("create",)),
        ("object", "OPTIONS", False, None, ()),
    ],
)
def test_request_verbs(
    shape: str, method: str, watch: bool, sub: str | None, verbs: tuple[str, ...]
) -> None:
    assert request_verbs(shape, method, watch=watch, subresource=sub) == verbs


def test_forbidden_messages_match_the_real_wording() -> None:
    assert Attributes("create", "pods", namespace="default").forbidden_message() == (
        'pods is forbidden: User "kubernetes-admin" cannot create resource "pods" in API '
        'group "" in the namespace "default"'
    )
    assert Attributes(
        "create", "pods", subresource="portforward", namespace="ns", name="p"
    ).forbidden_message() == (
        'pods "p" is forbidden: User "kubernetes-admin" cannot create resource '
        '"pods/portforward" in API group "" in the namespace "ns"'
    )
    assert Attributes("list", "nodes").forbidden_message() == (
        'nodes is forbidden: User "kubernetes-admin" cannot list resource "nodes" in API '
        'group "" at the cluster scope'
    )
    err = Attributes("patch", "deployments", "apps", "scale", "ns", "d").forbidden()
    assert err.message.startswith('deployments.apps "d" is forbidden: ')
    assert err.status()["details"] == {"name": "d", "group": "apps", "kind": "deployments"}


def test_rules_parse_and_match() -> None:
    (rule,) = parse_rules('[{"verb": "create", "resource": "pods/portforward"}]')
    assert rule == DenyRule("create", "pods", "portforward")
    assert rule.matches(Attributes("create", "pods", subresource="portforward", namespace="x"))
    assert not rule.matches(Attributes("create", "pods", namespace="x"))
    pods = DenyRule("create", "pods", namespace="default")
    assert pods.matches(Attributes("create", "pods", namespace="default"))
    assert not pods.matches(Attributes("create", "pods", subresource="portforward", namespace="default"))
    assert not pods.matches(Attributes("create", "pods", namespace="other"))
    anything = DenyRule("*", "*", subresource="*")
    assert anything.matches(Attributes("get", "pods", subresource="log"))
    assert not DenyRule("get", "pods", user="someone").matches(Attributes("get", "pods"))
    for bad in ('{"verb": "get"}', "[1]", '[{"verb": "get"}]', '[{"verb": 1, "resource": "x"}]',
                '[{"verb": "get", "resource": "pods", "colour": "red"}]', "not json"):
        with pytest.raises(ValueError):
            parse_rules(bad)


# -- over HTTP ------------------------------------------------------------------------------------


def test_everything_is_allowed_by_default(server: RunningServer) -> None:
    assert _can(server, verb="create", resource="pods", namespace="default")
    review = k8s.AuthorizationV1Api(server.client()).create_self_subject_access_review(
        {"spec": {"resourceAttributes": {"verb": "list", "resource": "nodes"}}}
    )
    assert review.status.allowed and review.status.reason.startswith("RBAC: allowed by")


def test_denied_create_is_a_real_forbidden_status(server: RunningServer, rules: Rules) -> None:
    ns, other = _ns(server), _ns(server)
    rules.deny({"verb": "create", "resource": "pods", "namespace": ns})
    core = k8s.CoreV1Api(server.client())
    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod(ns, _pod("p"))
    body = _forbidden(err.value)
    assert body["message"] == (
        f'pods is forbidden: User "{USER}" cannot create resource "pods" in API group "" '
        f'in the namespace "{ns}"'
    )
    assert body["details"] == {"kind": "pods"}
    assert core.list_namespaced_pod(ns).items == []  # nothing was created
    core.create_namespaced_pod(other, _pod("p"))  # other namespaces are untouched
    assert not _can(server, verb="create", resource="pods", namespace=ns)
    assert _can(server, verb="create", resource="pods", namespace=other)
    assert _can(server, verb="create", resource="pods", subresource="portforward", namespace=ns)
    assert _can(server, verb="list", resource="pods", namespace=ns)
    rules.clear()
    core.create_namespaced_pod(ns, _pod("p"))  # the rule is gone: allowed again


def test_named_cluster_scoped_and_grouped_refusals(server: RunningServer, rules: Rules) -> None:
    ns = _ns(server)
    apps = k8s.AppsV1Api(server.client())
    apps.create_namespaced_deployment(ns, _deployment("d"))
    rules.deny(
        {"verb": "list", "resource": "nodes"},
        {"verb": "patch", "resource": "deployments", "subresource": "scale", "group": "apps"},
        {"verb": "get", "resource": "namespaces"},
        {"verb": "watch", "resource": "services"},
    )
    core = k8s.CoreV1Api(server.client())
    with pytest.raises(ApiException) as err:
        core.list_node()
    assert _forbidden(err.value)["message"] == (
        f'nodes is forbidden: User "{USER}" cannot list resource "nodes" in API group "" '
        "at the cluster scope"
    )
    with pytest.raises(ApiException) as err:
        apps.patch_namespaced_deployment_scale("d", ns, {"spec": {"replicas": 0}})
    body = _forbidden(err.value)
    assert body["message"] == (
        f'deployments.apps "d" is forbidden: User "{USER}" cannot patch resource '
        f'"deployments/scale" in API group "apps" in the namespace "{ns}"'
    )
    assert body["details"] == {"name": "d", "group": "apps", "kind": "deployments"}
    apps.patch_namespaced_deployment("d", ns, {"metadata": {"labels": {"a": "b"}}})  # allowed
    assert apps.read_namespaced_deployment("d", ns).spec.replicas == 2
    with pytest.raises(ApiException) as err:
        core.read_namespace(ns)
    assert f'cannot get resource "namespaces" in API group "" in the namespace "{ns}"' in str(
        _forbidden(err.value)["message"]
    )
    core.list_namespace()  # list is another verb
    core.list_namespaced_service(ns)
    status, body = _raw(server, "GET", f"/api/v1/namespaces/{ns}/services?watch=true")
    assert status == 403 and "cannot watch resource" in str(body["message"])


def test_websocket_portforward_needs_create(server: RunningServer, rules: Rules) -> None:
    ns = _ns(server)
    k8s.CoreV1Api(server.client()).create_namespaced_pod(ns, _pod("p"))
    path = f"/api/v1/namespaces/{ns}/pods/p/portforward?ports=80"
    assert _raw(server, "GET", path)[0] == 503  # allowed (this server has no pod streams)
    rules.deny({"verb": "create", "resource": "pods", "subresource": "portforward"})
    status, body = _raw(server, "GET", path)
    assert status == 403 and body["message"] == (
        f'pods "p" is forbidden: User "{USER}" cannot create resource "pods/portforward" in '
        f'API group "" in the namespace "{ns}"'
    )


def test_the_rules_configmap_can_always_be_changed(server: RunningServer, rules: Rules) -> None:
    rules.deny({"verb": "*", "resource": "*", "subresource": "*"})
    core = k8s.CoreV1Api(server.client())
    with pytest.raises(ApiException) as err:
        core.list_namespace()
    _forbidden(err.value)
    core.read_namespaced_config_map(authz.AUTHZ_CONFIGMAP, "kube-system")
    rules.deny({"verb": "delete", "resource": "pods"})  # a replace: still allowed
    core.list_namespace()
    rules.clear()


def test_malformed_rules_deny_nothing(server: RunningServer, rules: Rules) -> None:
    core = k8s.CoreV1Api(server.client())
    core.create_namespaced_config_map(
        "kube-system",
        {"metadata": {"name": authz.AUTHZ_CONFIGMAP}, "data": {"deny": "{not json"}},
    )
    core.list_namespace()
    assert _can(server, verb="list", resource="namespaces")


def test_self_subject_access_review_can_itself_be_forbidden(
    server: RunningServer, rules: Rules
) -> None:
    rules.deny({"verb": "create", "resource": "selfsubjectaccessreviews"})
    with pytest.raises(ApiException) as err:
        _can(server, verb="get", resource="pods")
    assert _forbidden(err.value)["message"] == (
        "selfsubjectaccessreviews.authorization.k8s.io is forbidden: User "
        f'"{USER}" cannot create resource "selfsubjectaccessreviews" in API group '
        '"authorization.k8s.io" at the cluster scope'
    )


def test_self_subject_access_review_validation_and_non_resource(server: RunningServer) -> None:
    status, body = _raw(server, "POST", authz.SSAR_PATH, {"spec": {}})
    assert status == 422 and body["reason"] == "Invalid"
    status, body = _raw(server, "POST", authz.SSAR_PATH, [1, 2])
    assert status == 400 and body["kind"] == "Status"
    status, body = _raw(
        server, "POST", authz.SSAR_PATH,
        {"spec": {"nonResourceAttributes": {"path": "/healthz", "verb": "get"}}},
    )  # fmt: skip
    assert status == 201 and body["status"]["allowed"] is True
    assert body["kind"] == "SelfSubjectAccessReview"
    assert _raw(server, "POST", authz.SSAR_PATH, None, token=None)[0] == 401


def test_discovery_lists_the_authorization_group(server: RunningServer) -> None:
    client = server.client()
    groups = {g.name: g for g in k8s.ApisApi(client).get_api_versions().groups}
    assert groups["authorization.k8s.io"].preferred_version.group_version == (
        "authorization.k8s.io/v1"
    )
    resources = k8s.AuthorizationV1Api(client).get_api_resources().resources
    assert [(r.name, r.kind, r.verbs, r.namespaced) for r in resources] == [
        ("selfsubjectaccessreviews", "SelfSubjectAccessReview", ["create"], False)
    ]
    status, body = _raw(server, "GET", "/apis/authorization.k8s.io")
    assert status == 200 and body["kind"] == "APIGroup"
