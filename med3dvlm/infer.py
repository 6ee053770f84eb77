"""``python -m med3dvlm.infer model=PATH image=VOLUME [question="..."]``: print the model's answer.

The scan goes through the preprocessing the model's training data had (its record), in the voxel
order of that data, and the question is asked in the model's prompt format."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

import med3dvlm.resolvers  # noqa: F401  (registers the resolvers)
from med3dvlm.artifacts.model_folder import load_pretrained
from med3dvlm.data.preprocess import model_input
from med3dvlm.data.prompts import ask_prompt
from med3dvlm.models.generation import GenerationSettings, answer


@hydra.main(config_path="configs", config_name="infer", version_base="1.3")
def main(cfg: DictConfig) -> None:
    loaded = load_pretrained(cfg.model, dtype=cfg.dtype, verify_files=cfg.verify_files)
    model, record = loaded.model.to(cfg.device), loaded.record
    spec = record.preprocessing.for_input(cfg.source, OmegaConf.to_container(cfg.intensity)["window"])
    scan = model_input(cfg.image, record.input_size, spec, cfg.max_voxels)
    prompt = ask_prompt(
        model.tokenizer, model.image_token, model.num_image_tokens, cfg.question, record.prompt_format
    )
    print(answer(model, scan.volume, prompt, GenerationSettings(max_new_tokens=cfg.max_new_tokens)))


if __name__ == "__main__":
    main()
