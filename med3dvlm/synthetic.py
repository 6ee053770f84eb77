"""``python -m med3dvlm.synthetic [dataset=m3d|flare|...] out=DIR cases=N seed=S``: write a synthetic
miniature of a dataset release, in its real layout."""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

import med3dvlm.resolvers  # noqa: F401  (registers the resolvers)
from med3dvlm.data.releases import release
from med3dvlm.utils.command import hydra_command

log = logging.getLogger(__name__)


@hydra_command("synthetic")
def main(cfg: DictConfig) -> None:
    chosen = release(cfg.dataset_name)
    if chosen.synthetic is None:
        raise SystemExit(f"dataset={chosen.name} has no synthetic miniature (see README)")
    options = {key: OmegaConf.to_container(cfg, resolve=True)[key] for key in chosen.synthetic_options}
    summary = chosen.synthetic(
        cfg.out, cfg.cases, seed=cfg.seed, slices=cfg.slices, size=cfg.size, workers=cfg.workers, **options
    )
    log.info("wrote a synthetic %s release to %s in %.1f s", chosen.name, summary.out, summary.seconds)


if __name__ == "__main__":
    main()
