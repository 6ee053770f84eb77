"""``python -m med3dvlm.infer model=PATH image=VOLUME [question="..."]``: print the model's answer."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

import med3dvlm.configs  # noqa: F401  (registers the resolvers)
from med3dvlm.artifacts.model_folder import load_pretrained
from med3dvlm.data.preprocess import model_input
from med3dvlm.data.prompts import ask_prompt
from med3dvlm.models.generation import GenerationSettings, answer


@hydra.main(config_path="configs", config_name="infer", version_base="1.3")
def main(cfg: DictConfig) -> None:
    model = load_pretrained(cfg.model, dtype=cfg.dtype, verify_files=cfg.verify_files).to(cfg.device)
    scan = model_input(cfg.image, model.input_size, OmegaConf.to_container(cfg.intensity)["window"], cfg.max_voxels)
    prompt = ask_prompt(model.image_token, model.num_image_tokens, cfg.question)
    print(answer(model, scan.volume, prompt, GenerationSettings(max_new_tokens=cfg.max_new_tokens)))


if __name__ == "__main__":
    main()
