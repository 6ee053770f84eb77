"""Hydra multirun jobs that start their own DDP processes.

Lightning's DDP launcher starts each extra process with the parent's ``sys.argv`` plus
``hydra.run.dir=<the parent's run dir>``. In a multirun that ``sys.argv`` holds ``-m`` and the sweep,
so every child would run the whole sweep again into a second output tree. Inside a multirun job,
:func:`job_scope` makes the children run this job only: ``sys.argv`` becomes this job's own
overrides (no ``-m``) and the run dir Lightning hands them becomes this job's folder. After the job
it removes what the launcher left in the parent (environment, process group), so the next job of
the sweep starts its own processes.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict, read_write

# Command-line hydra overrides that only mean something to the sweep itself.
_SWEEP_ONLY = (
    "hydra.sweep",
    "hydra.sweeper",
    "hydra/sweeper",
    "hydra.launcher",
    "hydra/launcher",
    "hydra.mode",
)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_command_line() -> list[str]:
    """This job's overrides as a single-run command line (``argv[1:]``)."""
    hydra = HydraConfig.get()
    keep = [o for o in hydra.overrides.hydra if not o.lstrip("+~").startswith(_SWEEP_ONLY)]
    return [*keep, *hydra.overrides.task]


@contextlib.contextmanager
def job_scope() -> Iterator[None]:
    """Run one training job; in a multirun, pin DDP children to this job and clean up after it."""
    if not in_multirun():
        yield
        return
    hydra = HydraConfig.get()
    argv, environ = list(sys.argv), dict(os.environ)
    sys.argv = [sys.argv[0], *job_command_line()]
    with read_write(hydra), open_dict(hydra):
        previous_run_dir, hydra.run.dir = hydra.run.dir, hydra.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = argv
        with read_write(hydra), open_dict(hydra):
            hydra.run.dir = previous_run_dir
        # The launcher exported LOCAL_RANK/MASTER_PORT/WORLD_SIZE: left in place, the next job would
        # believe an external launcher started its processes and wait for ranks that never come.
        os.environ.clear()
        os.environ.update(environ)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
