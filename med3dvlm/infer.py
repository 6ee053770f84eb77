"""``python -m med3dvlm.infer model=PATH image=VOLUME [question="..."]``: print the model's answer."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

import med3dvlm.config  # noqa: F401  (registers the resolvers)
from med3dvlm.data.prompts import CAPTION_SEPARATOR, build_prompt, caption_question, generation_prompt
from med3dvlm.inference import answer, load_volume_for
from med3dvlm.models.vlm import load_pretrained


@hydra.main(config_path="configs", config_name="infer", version_base="1.3")
def main(cfg: DictConfig) -> None:
    model = load_pretrained(cfg.model, dtype=cfg.dtype, verify_files=cfg.verify_files).to(cfg.device)
    image = load_volume_for(model, cfg.image, OmegaConf.to_container(cfg.intensity)["window"], cfg.max_voxels)
    if cfg.question is None:  # a report, asked the way captions were trained
        prompt = build_prompt(model.image_token, model.num_image_tokens, caption_question(), CAPTION_SEPARATOR)
    else:
        prompt = generation_prompt(model.image_token, model.num_image_tokens, cfg.question)
    print(answer(model, image, prompt, cfg.max_new_tokens))


if __name__ == "__main__":
    main()
