"""Whole-suite set-up: kvpn's change journals go to a directory of this test run.

Root's default journal directory (``/var/lib/kvpn/journal``) survives reboots on purpose;
tests that ``kill -9`` kvpn would otherwise leave their dead journals there for the next
run's ``kvpn clean`` to find. Subprocesses inherit the variable.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

_JOURNALS = tempfile.mkdtemp(prefix="kvpn-test-journals-")
os.environ["KVPN_JOURNAL_DIR"] = _JOURNALS


@pytest.fixture(scope="session", autouse=True)
def _journal_dir() -> Iterator[str]:
    yield _JOURNALS
    shutil.rmtree(_JOURNALS, ignore_errors=True)
