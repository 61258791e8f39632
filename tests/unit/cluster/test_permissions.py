"""The permission preflight: what each command needs, the one-line verdict, skipping when the
reviews cannot be made, and one clear line for a 403 met later."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import kubernetes.client as k8s
import pytest

from kvpn.cli.errors import UserError
from kvpn.cluster.cleanup import DeletePod, DeleteService, RestoreDeployment, RestoreService
from kvpn.cluster.forbidden import describe_api_error, parse_forbidden
from kvpn.cluster.mesh_cleanup import DeleteMeshService, DropMeshMembers
from kvpn.cluster.permissions import (
    Answer,
    Permission,
    PermissionCheck,
    check_permissions,
    cleanup_permissions,
    connect_permissions,
    exchange_permissions,
    judge,
    preview_permissions,
    require_permissions,
    shadow_pod_permissions,
)
from sandbox.apiserver import authorization as authz
from tests.unit.apiserver.conftest import RunningServer, start_server, stop_server

PORTFORWARD = Permission("create", "pods", "default", "portforward")


def _described(perms: tuple[Permission, ...]) -> set[str]:
    return {p.describe() for p in perms}


# -- what commands need ---------------------------------------------------------------------------


def test_permission_text_and_review_body() -> None:
    assert PORTFORWARD.describe() == "create pods/portforward"
    assert Permission("patch", "deployments", "ns", group="apps").describe() == (
        "patch deployments.apps"
    )
    assert PORTFORWARD.review_body() == {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {
            "resourceAttributes": {
                "verb": "create", "resource": "pods", "group": "",
                "subresource": "portforward", "namespace": "default",
            }
        },
    }  # fmt: skip
    cluster_wide = Permission("list", "services").review_body()["spec"]["resourceAttributes"]
    assert "namespace" not in cluster_wide


def test_each_command_lists_what_it_needs() -> None:
    shadow = {"create pods", "get pods", "delete pods", "get pods/log"}
    portforward = {"create pods/portforward", "get pods/portforward"}
    assert _described(connect_permissions("ns", "portforward")) == shadow | portforward
    assert _described(connect_permissions("ns", "direct")) == shadow
    assert all(p.namespace == "ns" for p in connect_permissions("ns", "portforward"))
    selector = exchange_permissions("ns", scale=False)
    assert _described(selector) == shadow | portforward | {"get services", "patch services"}
    scale = _described(exchange_permissions("ns", scale=True, by_deployment=True))
    assert {"patch deployments.apps", "list deployments.apps", "patch pods",
            "list services"} <= scale  # fmt: skip
    assert len(exchange_permissions("ns", scale=True, by_deployment=True)) == len(scale)
    assert {"create services", "delete services", "patch services"} <= _described(
        preview_permissions("ns")
    )
    assert shadow_pod_permissions("x") == connect_permissions("x", "portforward")


def test_cleanup_needs_what_its_actions_do() -> None:
    actions = [
        RestoreService("a", "echo", (), "expired"),
        RestoreDeployment("a", "echo", (), 2),
        DeletePod("b", "kvpn-shadow-1", "dead"),
        DeletePod("b", "kvpn-shadow-2", "dead"),
        DeleteService("a", "preview", "expired"),
    ]
    assert [(p.describe(), p.namespace) for p in cleanup_permissions(actions)] == [
        ("patch services", "a"),
        ("patch deployments.apps", "a"),
        ("get deployments.apps", "a"),
        ("delete pods", "b"),
        ("delete services", "a"),
    ]
    assert cleanup_permissions([]) == ()


# -- the verdict ----------------------------------------------------------------------------------


def test_judge_names_every_missing_permission_in_one_line() -> None:
    needed = [
        Permission("create", "pods", "default"),
        PORTFORWARD,
        Permission("get", "pods", "default"),
        Permission("list", "services"),
    ]
    check = judge(needed, [Answer.DENIED, Answer.DENIED, Answer.ALLOWED, Answer.DENIED])
    assert check.checked and not check.ok
    assert check.message() == (
        "not allowed to create pods, create pods/portforward in namespace default; "
        "list services cluster-wide (RBAC); ask your cluster admin for: create pods, "
        "create pods/portforward, list services"
    )
    assert judge(needed[:1], [Answer.ALLOWED]) == PermissionCheck(True)
    skipped = judge(needed[:2], [Answer.DENIED, Answer.UNKNOWN])
    assert not skipped.checked and skipped.ok and skipped.message() == ""


class FakeReview:
    def __init__(self, answers: dict[str, Answer], default: Answer = Answer.ALLOWED) -> None:
        self.answers = answers
        self.default = default
        self.asked: list[Permission] = []

    async def __call__(self, permission: Permission) -> Answer:
        self.asked.append(permission)
        return self.answers.get(permission.describe(), self.default)


async def test_check_asks_once_per_permission() -> None:
    review = FakeReview({"create pods/portforward": Answer.DENIED})
    needed = connect_permissions("default", "portforward")
    check = await check_permissions([*needed, *needed], review)
    assert check.missing == (PORTFORWARD,)
    assert sorted(review.asked) == sorted(needed)


async def test_check_is_skipped_when_reviews_cannot_be_made() -> None:
    review = FakeReview({}, default=Answer.UNKNOWN)
    check = await check_permissions(connect_permissions("default", "portforward"), review)
    assert not check.checked and check.ok
    assert len(review.asked) == 1  # stops after the first unanswerable review
    assert await check_permissions([], review) == PermissionCheck(True)


async def test_require_raises_one_line_user_error() -> None:
    review = FakeReview({"create pods": Answer.DENIED})
    with pytest.raises(UserError) as err:
        await require_permissions(None, connect_permissions("default", "direct"), review=review)
    assert str(err.value) == (
        "not allowed to create pods in namespace default (RBAC); ask your cluster admin for: "
        "create pods"
    )
    assert "\n" not in str(err.value)
    ok = await require_permissions(None, [PORTFORWARD], review=FakeReview({}))
    assert ok.checked and ok.ok


# -- a 403 met later ----------------------------------------------------------------------------


@dataclass
class FakeApiException:
    status: int
    reason: str
    body: str | bytes | None


def _status(message: str) -> str:
    return json.dumps({"kind": "Status", "status": "Failure", "message": message,
                       "reason": "Forbidden", "code": 403})  # fmt: skip


def test_forbidden_becomes_one_line_naming_the_permission() -> None:
    exc = FakeApiException(403, "Forbidden", _status(
        'pods "p" is forbidden: User "dev" cannot create resource "pods/portforward" in API '
        'group "" in the namespace "team-a"'
    ))  # fmt: skip
    assert describe_api_error(exc) == (
        "403 Forbidden: not allowed to create pods/portforward in namespace team-a (RBAC); "
        "ask your cluster admin for: create pods/portforward"
    )
    scale = FakeApiException(403, "Forbidden", _status(
        'deployments.apps "d" is forbidden: User "dev" cannot patch resource '
        '"deployments/scale" in API group "apps" in the namespace "x"'
    ).encode())  # fmt: skip
    assert "ask your cluster admin for: patch deployments.apps/scale" in describe_api_error(scale)
    nodes = parse_forbidden(
        'nodes is forbidden: User "dev" cannot list resource "nodes" in API group "" at the '
        "cluster scope"
    )
    assert nodes is not None and nodes.where() == "cluster-wide"
    # Not RBAC's wording (an admission webhook, PodSecurity...): the server's message, one line.
    other = FakeApiException(403, "Forbidden", _status('pods "x" is forbidden:\nviolates'))
    assert describe_api_error(other) == '403 Forbidden: pods "x" is forbidden: violates'
    assert describe_api_error(FakeApiException(404, "Not Found", "not json")) == "404 Not Found"
    assert describe_api_error(FakeApiException(403, "Forbidden", None)) == "403 Forbidden"
    long = FakeApiException(403, "Forbidden", _status("x" * 1000))
    assert len(describe_api_error(long)) <= 300


# -- against the sandbox API server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    srv, thread = start_server()
    try:
        yield srv
    finally:
        stop_server(srv, thread)


def _deny(server: RunningServer, *rules: dict[str, str]) -> None:
    core = k8s.CoreV1Api(server.client())
    core.create_namespaced_config_map("kube-system", authz.rules_configmap(list(rules)))


def _allow_all(server: RunningServer) -> None:
    k8s.CoreV1Api(server.client()).delete_namespaced_config_map(
        authz.AUTHZ_CONFIGMAP, "kube-system"
    )


async def test_preflight_against_the_sandbox(server: RunningServer) -> None:
    api = server.client()
    needed = exchange_permissions("default", scale=False)
    assert (await require_permissions(api, needed, namespace="default")).checked
    _deny(server, {"verb": "create", "resource": "pods/portforward", "namespace": "default"},
          {"verb": "patch", "resource": "services"})  # fmt: skip
    try:
        with pytest.raises(UserError) as err:
            await require_permissions(api, needed, namespace="default")
        assert str(err.value) == (
            "not allowed to patch services, create pods/portforward in namespace default "
            "(RBAC); ask your cluster admin for: patch services, create pods/portforward"
        )
    finally:
        _allow_all(server)


async def test_preflight_is_skipped_when_reviews_are_forbidden(server: RunningServer) -> None:
    _deny(server, {"verb": "create", "resource": "selfsubjectaccessreviews"},
          {"verb": "create", "resource": "pods"})  # fmt: skip
    try:
        check = await require_permissions(server.client(), connect_permissions("default", "direct"))
        assert not check.checked  # the command goes on; its own create will say 403
    finally:
        _allow_all(server)


async def test_preflight_says_when_the_namespace_does_not_exist(server: RunningServer) -> None:
    with pytest.raises(UserError) as err:
        await require_permissions(server.client(), [], namespace="no-such-ns")
    assert str(err.value) == "namespace no-such-ns not found"
    _deny(server, {"verb": "get", "resource": "namespaces"})
    try:  # cannot read namespaces: not known, so not refused
        await require_permissions(server.client(), [], namespace="no-such-ns")
    finally:
        _allow_all(server)


async def test_preflight_does_not_block_when_the_server_is_unreachable() -> None:
    cfg = k8s.Configuration(host="http://127.0.0.1:9")  # discard port: refused
    cfg.retries = 0
    check = await require_permissions(
        k8s.ApiClient(cfg), connect_permissions("default", "portforward"), namespace="default"
    )
    assert not check.checked


def test_cleanup_of_a_mesh_needs_to_patch_the_service_and_delete_its_objects() -> None:
    actions = [
        DropMeshMembers("m", "echo", (), ("s1",), ("kvpn-mesh-1",), "expired"),
        DeleteMeshService("n", "echo-kvpn-standin", "orphan", what="stand-in service"),
    ]
    assert [(p.describe(), p.namespace) for p in cleanup_permissions(actions)] == [
        ("patch services", "m"),
        ("delete services", "m"),
        ("delete services", "n"),
    ]
