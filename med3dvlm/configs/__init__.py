"""The Hydra config groups of med3dvlm and the resolvers they use (importing this registers them).

The configs ship inside the package (this folder; the checkout's ``configs/`` and ``experiments/``
point here), so an installed wheel runs every command. Data and outputs live under
the *work root*: the current directory, or ``MED3DVLM_ROOT`` when set (``paths.root_dir``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR: Path = Path(__file__).resolve().parent


def work_root() -> Path:
    """Where ``data/`` and ``outputs/`` are: ``MED3DVLM_ROOT``, else the current directory."""
    return Path(os.environ.get("MED3DVLM_ROOT") or os.getcwd()).resolve()


def _hydra_subdir(resume: str | None, time: str) -> str:
    # A resumed run keeps its original .hydra/ (config, overrides) and records its own beside it.
    return ".hydra" if resume is None else f".hydra/resume-{time}"


def _run_stamp(output_dir: str) -> str:
    # A run folder outputs/<task>/<date>/<time> (a resumed run keeps it) -> "<date>_<time>".
    return "_".join(Path(output_dir).parts[-2:])


def _model_experiment(model: str | None) -> str:
    # The experiment a model folder or stage export records (evaluation runs join its W&B group).
    for name in ("config.json", "export.json", "encoder/export.json"):
        path = Path(model or "") / name
        if model and path.is_file():
            try:
                recorded = json.loads(path.read_text(encoding="utf-8")).get("experiment")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(recorded, str):
                return recorded
    return "default"


def _prepared_size(data_dir: str, default: list[int]) -> list[int]:
    # data.spatial_size: the size prepare wrote the folder's volumes at, so it is typed once (at prepare).
    from med3dvlm.data.layout import prepared_spatial_size

    return prepared_spatial_size(data_dir) or list(default)


def _register_resolvers() -> None:
    # `${project_root:}`: the work root (see the module docstring), where data/ and outputs/ go.
    OmegaConf.register_new_resolver("project_root", lambda: str(work_root()), replace=True)
    # W&B stays offline unless the user chose a mode through WANDB_MODE.
    OmegaConf.register_new_resolver(
        "wandb_offline", lambda: os.environ.get("WANDB_MODE") is None, replace=True
    )
    OmegaConf.register_new_resolver("hydra_subdir", _hydra_subdir, replace=True)
    OmegaConf.register_new_resolver("run_stamp", _run_stamp, replace=True)
    OmegaConf.register_new_resolver("model_experiment", _model_experiment, replace=True)
    OmegaConf.register_new_resolver("prepared_size", _prepared_size, replace=True)


_register_resolvers()
