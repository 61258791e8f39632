"""Facts about the machine and the tools a benchmark run used (recorded with its numbers)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path


def _cpu_model() -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or None
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else None


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _openssh_version() -> str | None:
    try:
        proc = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"OpenSSH_([^,]+),", proc.stderr + proc.stdout)
    return match.group(1) if match else None


def _loadavg() -> str | None:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return None


def machine_facts() -> dict[str, object]:
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "asyncssh": _package_version("asyncssh"),
        "cryptography": _package_version("cryptography"),
        "openssh": _openssh_version(),
        "sshuttle": _package_version("sshuttle"),
        "loadavg_start": _loadavg(),
    }


def loadavg() -> str | None:
    return _loadavg()
