"""``python -m med3dvlm.prepare [dataset=NAME] source=RAW out=DIR format=npy``: a dataset release -> prepared dataset."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

import med3dvlm.resolvers  # noqa: F401  (registers the resolvers)
from med3dvlm.data.preparation import prepare_dataset
from med3dvlm.data.releases import release
from med3dvlm.utils.command import hydra_command


@hydra_command("prepare")
def main(cfg: DictConfig) -> None:
    chosen = release(cfg.dataset_name, cfg.source)
    prepare_dataset(
        source=cfg.source,
        out=cfg.out,
        spatial_size=list(cfg.spatial_size),
        format=cfg.format,
        npy_dtype=cfg.npy_dtype,
        workers=cfg.workers,
        on_error=cfg.on_error,
        split=OmegaConf.to_container(cfg.split),
        foreground_threshold=cfg.foreground_threshold,
        progress=cfg.progress,
        strict_split=cfg.strict_split,
        max_voxels=cfg.max_voxels,
        window=OmegaConf.to_container(cfg.intensity)["window"],
        dataset=chosen.name,
        options={key: OmegaConf.to_container(cfg)[key] for key in chosen.options if key in cfg},
    )


if __name__ == "__main__":
    main()
