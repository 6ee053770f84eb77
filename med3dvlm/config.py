"""Hydra/OmegaConf glue shared by every entry point: resolvers and the config directory."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT: Path = Path(os.environ.get("MED3DVLM_ROOT", Path(__file__).resolve().parents[1]))
CONFIG_DIR: Path = PROJECT_ROOT / "configs"


def _hydra_subdir(resume: str | None, time: str) -> str:
    # A resumed run keeps its original .hydra/ (config, overrides) and records its own beside it.
    return ".hydra" if resume is None else f".hydra/resume-{time}"


def _register_resolvers() -> None:
    # `${project_root:}` lets configs place data/ and outputs/ at the checkout root whatever the cwd.
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
    # W&B stays offline unless the user chose a mode through WANDB_MODE.
    OmegaConf.register_new_resolver(
        "wandb_offline", lambda: os.environ.get("WANDB_MODE") is None, replace=True
    )
    OmegaConf.register_new_resolver("hydra_subdir", _hydra_subdir, replace=True)


_register_resolvers()
