"""Bad input to every command: one line on stderr, a non-zero exit, no traceback, nothing
changed. Cluster answers come from the sandbox API server running in-process on loopback
(``tests/unit/apiserver``); ``kvpn connect`` runs in a throw-away ``kvpnt-`` namespace so
it never looks at this machine's own DNS or routes."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import kubernetes.client as k8s
import pytest

from sandbox.apiserver import authorization as authz
from tests.unit.apiserver.conftest import TOKEN, RunningServer, start_server, stop_server

BIN = Path(sys.executable).parent
CLUSTER_COMMANDS = [
    ["routes"],
    ["exchange", "echo", "--expose", "8080", "--skip-port-check"],
    ["preview", "p", "--expose", "8080", "--skip-port-check"],
    ["mesh", "echo", "--expose", "8080", "--skip-port-check"],
    ["clean"],
    ["clean", "--dry-run", "-A"],
    ["recover", "echo"],
]


def run(*args: str, netns: str | None = None) -> subprocess.CompletedProcess[str]:
    """The installed ``kvpn`` script in a subprocess (optionally in network namespace
    ``netns``); only where a process of its own is needed (connect), it costs seconds."""
    if netns is None:
        return run_in_process(*args)
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    return subprocess.run(
        ["ip", "netns", "exec", netns, str(BIN / "kvpn"), *args],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip


def run_in_process(*args: str) -> subprocess.CompletedProcess[str]:
    """``kvpn.cli.main.main()`` with ``args``: what the script runs, without the start-up
    cost. Any exception other than SystemExit escapes (a traceback: the test fails)."""
    from kvpn.cli.main import main

    saved_argv, saved_env = sys.argv, os.environ.pop("KUBECONFIG", None)
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["kvpn", *args]
    code: int = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        sys.argv = saved_argv
        if saved_env is not None:
            os.environ["KUBECONFIG"] = saved_env
    return subprocess.CompletedProcess(["kvpn", *args], code, out.getvalue(), err.getvalue())


def one_line(result: subprocess.CompletedProcess[str], *, code: int | None = None) -> str:
    assert result.returncode != 0, result
    if code is not None:
        assert result.returncode == code, result
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def kubeconfig(path: Path, server: str, *, token: str = TOKEN, namespace: str = "") -> str:
    ns = f", namespace: {namespace}" if namespace else ""
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- cluster: {{server: '{server}'}}\n  name: c\n"
        f"contexts:\n- context: {{cluster: c, user: u{ns}}}\n  name: ctx\n"
        "current-context: ctx\n"
        f"users:\n- name: u\n  user: {{token: {token}}}\n"
    )
    return str(path)


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    name = f"kvpnt-cli-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    srv, thread = start_server()
    try:
        yield srv
    finally:
        stop_server(srv, thread)


# -- usage mistakes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["connect", "--bogus"],
        ["connect", "--offload=maybe"],
        ["exchange"],
        ["exchange", "echo"],
        ["exchange", "echo", "--expose", "8080", "--heartbeat", "abc"],
        ["preview", "--expose", "8080"],
        ["mesh"],
        ["recover"],
        ["status", "--output"],
        ["no-such-command"],
    ],
)
def test_usage_mistakes_are_one_line(args: list[str]) -> None:
    line = one_line(run(*args), code=2)
    assert line.startswith("kvpn") and "--help" in line


def test_status_bad_output() -> None:
    assert "--output must be one of" in one_line(run("status", "--output", "xml"), code=2)


def test_the_script_itself(tmp_path: Path) -> None:
    """The installed entry point: help, a usage mistake, a refusal (one subprocess each)."""
    script = str(BIN / "kvpn")
    assert subprocess.run([script, "--help"], capture_output=True, timeout=60).returncode == 0
    bare = subprocess.run([script], capture_output=True, text=True, timeout=60)
    assert bare.returncode == 2 and "Usage" in bare.stdout + bare.stderr
    usage = subprocess.run([script, "exchange"], capture_output=True, text=True, timeout=60)
    assert one_line(usage, code=2).startswith("kvpn exchange: Missing argument")
    refused = subprocess.run(
        [script, "clean", "--kubeconfig", str(tmp_path / "none")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "not found" in one_line(refused, code=2)


# -- bad values, refused before anything happens --------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["routes", "--on-conflict", "bogus"], "--on-conflict must be one of"),
        (["routes", "--include-cidr", "nonsense"], "--include-cidr"),
        (["routes", "--output", "xml"], "--output must be one of"),
        (["exchange", "echo", "--expose", "8080", "--mode", "bogus"], "--mode must be"),
        (["exchange", "echo", "--expose", "0"], "is not a port number"),
        (["exchange", "echo", "--expose", "70000"], "is not a port number"),
        (["exchange", "echo", "--expose", "8080:abc"], "is not a port number"),
        (["exchange", "echo", "--expose", ","], "empty entry"),
        (["exchange", "echo", "--expose", "8080,8080"], "given twice"),
        (["exchange", "echo", "--expose", "8080", "--heartbeat", "0"], "--heartbeat"),
        (["exchange", "a/b/c", "--expose", "8080"], "name a service"),
        (["preview", "p", "--expose", "-1"], "is not a port number"),
        (["mesh", "echo", "--expose", "8080", "--mode", "bogus"], "--mode must be"),
    ],
)
def test_bad_values_are_one_line(args: list[str], says: str, tmp_path: Path) -> None:
    config = kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:9")
    assert says in one_line(run(*args, "--kubeconfig", config), code=2)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--transport", "carrier-pigeon"], "--transport must be one of"),
        (["--dns-mode", "bogus"], "--dns-mode must be one of"),
        (["--on-conflict", "bogus"], "--on-conflict must be one of"),
        (["--include-cidr", "10.0.0.0/33"], "--include-cidr"),
        (["--exclude-cidr", "x"], "--exclude-cidr"),
    ],
)
def test_bad_connect_values_are_one_line(
    args: list[str], says: str, tmp_path: Path, netns: str
) -> None:
    config = kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:9")
    assert says in one_line(run("connect", *args, "--kubeconfig", config, netns=netns), code=2)


# -- kubeconfig problems ---------------------------------------------------------------------------

KUBECONFIGS = {
    "missing": None,
    "not yaml": "this: is: not: yaml: [\n",
    "binary": "\x00\x01\x02",
    "a list": "- a\n- b\n",
    "no current context": "apiVersion: v1\nkind: Config\n",
    "context without cluster": (
        "apiVersion: v1\nkind: Config\ncontexts:\n- context: {cluster: gone, user: u}\n"
        "  name: ctx\ncurrent-context: ctx\nusers:\n- name: u\n  user: {token: t}\n"
    ),
    "contexts not a list": "apiVersion: v1\nkind: Config\ncontexts: 5\ncurrent-context: x\n",
}


def _bad_kubeconfig(tmp_path: Path, kind: str) -> str:
    path = tmp_path / "kubeconfig"
    text = KUBECONFIGS[kind]
    if text is not None:
        path.write_text(text)
    return str(path)


@pytest.mark.parametrize("kind", list(KUBECONFIGS))
@pytest.mark.parametrize("args", CLUSTER_COMMANDS, ids=lambda a: "-".join(a[:2]))
def test_bad_kubeconfig_is_one_line(args: list[str], kind: str, tmp_path: Path) -> None:
    line = one_line(run(*args, "--kubeconfig", _bad_kubeconfig(tmp_path, kind)))
    assert "kubeconfig" in line or "cannot read" in line


@pytest.mark.parametrize("kind", ["missing", "not yaml", "a list"])
def test_bad_kubeconfig_for_connect(kind: str, tmp_path: Path, netns: str) -> None:
    config = _bad_kubeconfig(tmp_path, kind)
    assert "kubeconfig" in one_line(run("connect", "--kubeconfig", config, netns=netns))


def test_kubeconfig_directory_and_unknown_context(tmp_path: Path) -> None:
    assert "Is a directory" in one_line(run("clean", "--kubeconfig", str(tmp_path)))
    config = kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:9")
    for args in CLUSTER_COMMANDS:
        line = one_line(run(*args, "--kubeconfig", config, "--context", "nope"), code=2)
        assert "'nope'" in line and "ctx" in line


@pytest.mark.parametrize("args", CLUSTER_COMMANDS, ids=lambda a: "-".join(a[:2]))
def test_unreachable_api_server_is_one_line(args: list[str], tmp_path: Path) -> None:
    config = kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:9")  # discard: refused
    assert "cannot reach the API server" in one_line(run(*args, "--kubeconfig", config))


def test_unreachable_api_server_for_connect(tmp_path: Path, netns: str) -> None:
    config = kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:9")
    line = one_line(run("connect", "--kubeconfig", config, netns=netns))
    assert "cannot reach the API server" in line


# -- against an API server: unknown namespace / service, RBAC -------------------------------------


def _revision(server: RunningServer) -> int:
    return int(server.call(lambda: server.api.store.revision))


NAMESPACED_COMMANDS = [
    ["exchange", "echo", "--expose", "8080", "--skip-port-check"],
    ["preview", "p", "--expose", "8080", "--skip-port-check"],
    ["clean"],
    ["clean", "--dry-run"],
    ["recover", "echo"],
]


@pytest.mark.parametrize("args", NAMESPACED_COMMANDS, ids=lambda a: "-".join(a[:2]))
def test_unknown_namespace(args: list[str], server: RunningServer, tmp_path: Path) -> None:
    config = kubeconfig(tmp_path / "kubeconfig", server.url)
    before = _revision(server)
    line = one_line(run(*args, "--kubeconfig", config, "-n", "no-such-ns"), code=2)
    assert line == "kvpn: namespace no-such-ns not found"
    assert _revision(server) == before


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["exchange", "nope", "--expose", "8080"], "service default/nope not found"),
        (["exchange", "deployment/nope", "--expose", "8080"], "deployment default/nope not found"),
        (["recover", "nope"], "service default/nope not found"),
    ],
)
def test_unknown_service(args: list[str], says: str, server: RunningServer, tmp_path: Path) -> None:
    config = kubeconfig(tmp_path / "kubeconfig", server.url)
    before = _revision(server)
    assert says in one_line(run(*args, "--kubeconfig", config), code=2)
    assert _revision(server) == before


@pytest.fixture
def deny(server: RunningServer) -> Iterator[object]:
    core = k8s.CoreV1Api(server.client())

    def install(*rules: dict[str, str]) -> None:
        core.create_namespaced_config_map("kube-system", authz.rules_configmap(list(rules)))

    yield install
    core.delete_namespaced_config_map(authz.AUTHZ_CONFIGMAP, "kube-system")


def test_rbac_preflight_names_the_permission(
    server: RunningServer, tmp_path: Path, deny: object
) -> None:
    config = kubeconfig(tmp_path / "kubeconfig", server.url)
    deny({"verb": "patch", "resource": "services"},  # type: ignore[operator]
         {"verb": "create", "resource": "pods", "subresource": "portforward"})  # fmt: skip
    before = _revision(server)
    line = one_line(run("exchange", "echo", "--expose", "8080", "--kubeconfig", config), code=2)
    assert line == (
        "kvpn: not allowed to patch services, create pods/portforward in namespace default "
        "(RBAC); ask your cluster admin for: patch services, create pods/portforward"
    )
    line = one_line(run("preview", "p", "--expose", "8080", "--skip-port-check",
                        "--kubeconfig", config), code=2)  # fmt: skip
    assert "ask your cluster admin for: patch services, create pods/portforward" in line
    assert _revision(server) == before


def test_a_later_403_is_one_line_too(server: RunningServer, tmp_path: Path, deny: object) -> None:
    """Without SelfSubjectAccessReview the preflight is skipped; the refused call still says
    which permission is missing."""
    config = kubeconfig(tmp_path / "kubeconfig", server.url)
    deny({"verb": "create", "resource": "selfsubjectaccessreviews"},  # type: ignore[operator]
         {"verb": "get", "resource": "services"}, {"verb": "create", "resource": "services"})  # fmt: skip
    before = _revision(server)
    line = one_line(run("exchange", "echo", "--expose", "8080", "--kubeconfig", config), code=2)
    assert line.startswith("kvpn: cannot read service default/echo: 403 Forbidden: ")
    assert line.endswith("ask your cluster admin for: get services")
    line = one_line(run("recover", "echo", "--kubeconfig", config), code=2)
    assert "not allowed to get services in namespace default (RBAC)" in line
    assert _revision(server) == before
