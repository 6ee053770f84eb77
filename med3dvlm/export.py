"""``python -m med3dvlm.export [source=FINETUNE_EXPORT] [out=DIR]``: merge LoRA, write one model folder."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import med3dvlm.config  # noqa: F401  (registers the resolvers)
from med3dvlm.stages.handoff import resolve_handoff
from med3dvlm.stages.vlm_finetune import FINETUNE_COMMAND, export_merged


@hydra.main(config_path="configs", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    source = resolve_handoff(cfg.source, cfg.paths.log_dir, "adapter", cfg.experiment_name, FINETUNE_COMMAND)
    out = export_merged(source, cfg.out, cfg.dtype)
    print(f"merged model written to {out}  (reload: med3dvlm.models.vlm.load_pretrained({str(out)!r}))")


if __name__ == "__main__":
    main()
