"""Running the package's commands as a user does: ``python -m med3dvlm.<command> key=value ...``, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

OFFLINE = {
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
}


def run_command(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -m *args`` in ``cwd``; fails the test with the end of its output unless it exits 0."""
    result = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env={**os.environ, **OFFLINE},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result
