"""``python -m med3dvlm.export [source=FINETUNE_EXPORT] [out=DIR]``: merge LoRA, write one model folder."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import med3dvlm.resolvers  # noqa: F401  (registers the resolvers)
from med3dvlm.artifacts.handoff import ADAPTER_HANDOFF
from med3dvlm.artifacts.latest import resolve
from med3dvlm.artifacts.model_folder import write_merged_model


@hydra.main(config_path="configs", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    source = resolve(cfg.source, ADAPTER_HANDOFF, cfg.experiment_name, cfg.paths.log_dir)
    out = write_merged_model(source, cfg.out, cfg.dtype)
    print(
        f"merged model written to {out}  (reload: med3dvlm.artifacts.model_folder.load_pretrained({str(out)!r}))"
    )


if __name__ == "__main__":
    main()
