"""Which process this is among those a launcher started, before any process group exists."""

from __future__ import annotations

import os

# What each launcher sets: torchrun (RANK, GROUP_RANK), srun (SLURM_PROCID), Lightning's own launcher
# and manual multi-node launches (NODE_RANK, LOCAL_RANK).
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "GROUP_RANK", "NODE_RANK", "LOCAL_RANK")


def launched_as_global_rank_zero() -> bool:
    """Whether this process is global rank 0 (or the only process), as its launcher's environment
    says: every rank variable present is 0. The process that writes what a run writes once."""
    return all(int(os.environ.get(variable) or 0) == 0 for variable in RANK_VARIABLES)
