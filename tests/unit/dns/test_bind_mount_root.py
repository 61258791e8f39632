"""resolv.conf as a bind mount, for real (root): the ``ip netns exec`` case and plain EBUSY.

``ip netns exec <ns>`` runs its command in a new mount namespace where
``/etc/netns/<ns>/resolv.conf`` is bind-mounted over ``/etc/resolv.conf``: renaming over it
fails with EBUSY. kvpn must write through the mount and restore the same bytes, in a new
process (as ``kvpn clean`` would), without touching the host's own /etc/resolv.conf.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
ORIGINAL = b"# laptop\nnameserver 198.18.0.53\nsearch corp.example\n\noptions  ndots:1"  # odd bytes
TUN = "198.19.255.1"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"),
    reason="needs root, ip(8) and unshare(1)",
)

APPLY = """
import sys
from pathlib import Path
from kvpn.dns.os_config import DnsMode, DnsPaths, apply_dns_plan, plan_dns
paths = DnsPaths(resolv_conf=Path(sys.argv[2]), mountinfo=Path(sys.argv[3]))
plan = plan_dns(DnsMode.RESOLV_CONF, nameserver=sys.argv[4], namespace="team")
apply_dns_plan(plan, state_dir=Path(sys.argv[1]), paths=paths)
print(Path(sys.argv[2]).read_text(), end="")
"""
RESTORE = """
import sys
from pathlib import Path
from kvpn.dns.os_config import restore_from_state
report = restore_from_state(Path(sys.argv[1]), mountinfo=Path(sys.argv[2]))
assert report.ok and not report.notes, report
"""


def _python(prefix: list[str], script: str, *args: str) -> str:
    done = subprocess.run(
        [*prefix, sys.executable, "-c", script, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@contextlib.contextmanager
def _netns_with_resolv_conf() -> Iterator[tuple[str, Path]]:
    name = f"kvpnt-dns-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    folder = Path("/etc/netns") / name
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        folder.mkdir(parents=True)
        (folder / "resolv.conf").write_bytes(ORIGINAL)
        yield name, folder / "resolv.conf"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
        shutil.rmtree(folder, ignore_errors=True)


def test_ip_netns_exec_bind_mounted_resolv_conf(tmp_path: Path) -> None:
    host_before = Path("/etc/resolv.conf").read_bytes()
    etc_before = sorted(os.listdir("/etc"))
    with _netns_with_resolv_conf() as (name, backing):
        inode = backing.stat().st_ino
        prefix = ["ip", "netns", "exec", name]
        state = str(tmp_path / "state")
        seen = _python(prefix, APPLY, state, "/etc/resolv.conf", "/proc/self/mountinfo", TUN)
        assert seen.startswith("# kvpn: ") and f"nameserver {TUN}\n" in seen
        assert backing.read_text() == seen  # written through the bind mount
        assert backing.stat().st_ino == inode
        _python(prefix, RESTORE, state, "/proc/self/mountinfo")
        assert backing.read_bytes() == ORIGINAL
        assert backing.stat().st_ino == inode
    assert Path("/etc/resolv.conf").read_bytes() == host_before
    assert sorted(os.listdir("/etc")) == etc_before


def test_rename_ebusy_on_an_undetected_bind_mount(tmp_path: Path) -> None:
    """With mount detection blinded (empty mountinfo), the EBUSY fallback does the job."""
    target = tmp_path / "resolv.conf"
    source = tmp_path / "backing.conf"
    target.write_bytes(b"")
    source.write_bytes(ORIGINAL)
    blind = tmp_path / "no-mounts"
    blind.write_text("")
    state = str(tmp_path / "state")
    script = (
        f"mount --bind {source} {target} && "
        f"{sys.executable} -c '{APPLY}' {state} {target} {blind} {TUN} && "
        f"grep -q 'nameserver {TUN}' {source} && "  # the write went through the mount
        f"{sys.executable} -c '{RESTORE}' {state} {blind}"
    )
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"nameserver {TUN}" in done.stdout
    assert source.read_bytes() == ORIGINAL
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "backing.conf",
        "no-mounts",
        "resolv.conf",
        "state",
    ]
