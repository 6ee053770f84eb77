"""``python -m med3dvlm.synthetic out=DIR cases=N seed=S``: write synthetic M3D-Cap / M3D-VQA raw data."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

import med3dvlm.resolvers  # noqa: F401  (registers the resolvers)
from med3dvlm.data.releases.m3d.synthetic import generate

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="configs", config_name="synthetic")
def main(cfg: DictConfig) -> None:
    summary = generate(
        out=cfg.out,
        cases=cfg.cases,
        seed=cfg.seed,
        slices=cfg.slices,
        size=cfg.size,
        splits=OmegaConf.to_container(cfg.splits),
        workers=cfg.workers,
        jpeg_quality=cfg.jpeg_quality,
        defect_rate=cfg.defect_rate,
        lesion_scale=cfg.lesion_scale,
        choice_order=cfg.choice_order,
    )
    counts = {name: len(ids) for name, ids in summary.splits.items()}
    log.info("wrote %d cases to %s in %.1f s; splits %s", summary.cases, summary.out, summary.seconds, counts)
    if summary.defects:
        log.info("injected defects: %s", summary.defects)


if __name__ == "__main__":
    main()
