"""Shadow pod plan, manifest and the create / wait / delete helpers (fake CoreV1Api)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes.client import (
    V1ContainerState,
    V1ContainerStateRunning,
    V1ContainerStateTerminated,
    V1ContainerStateWaiting,
    V1ContainerStatus,
    V1Pod,
    V1PodCondition,
    V1PodStatus,
)
from kubernetes.client.exceptions import ApiException

from kvpn.cluster.shadow_pod import (
    ShadowPodError,
    ShadowPodPlan,
    ShadowPodProgress,
    create_shadow_pod,
    delete_shadow_pod,
    fatal_problem,
    parse_host_key_line,
    pod_progress,
    wait_shadow_ready,
)
from kvpn.tunnel.keys import new_session_key, public_key_text

CLIENT_KEY = public_key_text(new_session_key())
HOST_KEY = new_session_key()
HOST_LINE = "KVPN-HOST-KEY " + public_key_text(HOST_KEY)


def make_plan(**kw: Any) -> ShadowPodPlan:
    return ShadowPodPlan.new(
        "dev",
        CLIENT_KEY,
        user="alice@example.com",
        session_id="ab12cd34",
        now=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        **kw,
    )


def test_plan_names_and_metadata() -> None:
    plan = make_plan()
    assert plan.name == "kvpn-shadow-ab12cd34"
    assert plan.started_at == "2025-01-02T03:04:05Z"
    meta = plan.manifest()["metadata"]
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "kvpn"
    assert meta["labels"]["kvpn.dev/session"] == "ab12cd34"
    assert meta["annotations"] == {
        "kvpn.dev/user": "alice@example.com",
        "kvpn.dev/started-at": "2025-01-02T03:04:05Z",
    }


def test_plan_generates_valid_session_ids() -> None:
    a = ShadowPodPlan.new("dev", CLIENT_KEY, user="u")
    b = ShadowPodPlan.new("dev", CLIENT_KEY, user="u")
    assert a.session_id != b.session_id
    with pytest.raises(ValueError):
        ShadowPodPlan.new("dev", CLIENT_KEY, user="u", session_id="Not_Valid")


def test_manifest_is_pod_security_restricted() -> None:
    spec = make_plan().manifest()["spec"]
    pod_sc = spec["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] == 1000
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod_sc["sysctls"] == [{"name": "net.ipv4.ping_group_range", "value": "0 2147483647"}]
    [container] = spec["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    assert spec["restartPolicy"] == "Never"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["KVPN_AUTHORIZED_KEY"] == CLIENT_KEY
    assert env["KVPN_LISTEN_PORT"] == "2222"
    assert container["image"] == "kvpn/shadow:0.1.0"
    assert container["ports"][0]["containerPort"] == 2222


def test_manifest_deserialises_into_the_client_model() -> None:
    """The official client validates models: the manifest must be a schema-valid V1Pod."""

    manifest = make_plan().manifest()
    pod = V1Pod.from_dict(manifest)
    assert pod is not None
    as_dict = pod.to_dict()
    assert as_dict["spec"]["containers"][0]["security_context"]["capabilities"]["drop"] == ["ALL"]
    pod_sc = as_dict["spec"]["security_context"]
    assert pod_sc["run_as_non_root"] is True
    assert pod_sc["sysctls"] == manifest["spec"]["securityContext"]["sysctls"]


# --- progress and readiness ---------------------------------------------------------------


def pod(
    phase: str,
    *,
    waiting: str | None = None,
    running: bool = False,
    exit_code: int | None = None,
    ip: str | None = None,
    unschedulable: str | None = None,
) -> V1Pod:
    state = None
    if waiting:
        state = V1ContainerState(waiting=V1ContainerStateWaiting(reason=waiting, message="msg"))
    elif running:
        state = V1ContainerState(running=V1ContainerStateRunning())
    elif exit_code is not None:
        state = V1ContainerState(
            terminated=V1ContainerStateTerminated(exit_code=exit_code, reason="Error")
        )
    statuses = None
    if state is not None:
        statuses = [
            V1ContainerStatus(
                name="shadow", image="i", image_id="", ready=running, restart_count=0, state=state
            )
        ]
    conditions = None
    if unschedulable:
        conditions = [
            V1PodCondition(
                type="PodScheduled", status="False", reason="Unschedulable", message=unschedulable
            )
        ]
    return V1Pod(
        status=V1PodStatus(
            phase=phase, pod_ip=ip, container_statuses=statuses, conditions=conditions
        )
    )


def test_pod_progress_summaries() -> None:
    assert pod_progress(pod("Pending")) == ShadowPodProgress("Pending")
    assert pod_progress(pod("Pending", waiting="ContainerCreating")).reason == "ContainerCreating"
    p = pod_progress(pod("Pending", unschedulable="0/1 nodes are available"))
    assert (p.reason, p.message) == ("Unschedulable", "0/1 nodes are available")
    r = pod_progress(pod("Running", running=True, ip="10.244.0.9"))
    assert r.running and r.pod_ip == "10.244.0.9"
    t = pod_progress(pod("Running", exit_code=2))
    assert t.exit_code == 2


@pytest.mark.parametrize(
    ("state", "fatal"),
    [
        (pod("Pending", waiting="ContainerCreating"), False),
        (pod("Pending", waiting="ErrImagePull"), False),
        (pod("Pending", waiting="ImagePullBackOff"), True),
        (pod("Pending", waiting="CreateContainerConfigError"), True),
        (pod("Running", exit_code=2), True),
        (pod("Failed"), True),
        (pod("Running", running=True, ip="10.0.0.1"), False),
    ],
)
def test_fatal_problem(state: V1Pod, fatal: bool) -> None:
    assert (fatal_problem(pod_progress(state)) is not None) is fatal


def test_parse_host_key_line() -> None:
    log = f"2025 INFO starting\n{HOST_LINE}\n2025 INFO listening\n"
    assert parse_host_key_line(log) == HOST_KEY.convert_to_public()
    assert parse_host_key_line("no key here") is None
    assert parse_host_key_line("KVPN-HOST-KEY garbage") is None


class FakeCoreV1:
    """Scripted CoreV1Api: read_namespaced_pod walks through `states`, logs follow `logs`."""

    def __init__(self, states: list[V1Pod | ApiException], logs: list[str] | None = None) -> None:
        self._states: Iterator[V1Pod | ApiException] = iter(states)
        self._last: V1Pod | ApiException | None = None
        self._logs = list(logs or [])
        self.created: list[tuple[str, dict[str, Any]]] = []
        self.deleted: list[tuple[str, str, int]] = []
        self.delete_error: ApiException | None = None
        self.create_error: ApiException | None = None

    def create_namespaced_pod(self, namespace: str, body: dict[str, Any]) -> None:
        if self.create_error:
            raise self.create_error
        self.created.append((namespace, body))

    def read_namespaced_pod(self, name: str, namespace: str) -> V1Pod:
        self._last = next(self._states, self._last)
        if isinstance(self._last, ApiException):
            raise self._last
        assert self._last is not None
        return self._last

    def read_namespaced_pod_log(self, name: str, namespace: str, **kw: Any) -> str:
        if not self._logs:
            raise ApiException(status=400, reason="container is waiting to start")
        return self._logs.pop(0) if len(self._logs) > 1 else self._logs[0]

    def delete_namespaced_pod(self, name: str, namespace: str, grace_period_seconds: int) -> None:
        if self.delete_error:
            raise self.delete_error
        self.deleted.append((namespace, name, grace_period_seconds))


async def test_wait_reports_progress_and_returns_ip_and_pinned_key() -> None:
    core = FakeCoreV1(
        [
            pod("Pending"),
            pod("Pending", waiting="ContainerCreating"),
            pod("Pending", waiting="ContainerCreating"),
            pod("Running", running=True, ip="10.244.1.7"),
        ],
        logs=["", HOST_LINE + "\n"],
    )
    seen: list[ShadowPodProgress] = []
    ready = await wait_shadow_ready(core, make_plan(), seen.append, poll_interval=0)
    assert ready.pod_ip == "10.244.1.7"
    assert ready.host_key == HOST_KEY.convert_to_public()
    pod_ip, host_key = ready  # unpacks like the (pod_ip, host_key) tuple of the design
    assert [(p.phase, p.reason) for p in seen] == [
        ("Pending", None),
        ("Pending", "ContainerCreating"),
        ("Running", None),
    ]


async def test_wait_fails_fast_with_log_tail_when_agent_exits() -> None:
    core = FakeCoreV1(
        [pod("Pending"), pod("Running", exit_code=2)],
        logs=["kvpn shadow agent: KVPN_AUTHORIZED_KEY is not set"],
    )
    with pytest.raises(ShadowPodError, match="exited with code 2") as info:
        await wait_shadow_ready(core, make_plan(), lambda p: None, poll_interval=0)
    assert "KVPN_AUTHORIZED_KEY is not set" in str(info.value)


async def test_wait_fails_on_image_pull_backoff() -> None:
    core = FakeCoreV1([pod("Pending", waiting="ImagePullBackOff")])
    with pytest.raises(ShadowPodError, match="cannot start.*ImagePullBackOff"):
        await wait_shadow_ready(core, make_plan(), lambda p: None, poll_interval=0)


async def test_wait_times_out_with_last_state() -> None:
    ticks = iter(range(1000))
    core = FakeCoreV1([pod("Pending", waiting="ContainerCreating")])
    with pytest.raises(ShadowPodError, match=r"not ready after 5s.*ContainerCreating"):
        await wait_shadow_ready(
            core, make_plan(), lambda p: None, timeout=5, poll_interval=0, clock=lambda: next(ticks)
        )


async def test_wait_reports_deleted_pod() -> None:
    core = FakeCoreV1([pod("Pending"), ApiException(status=404, reason="Not Found")])
    with pytest.raises(ShadowPodError, match="disappeared"):
        await wait_shadow_ready(core, make_plan(), lambda p: None, poll_interval=0)


async def test_create_and_delete() -> None:
    core = FakeCoreV1([])
    plan = make_plan()
    await create_shadow_pod(core, plan)
    assert core.created == [("dev", plan.manifest())]
    assert await delete_shadow_pod(core, plan) is True
    assert core.deleted == [("dev", plan.name, 0)]
    core.delete_error = ApiException(status=404, reason="Not Found")
    assert await delete_shadow_pod(core, plan) is False
    core.delete_error = ApiException(status=403, reason="Forbidden")
    with pytest.raises(ShadowPodError, match="403"):
        await delete_shadow_pod(core, plan)
    core.create_error = ApiException(status=409, reason="Conflict")
    with pytest.raises(ShadowPodError, match="cannot create shadow pod dev/kvpn-shadow-ab12cd34"):
        await create_shadow_pod(core, plan)


# --- the real kubernetes client against a tiny fake API server ---------------------------


async def test_helpers_with_the_official_client() -> None:
    """create / wait / delete through kubernetes.client.CoreV1Api over HTTP, so the call
    signatures, the dict body and the log endpoint are exercised for real."""
    import copy

    from aiohttp import web
    from kubernetes.client import ApiClient, Configuration, CoreV1Api

    pods: dict[str, dict[str, Any]] = {}
    reads: dict[str, int] = {}
    log_queries: list[str] = []
    delete_queries: list[str] = []

    def not_found(name: str) -> web.Response:
        return web.json_response(
            {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
             "code": 404, "message": f'pods "{name}" not found'},  # fmt: skip
            status=404,
        )

    async def create(request: web.Request) -> web.Response:
        body = await request.json()
        pods[body["metadata"]["name"]] = body
        return web.json_response(body | {"status": {"phase": "Pending"}}, status=201)

    async def read(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in pods:
            return not_found(name)
        reads[name] = reads.get(name, 0) + 1
        obj = copy.deepcopy(pods[name])
        if reads[name] == 1:
            obj["status"] = {"phase": "Pending", "containerStatuses": [
                {"name": "shadow", "image": "i", "imageID": "", "ready": False,
                 "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}]}  # fmt: skip
        else:
            obj["status"] = {"phase": "Running", "podIP": "10.244.0.5", "containerStatuses": [
                {"name": "shadow", "image": "i", "imageID": "", "ready": True,
                 "restartCount": 0, "state": {"running": {}}}]}  # fmt: skip
        return web.json_response(obj)

    async def log(request: web.Request) -> web.Response:
        log_queries.append(request.query_string)
        return web.Response(text=f"starting\n{HOST_LINE}\n", content_type="text/plain")

    async def delete(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        delete_queries.append(request.query_string)
        if name not in pods:
            return not_found(name)
        return web.json_response(pods.pop(name))

    app = web.Application()
    app.router.add_post("/api/v1/namespaces/{ns}/pods", create)
    app.router.add_get("/api/v1/namespaces/{ns}/pods/{name}", read)
    app.router.add_get("/api/v1/namespaces/{ns}/pods/{name}/log", log)
    app.router.add_delete("/api/v1/namespaces/{ns}/pods/{name}", delete)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server: Any = site._server
    port = server.sockets[0].getsockname()[1]
    try:
        core = CoreV1Api(ApiClient(Configuration(host=f"http://127.0.0.1:{port}")))
        plan = make_plan()
        await create_shadow_pod(core, plan)
        sent = pods[plan.name]
        assert sent["spec"]["securityContext"]["sysctls"] == [
            {"name": "net.ipv4.ping_group_range", "value": "0 2147483647"}
        ]
        assert sent["spec"]["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert sent["metadata"]["annotations"]["kvpn.dev/user"] == "alice@example.com"

        seen: list[ShadowPodProgress] = []
        ready = await wait_shadow_ready(core, plan, seen.append, poll_interval=0)
        assert ready == ("10.244.0.5", HOST_KEY.convert_to_public())
        assert [p.reason for p in seen] == ["ContainerCreating", None]
        assert "container=shadow" in log_queries[0]

        assert await delete_shadow_pod(core, plan) is True
        assert "gracePeriodSeconds=0" in delete_queries[0]
        assert await delete_shadow_pod(core, plan) is False
    finally:
        await runner.cleanup()
