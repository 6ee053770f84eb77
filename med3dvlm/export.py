"""``python -m med3dvlm.export [source=FINETUNE_EXPORT] [out=DIR] [push_to_hub=ORG/NAME]``: merge LoRA,
write one model folder with its model card, and upload it to the Hugging Face Hub when asked.
``source=<model folder>`` rewrites that folder's card (with the evaluations run since) instead of
writing a new folder."""

from __future__ import annotations

from omegaconf import DictConfig

import med3dvlm.resolvers  # noqa: F401  (registers the resolvers)
from med3dvlm.artifacts.handoff import ADAPTER_HANDOFF
from med3dvlm.artifacts.hub import check_push, push_model_folder
from med3dvlm.artifacts.latest import resolve
from med3dvlm.artifacts.model_card import write_model_card
from med3dvlm.artifacts.model_folder import is_model_folder, write_merged_model
from med3dvlm.utils.command import hydra_command


@hydra_command("export")
def main(cfg: DictConfig) -> None:
    if cfg.push_to_hub:
        check_push(cfg.push_to_hub)
    source = resolve(cfg.source, ADAPTER_HANDOFF, cfg.experiment_name, cfg.paths.log_dir)
    out = source if is_model_folder(source) else write_merged_model(source, cfg.out, cfg.dtype)
    card = write_model_card(out, cfg.paths.log_dir, cfg.push_to_hub)
    print(
        f"model folder {out}, model card {card.name}  "
        f"(reload: med3dvlm.artifacts.model_folder.load_pretrained({str(out)!r}))"
    )
    if cfg.push_to_hub:
        print(f"pushed to the Hugging Face Hub: {push_model_folder(out, cfg.push_to_hub, cfg.hub_private)}")


if __name__ == "__main__":
    main()
