"""``python -m med3dvlm.infer model=PATH image=VOLUME [question="..."]``: print the model's answer.

The scan goes through the preprocessing the model's training data had (its record), in the voxel
order of that data, and the question is asked in the model's prompt format. The scan is read before
the model loads, so a bad scan fails in seconds. What was asked (the prompt, its image block as a
count) goes to stderr, the answer to stdout."""

from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf

import med3dvlm.resolvers  # noqa: F401  (registers the resolvers)
from med3dvlm.artifacts.model_folder import load_pretrained
from med3dvlm.artifacts.record import read_record
from med3dvlm.data.preprocess import model_input
from med3dvlm.data.prompts import ask_prompt
from med3dvlm.models.generation import GenerationSettings, answer
from med3dvlm.utils.command import hydra_command
from med3dvlm.web.session import shown_prompt


@hydra_command("infer")
def main(cfg: DictConfig) -> None:
    record = read_record(cfg.model, "model_folder", quiet=True)  # the full check comes with the model
    spec = record.preprocessing.for_input(cfg.source, OmegaConf.to_container(cfg.intensity)["window"])
    scan = model_input(cfg.image, record.input_size, spec, cfg.max_voxels)
    loaded = load_pretrained(cfg.model, dtype=cfg.dtype, verify_files=cfg.verify_files)
    model, record = loaded.model.to(cfg.device), loaded.record
    prompt = ask_prompt(
        model.tokenizer, model.image_token, model.num_image_tokens, cfg.question, record.prompt_format
    )
    print(f"asked: {shown_prompt(model, prompt)}", file=sys.stderr, flush=True)
    text = answer(model, scan.volume, prompt, GenerationSettings(max_new_tokens=cfg.max_new_tokens))
    if text.strip():
        print(text)
    else:
        print("the answer is empty: the model ended it before writing anything", file=sys.stderr)


if __name__ == "__main__":
    main()
