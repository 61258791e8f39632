"""The kubelet's pure decisions: images, identity, env, IPs, restarts, container and pod status."""

from __future__ import annotations

import base64
import ipaddress
from typing import Any

import pytest

from sandbox import kubelet_logic as logic
from sandbox.config import SandboxConfig
from sandbox.kubelet_probes import (
    ProbeCounter,
    ProbeParams,
    http_probe_request,
    http_status_ok,
    resolve_port,
)

CONFIG = SandboxConfig(name="t1")
PY = "/venv/bin/python"


def pod(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "labels": {"app": "a"}},
        "spec": {"nodeName": "n", "containers": [{"name": "c", "image": "x"}], **spec},
    }


# -- images -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "repo"),
    [
        ("kvpn-sandbox/echo", "kvpn-sandbox/echo"),
        ("kvpn-sandbox/echo:latest", "kvpn-sandbox/echo"),
        ("ghcr.io/kvpn/shadow:v1@sha256:abc", "kvpn/shadow"),
        ("localhost:5000/kvpn-sandbox/dns:1", "kvpn-sandbox/dns"),
        ("docker.io/library/busybox:1.36", "busybox"),
        ("busybox", "busybox"),
    ],
)
def test_image_repository(image: str, repo: str) -> None:
    assert logic.image_repository(image) == repo


def test_argv_for_known_images_appends_args_and_expands_vars() -> None:
    c = {"name": "c", "image": "reg.example/kvpn/shadow:9", "args": ["--port", "$(PORT)", "$$x"]}
    assert logic.container_argv(c, PY, {"PORT": "80"}) == [
        PY, "-m", "kvpn.shadow", "--port", "80", "$x",
    ]  # fmt: skip
    echo = {"name": "c", "image": "kvpn-sandbox/echo"}
    assert logic.container_argv(echo, PY, {}) == [PY, "-m", "sandbox.echo_server"]


def test_argv_command_wins_over_image() -> None:
    c = {"name": "c", "image": "kvpn-sandbox/echo", "command": ["sleep"], "args": ["$(N)"]}
    assert logic.container_argv(c, PY, {"N": "5"}) == ["sleep", "5"]


def test_unknown_image_without_command_is_err_image_pull_naming_known_images() -> None:
    with pytest.raises(logic.ContainerConfigError) as err:
        logic.container_argv({"name": "c", "image": "nginx:1.25"}, PY, {})
    assert err.value.reason == "ErrImagePull"
    assert "nginx:1.25" in err.value.message
    for known in logic.IMAGE_PROGRAMS:
        assert known in err.value.message


def test_expand_vars_leaves_unknown_references() -> None:
    assert logic.expand_vars("$(A)-$(B)-$$(A)", {"A": "1"}) == "1-$(B)-$(A)"


# -- identity -----------------------------------------------------------------------------


def test_run_as_pod_level_and_container_override() -> None:
    p = pod(securityContext={"runAsUser": 1000, "runAsGroup": 2000, "supplementalGroups": [3]})
    c = {"name": "c", "securityContext": {"runAsUser": 1001}}
    ident = logic.run_as(p, c)
    assert ident == logic.RunAs(1001, 2000, (3,))
    assert ident.setpriv_prefix() == [
        "setpriv", "--reuid", "1001", "--regid", "2000", "--groups", "3", "--",
    ]  # fmt: skip
    assert logic.run_as(pod(), {"name": "c"}).setpriv_prefix() == []
    only_uid = logic.run_as(pod(), {"name": "c", "securityContext": {"runAsUser": 5}})
    assert only_uid.setpriv_prefix() == [
        "setpriv", "--reuid", "5", "--regid", "0", "--clear-groups", "--",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("sc", "fragment"),
    [
        ({"runAsNonRoot": True}, "image will run as root"),
        ({"runAsNonRoot": True, "runAsUser": 0}, "breaks non-root policy"),
    ],
)
def test_run_as_non_root_errors(sc: dict[str, Any], fragment: str) -> None:
    with pytest.raises(logic.ContainerConfigError) as err:
        logic.run_as(pod(securityContext=sc), {"name": "c"})
    assert err.value.reason == "CreateContainerConfigError"
    assert fragment in err.value.message
    assert 'pod: "p_ns(u-1)"' in err.value.message


def test_run_as_non_root_with_user_is_fine() -> None:
    assert logic.run_as(pod(securityContext={"runAsNonRoot": True, "runAsUser": 7}), {}).uid == 7


# -- environment --------------------------------------------------------------------------


def _env(p: dict[str, Any], c: dict[str, Any], **kw: Any) -> dict[str, str]:
    return logic.container_env(
        p, c, config=CONFIG, pod_ip="10.244.0.5", host_ip="172.31.255.1", bin_dir="/venv/bin",
        **kw,
    )  # fmt: skip


def test_env_basics_field_refs_and_order() -> None:
    c = {
        "name": "c",
        "image": "kvpn-sandbox/echo",
        "env": [
            {"name": "A", "value": "1"},
            {"name": "B", "value": "$(A)2"},
            {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "L", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        ],
    }
    env = _env(pod(), c)
    assert env["PATH"].startswith("/venv/bin:")
    assert env["HOME"] == "/tmp"
    assert env["HOSTNAME"] == "p"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["KUBERNETES_SERVICE_HOST"] == "10.96.0.1"
    assert env["KUBERNETES_SERVICE_PORT"] == "443"
    assert env["KUBERNETES_PORT_443_TCP"] == "tcp://10.96.0.1:443"
    assert env["KVPN_SANDBOX_KUBECONFIG"] == str(CONFIG.state_dir / "kubeconfig-pods")
    assert (env["A"], env["B"]) == ("1", "12")
    assert (env["NAME"], env["NS"], env["IP"], env["NODE"], env["L"]) == (
        "p", "ns", "10.244.0.5", "n", "a",
    )  # fmt: skip


def test_env_service_links_and_opt_out() -> None:
    svc = {
        "metadata": {"name": "my-svc"},
        "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80}]},
    }
    headless = {"metadata": {"name": "h"}, "spec": {"clusterIP": "None", "ports": [{"port": 1}]}}
    env = _env(pod(), {"name": "c", "command": ["x"]}, services=[svc, headless])
    assert env["MY_SVC_SERVICE_HOST"] == "10.96.0.20"
    assert env["MY_SVC_SERVICE_PORT_HTTP"] == "80"
    assert env["MY_SVC_PORT_80_TCP_ADDR"] == "10.96.0.20"
    assert not any(k.startswith("H_") for k in env)
    assert "PYTHONUNBUFFERED" not in env  # only the sandbox's images set it
    off = _env(pod(enableServiceLinks=False), {"name": "c"}, services=[svc])
    assert "MY_SVC_SERVICE_HOST" not in off and "KUBERNETES_SERVICE_HOST" in off


def test_env_config_maps_secrets_and_missing_references() -> None:
    objects = {
        ("configmaps", "cm"): {"data": {"k": "v", "other": "o"}},
        ("secrets", "s"): {"data": {"pw": base64.b64encode(b"hunter2").decode()}},
    }

    def lookup(plural: str, name: str) -> dict[str, Any] | None:
        return objects.get((plural, name))

    c = {
        "name": "c",
        "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "CM_"}],
        "env": [
            {"name": "K", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}},
            {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "pw"}}},
            {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "x", "key": "y",
                                                           "optional": True}}},
        ],
    }  # fmt: skip
    env = _env(pod(), c, lookup=lookup)
    assert (env["K"], env["PW"], env["CM_other"]) == ("v", "hunter2", "o")
    assert "OPT" not in env
    missing = {"name": "c", "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {
        "name": "nope", "key": "k"}}}]}  # fmt: skip
    with pytest.raises(logic.ContainerConfigError) as err:
        _env(pod(), missing, lookup=lookup)
    assert err.value.reason == "CreateContainerConfigError"
    assert 'configmap "nope" not found' in err.value.message


# -- IPs and restarts ---------------------------------------------------------------------


def test_allocate_ip_skips_network_gateway_and_broadcast() -> None:
    cidr = ipaddress.IPv4Network("10.244.0.0/29")
    used: list[ipaddress.IPv4Address] = []
    while (ip := logic.allocate_ip(cidr, used)) is not None:
        used.append(ip)
    assert [str(i) for i in used] == [f"10.244.0.{n}" for n in range(2, 7)]
    freed = [i for i in used if str(i) != "10.244.0.4"]
    assert str(logic.allocate_ip(cidr, freed)) == "10.244.0.4"
    pref = ipaddress.IPv4Address("10.244.0.6")
    assert logic.allocate_ip(cidr, [], preferred=pref) == pref
    assert str(logic.allocate_ip(cidr, [], preferred=cidr.network_address + 1)) == "10.244.0.2"


@pytest.mark.parametrize(
    ("policy", "code", "restart"),
    [("Always", 0, True), ("Always", 1, True), ("OnFailure", 0, False),
     ("OnFailure", 2, True), ("Never", 1, False)],
)  # fmt: skip
def test_should_restart(policy: str, code: int, restart: bool) -> None:
    assert logic.should_restart(policy, code) is restart


def test_backoff_delay_doubles_to_cap() -> None:
    delays = [logic.backoff_delay(n, base=1.0, cap=10.0) for n in range(7)]
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert logic.exit_code_of(-9) == 137 and logic.exit_code_of(3) == 3


# -- container state machine and pod status -----------------------------------------------


def test_container_record_lifecycle_and_status() -> None:
    r = logic.ContainerRecord("c", "kvpn-sandbox/echo", "sandbox://kvpn-sandbox/echo")
    assert r.status()["state"] == {"waiting": {"reason": "ContainerCreating"}}
    assert r.status()["imageID"] == "" and "containerID" not in r.status()
    r.set_running(42, "T1")
    r.ready = True
    s = r.status()
    assert s["state"] == {"running": {"startedAt": "T1"}}
    assert (s["ready"], s["started"], s["restartCount"]) == (True, True, 0)
    assert s["containerID"] == "sandbox://42"
    r.set_terminated(3, "T2")
    s = r.status()
    assert s["state"]["terminated"]["exitCode"] == 3
    assert s["state"]["terminated"]["reason"] == "Error"
    assert s["ready"] is False
    r.set_waiting("CrashLoopBackOff", "back-off")
    s = r.status()
    assert s["lastState"]["terminated"]["finishedAt"] == "T2"
    assert s["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert r.next_attempt == 1
    r.set_running(43, "T3")
    assert r.status()["restartCount"] == 1
    with pytest.raises(logic.IllegalTransition):
        r.set_waiting("x")


def test_start_failure_is_terminated_start_error() -> None:
    r = logic.ContainerRecord("c", "i")
    r.set_start_failed("T", 'exec: "nope": executable file not found in $PATH')
    term = r.status()["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (128, "StartError")
    assert "nope" in term["message"]


def _rec(state: str, code: int = 0, last: int | None = None) -> logic.ContainerRecord:
    r = logic.ContainerRecord("c", "i")
    if last is not None:
        r.set_running(1, "T")
        r.set_terminated(last, "T")
        r.set_waiting("CrashLoopBackOff")
    if state in ("running", "terminated"):
        r.set_running(2, "T")
    if state == "terminated":
        r.set_terminated(code, "T")
    return r


@pytest.mark.parametrize(
    ("policy", "records", "phase"),
    [
        ("Always", [_rec("waiting")], "Pending"),
        ("Always", [_rec("running")], "Running"),
        ("Always", [_rec("waiting", last=1)], "Running"),  # CrashLoopBackOff
        ("Never", [_rec("terminated", 0)], "Succeeded"),
        ("Never", [_rec("terminated", 1)], "Failed"),
        ("Never", [_rec("terminated", 1), _rec("running")], "Running"),
        ("OnFailure", [_rec("terminated", 0), _rec("terminated", 0)], "Succeeded"),
        ("Always", [_rec("running"), _rec("waiting")], "Pending"),
    ],
)
def test_pod_phase(policy: str, records: list[logic.ContainerRecord], phase: str) -> None:
    assert logic.pod_phase(policy, records) == phase


def test_pod_status_conditions_keep_transition_times() -> None:
    r = logic.ContainerRecord("c", "i")
    p = pod()
    status = logic.pod_status(p, [r], now="T0", pod_ip="10.244.0.2", host_ip="H", start_time="S")
    conds = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Pending"
    assert conds["Ready"]["status"] == "False"
    assert conds["Ready"]["reason"] == "ContainersNotReady"
    assert conds["Ready"]["message"] == "containers with unready status: [c]"
    assert conds["PodScheduled"]["status"] == "True"
    assert status["podIP"] == "10.244.0.2" and status["podIPs"] == [{"ip": "10.244.0.2"}]
    assert status["hostIP"] == "H" and status["startTime"] == "S"

    p["status"] = status
    r.set_running(5, "T1")
    r.ready = True
    later = logic.pod_status(p, [r], now="T1", pod_ip="10.244.0.2", host_ip="H", start_time="S")
    conds = {c["type"]: c for c in later["conditions"]}
    assert later["phase"] == "Running"
    assert conds["Ready"] == {"type": "Ready", "status": "True", "lastProbeTime": None,
                              "lastTransitionTime": "T1"}  # fmt: skip
    assert conds["PodScheduled"]["lastTransitionTime"] == "T0"

    p["status"] = later
    r.set_terminated(0, "T2")
    done = logic.pod_status(
        {**p, "spec": {**p["spec"], "restartPolicy": "Never"}}, [r],
        now="T2", pod_ip="10.244.0.2", host_ip="H", start_time="S",
    )  # fmt: skip
    conds = {c["type"]: c for c in done["conditions"]}
    assert done["phase"] == "Succeeded"
    assert conds["Ready"]["reason"] == "PodCompleted"


# -- probes -------------------------------------------------------------------------------


def test_probe_params_and_counter() -> None:
    params = ProbeParams.from_spec({"periodSeconds": 0, "failureThreshold": 2})
    assert params.period == 1.0 and params.timeout == 1.0 and params.initial_delay == 0.0
    counter = ProbeCounter(params)
    assert counter.observe(True) is True
    assert counter.observe(False) is None
    assert counter.observe(False) is False
    assert counter.observe(True) is True


def test_probe_port_resolution_and_http_request() -> None:
    container = {"ports": [{"name": "http", "containerPort": 8080}]}
    assert resolve_port("http", container) == 8080
    assert resolve_port(81, container) == 81
    assert resolve_port("81", container) == 81
    assert resolve_port("nope", container) is None
    assert resolve_port(0, container) is None
    raw = http_probe_request(
        {"path": "healthz", "httpHeaders": [{"name": "X-A", "value": "b"}]}, "10.0.0.1", 80
    )
    assert raw.startswith(b"GET /healthz HTTP/1.1\r\nHost: 10.0.0.1:80\r\n")
    assert b"X-A: b\r\n" in raw and raw.endswith(b"\r\n\r\n")
    assert http_status_ok(b"HTTP/1.1 204 No Content\r\n")
    assert http_status_ok(b"HTTP/1.0 302 Found\r\n")
    assert not http_status_ok(b"HTTP/1.1 500 Oops\r\n")
    assert not http_status_ok(b"garbage")
