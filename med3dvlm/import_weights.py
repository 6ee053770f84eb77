"""``python -m med3dvlm.import_weights source=DIR kind=siglip|vlm|flare [out=DIR] [llm=...]``: convert a
released Med3DVLM checkpoint folder into our formats (see ``med3dvlm.artifacts.released``)."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import med3dvlm.resolvers  # noqa: F401  (registers the resolvers)
from med3dvlm.artifacts.released import (
    FLARE_PRETRAINED_DIR,
    MODEL_DIR,
    import_flare,
    import_siglip,
    import_vlm,
)
from med3dvlm.utils.command import hydra_command


@hydra_command("import_weights")
def main(cfg: DictConfig) -> None:
    encoder = OmegaConf.to_container(cfg.encoder, resolve=True)
    if cfg.kind == "siglip":
        out = import_siglip(
            cfg.source, cfg.out, encoder, cfg.text_model, cfg.siglip_scale, cfg.experiment_name
        )
        print(
            f"imported into {out}: encoder export {out / 'encoder'} (stage.module.encoder_export=...), "
            f"text encoder {out / 'text_encoder'}, heads and loss {out / 'siglip_heads.safetensors'}"
        )
    elif cfg.kind == "vlm":
        projector = OmegaConf.to_container(cfg.projector, resolve=True)
        out = import_vlm(cfg.source, cfg.out, encoder, projector, cfg.reference_placement)
        print(f"imported into {out}  (evaluate: python -m med3dvlm.evaluate task=report model={out})")
    elif cfg.kind == "flare":
        projector = OmegaConf.to_container(cfg.projector, resolve=True)
        llm = instantiate(cfg.llm).name_or_path
        out = import_flare(cfg.source, cfg.out, encoder, projector, llm, cfg.reference_placement)
        print(
            f"imported into {out}: model folder {out / MODEL_DIR} "
            f"(evaluate: python -m med3dvlm.evaluate task=report model={out / MODEL_DIR}), "
            f"projector hand-off {out / FLARE_PRETRAINED_DIR} (finetune: python -m med3dvlm.train "
            f"experiment=flare_finetune stage.module.pretrain_export={out / FLARE_PRETRAINED_DIR})"
        )
    else:
        raise ValueError(f"kind={cfg.kind!r}: expected siglip, vlm or flare")


if __name__ == "__main__":
    main()
