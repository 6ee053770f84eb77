"""Running the package's commands as a user does: ``python -m med3dvlm.<command> key=value ...``, offline;
in a process forked from one that imported the package already; or inside the test's process."""

from __future__ import annotations

import importlib
import multiprocessing
import os
import socket
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


LOGGING_AS_IT_IS = ("hydra.job_logging.root=null", "hydra.hydra_logging.root=null")
"""Hydra otherwise replaces the logging handlers, pytest's capture among them, with its own on streams
that pytest closes after the test."""


def run_in_process(monkeypatch: pytest.MonkeyPatch, command: str, *arguments: str) -> None:
    """``python -m med3dvlm.<command> <arguments>`` in this process; its log records reach ``caplog``."""
    monkeypatch.setattr(sys, "argv", [f"med3dvlm.{command}", *arguments, *LOGGING_AS_IT_IS])
    importlib.import_module(f"med3dvlm.{command}").main()


_FORKS = multiprocessing.get_context("forkserver")
_FORKS.set_forkserver_preload(["med3dvlm.train", "helpers.runs"])


def _run_forked(command: str, arguments: list[str], cwd: Path, env: dict[str, str], output: Path) -> None:
    with open(output / "stdout", "w") as stdout, open(output / "stderr", "w") as stderr:
        os.dup2(stdout.fileno(), 1)
        os.dup2(stderr.fileno(), 2)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = [f"med3dvlm.{command}", *arguments]
    importlib.import_module(f"med3dvlm.{command}").main()


def start_forked(
    command: str, arguments: list[str], cwd: Path, output: Path, env: dict[str, str] | None = None
) -> multiprocessing.Process:
    """``python -m med3dvlm.<command> <arguments>`` started as a process of its own, forked from a
    server that imported the package once (the interpreter's ten seconds of imports are not paid
    again). The command runs from its start in ``env`` (default: this one, offline), its stdout and
    stderr kept in the folder ``output``; its exit code is -9 when it SIGKILLed itself. A command that
    launches further processes of itself (DDP) needs :func:`run_command`."""
    output.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **OFFLINE} if env is None else env
    process = _FORKS.Process(target=_run_forked, args=(command, arguments, cwd, env, output))
    process.start()
    return process


def finish_forked(
    process: multiprocessing.Process, output: Path, timeout: float
) -> subprocess.CompletedProcess:
    """Wait for a :func:`start_forked` process (killed after ``timeout`` seconds): its exit code,
    stdout and stderr as :func:`subprocess.run` gives them (``None`` as the code when it was killed)."""
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        code = None
    else:
        code = process.exitcode
    return subprocess.CompletedProcess(
        [], code, (output / "stdout").read_text(), (output / "stderr").read_text()
    )


def run_forked(
    command: str,
    *arguments: str,
    cwd: Path,
    output: Path,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """:func:`start_forked`, then :func:`finish_forked`; with ``check``, a failure fails the test."""
    done = finish_forked(start_forked(command, list(arguments), cwd, output, env), output, timeout)
    if done.returncode is None:
        pytest.fail(f"med3dvlm.{command} {' '.join(arguments)}: still running after {timeout} s")
    assert not check or done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done
