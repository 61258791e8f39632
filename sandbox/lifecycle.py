"""Start, stop and describe a sandbox cluster (what ``kvpn-sandbox up/down/status`` do)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sandbox import network
from sandbox.config import STATE_ROOT, SandboxConfig
from sandbox.settings import dump_settings, kubeconfig

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0


class SandboxError(Exception):
    """A failure explained in one line."""


@dataclass(frozen=True)
class SandboxInfo:
    kubeconfig: Path
    laptop_netns: str
    node_netns: str

    def shell_lines(self) -> str:
        return (
            f"KUBECONFIG={self.kubeconfig}\n"
            f"LAPTOP_NETNS={self.laptop_netns}\n"
            f"NODE_NETNS={self.node_netns}\n"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(state_dir: Path) -> int | None:
    try:
        return int((state_dir / "controlplane.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _require_root() -> None:
    if os.geteuid() != 0:
        raise SandboxError("the sandbox needs root (it creates network namespaces)")


def is_running(config: SandboxConfig) -> bool:
    pid = _read_pid(config.state_dir)
    return pid is not None and _pid_alive(pid)


def start(config: SandboxConfig) -> SandboxInfo:
    _require_root()
    if is_running(config):
        raise SandboxError(
            f"sandbox {config.name!r} is already running (kvpn-sandbox down --name {config.name})"
        )
    # Leftovers of a sandbox that died: remove them first.
    if config.state_dir.exists() or network.list_netns(config.netns_prefix):
        stop(config)

    state_dir = config.state_dir
    state_dir.mkdir(parents=True, mode=0o700)
    (state_dir / "logs").mkdir(mode=0o700)
    token = secrets.token_hex(24)
    _write_private(state_dir / "sandbox.json", json.dumps(dump_settings(config, token), indent=2))
    _write_private(config.kubeconfig_path, kubeconfig(config, token))
    _write_private(state_dir / "kubeconfig-pods", kubeconfig(config, token))

    try:
        network.create_topology(config)
        log = open(state_dir / "controlplane.log", "ab")
        with log:
            proc = subprocess.Popen(
                [
                    "nsenter",
                    f"--net=/run/netns/{config.node_netns}",
                    "--",
                    sys.executable,
                    "-m",
                    "sandbox.controlplane",
                    "--state-dir",
                    str(state_dir),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        (state_dir / "controlplane.pid").write_text(f"{proc.pid}\n")
        _wait_ready(config, proc)
    except BaseException:
        stop(config)
        raise
    return SandboxInfo(config.kubeconfig_path, config.laptop_netns, config.node_netns)


def _log_tail(config: SandboxConfig, lines: int = 15) -> str:
    try:
        text = (config.state_dir / "controlplane.log").read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _wait_ready(config: SandboxConfig, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if (config.state_dir / "ready").exists():
            return
        failed = config.state_dir / "failed"
        if failed.exists():
            raise SandboxError(
                f"sandbox {config.name!r} did not start: {failed.read_text().strip()}\n"
                + _log_tail(config)
            )
        if proc.poll() is not None:
            raise SandboxError(
                f"sandbox {config.name!r}: control plane exited with {proc.returncode}\n"
                + _log_tail(config)
            )
        time.sleep(0.1)
    raise SandboxError(f"sandbox {config.name!r} not ready after {START_TIMEOUT_S:.0f} s")


def stop(config: SandboxConfig) -> list[str]:
    """Stop the control plane and remove every namespace, link, file and process."""
    _require_root()
    removed: list[str] = []
    pid = _read_pid(config.state_dir)
    if pid is not None and _pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _pid_alive(pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        removed.append(f"control plane (pid {pid})")
    leftover_netns = network.list_netns(config.netns_prefix)
    network.destroy_topology(config)
    removed.extend(f"netns {ns}" for ns in leftover_netns)
    if config.state_dir.exists():
        shutil.rmtree(config.state_dir)
        removed.append(f"state {config.state_dir}")
    return removed


def describe(config: SandboxConfig) -> list[str]:
    lines: list[str] = []
    pid = _read_pid(config.state_dir)
    if pid is None:
        lines.append(f"sandbox {config.name}: not running")
    elif not _pid_alive(pid):
        lines.append(f"sandbox {config.name}: control plane (pid {pid}) is dead; run down")
    elif (config.state_dir / "ready").exists():
        lines.append(f"sandbox {config.name}: running, control plane pid {pid}")
    else:
        lines.append(f"sandbox {config.name}: starting, control plane pid {pid}")
    for ns in network.list_netns(config.netns_prefix):
        lines.append(f"  netns {ns}")
    if config.kubeconfig_path.exists():
        lines.append(f"  KUBECONFIG={config.kubeconfig_path}")
    return lines


def saved_config(name: str, state_root: Path = STATE_ROOT) -> SandboxConfig | None:
    """The configuration a running (or crashed) sandbox was started with, if it left one."""
    from sandbox.settings import load_settings

    try:
        data = json.loads((state_root / name / "sandbox.json").read_text())
        return load_settings(data)[0]
    except (OSError, ValueError, KeyError):
        return None


def known_sandboxes(state_root: Path = STATE_ROOT) -> list[str]:
    if not state_root.exists():
        return []
    return sorted(p.name for p in state_root.iterdir() if (p / "sandbox.json").exists())
