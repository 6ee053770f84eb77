"""Checks a command makes before it builds anything: inputs it will certainly fail on later are
reported now, naming the setting to change, instead of deep inside Hugging Face or after hours of
generation."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from med3dvlm.data.prepared import caption_file
from med3dvlm.models.sources import unreachable_model

# Stage -> the model-name settings it reads, with the offline stand-in to suggest.
STAGE_MODELS: dict[str, tuple[tuple[str, str], ...]] = {
    "siglip": (("text_encoder.model_name_or_path", "text_encoder=tiny"),),
    "pretrain": (("llm.name_or_path", "llm=tiny"),),
    "finetune": (("llm.name_or_path", "llm=tiny"),),
}


def check_training_inputs(cfg: DictConfig) -> None:
    """The prepared data folder and the stage's pretrained models, before anything is built."""
    data_dir = Path(cfg.data.data_dir)
    if not caption_file(data_dir).is_file():
        raise FileNotFoundError(
            f"data.data_dir={data_dir}: no prepared dataset here ({caption_file(data_dir).name} missing). Prepare one with "
            f"`python -m med3dvlm.prepare source=<raw M3D folder or CSV> out={data_dir}`, or set data.data_dir "
            "(make demo prepares data/demo/prepared)"
        )
    for key, stand_in in STAGE_MODELS.get(str(cfg.stage.name), ()):
        name = OmegaConf.select(cfg, key)
        problem = unreachable_model(name) if isinstance(name, str) else None
        if problem:
            raise FileNotFoundError(
                f"{key}: {problem}. Put the model in a local folder and set {key}=<folder>, "
                f"or train the offline stand-in with {stand_in}"
            )
