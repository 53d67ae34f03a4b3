"""The tree passes ``ruff check`` with the configuration in pyproject.toml (line length 120, E/F/W/I/B/UP)."""

import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_ruff_check_passes_on_the_repository():
    pytest.importorskip("ruff")
    # --no-cache: a read-only checkout or a shared CI cache must not change the verdict
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", REPO], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"ruff check failed:\n{proc.stdout}\n{proc.stderr}"
