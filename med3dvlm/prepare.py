"""``python -m med3dvlm.prepare source=RAW out=DIR format=npy``: raw M3D or own NIfTI -> prepared dataset."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

import med3dvlm.configs  # noqa: F401  (registers the resolvers)
from med3dvlm.data.m3d_prepare import prepare_dataset


@hydra.main(version_base="1.3", config_path="configs", config_name="prepare")
def main(cfg: DictConfig) -> None:
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
    )


if __name__ == "__main__":
    main()
