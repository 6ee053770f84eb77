"""The resolvers the Hydra configs use; every command imports this module before composing.

Pure ones (the work root, the run folder's stamp, W&B's default mode) and two that read what a
configured path holds: ``data.spatial_size`` from the prepared folder's manifest (the size is typed
once, at prepare) and the experiment a model folder records (evaluation runs join its W&B group).
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from med3dvlm.artifacts.hub import cached_model_folder
from med3dvlm.artifacts.latest import IMPORTED_ENCODER_DIR
from med3dvlm.artifacts.record import RecordError, read_record
from med3dvlm.configs import work_root
from med3dvlm.data.prepared import prepared_spatial_size
from med3dvlm.utils.processes import launched_as_global_rank_zero


def _hydra_subdir(resume: str | None, time: str) -> str | None:
    # A resumed run keeps its original .hydra/ (config, overrides) and records its own beside it.
    # Written once, by global rank 0: other nodes' processes compose the same config (the launch
    # check compares them), at other times.
    if not launched_as_global_rank_zero():
        return None
    return ".hydra" if resume is None else f".hydra/resume-{time}"


def _run_stamp(output_dir: str) -> str:
    # A run folder outputs/<task>/<date>/<time> (a resumed run keeps it) -> "<date>_<time>".
    return "_".join(Path(output_dir).parts[-2:])


def _model_experiment(model: str | None) -> str:
    # The experiment a model folder or stage export records (evaluation runs join its W&B group).
    if not model:
        return "default"
    try:
        root = cached_model_folder(model)  # a folder, or a Hub id from the local cache
    except OSError:
        return "default"
    for folder in (root, root / IMPORTED_ENCODER_DIR):
        try:
            return read_record(folder, quiet=True).experiment
        except (RecordError, OSError):
            continue
    return "default"


def _prepared_size(data_dir: str, default: list[int]) -> list[int]:
    return prepared_spatial_size(data_dir) or list(default)


def register() -> None:
    """Register every resolver (idempotent)."""
    # `${project_root:}`: the work root (see med3dvlm.configs), where data/ and outputs/ go.
    OmegaConf.register_new_resolver("project_root", lambda: str(work_root()), replace=True)
    # W&B stays offline unless the user chose a mode through WANDB_MODE.
    OmegaConf.register_new_resolver(
        "wandb_offline", lambda: os.environ.get("WANDB_MODE") is None, replace=True
    )
    OmegaConf.register_new_resolver("hydra_subdir", _hydra_subdir, replace=True)
    OmegaConf.register_new_resolver("run_stamp", _run_stamp, replace=True)
    OmegaConf.register_new_resolver("model_experiment", _model_experiment, replace=True)
    OmegaConf.register_new_resolver("prepared_size", _prepared_size, replace=True)


register()
