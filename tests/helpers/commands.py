"""Running the package's commands as a user does: ``python -m med3dvlm.<command> key=value ...``, offline;
or inside the test's process."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


LOGGING_AS_IT_IS = ("hydra.job_logging.root=null", "hydra.hydra_logging.root=null")
"""Hydra otherwise replaces the logging handlers, pytest's capture among them, with its own on streams
that pytest closes after the test."""


def run_in_process(monkeypatch: pytest.MonkeyPatch, command: str, *arguments: str) -> None:
    """``python -m med3dvlm.<command> <arguments>`` in this process; its log records reach ``caplog``."""
    monkeypatch.setattr(sys, "argv", [f"med3dvlm.{command}", *arguments, *LOGGING_AS_IT_IS])
    importlib.import_module(f"med3dvlm.{command}").main()
