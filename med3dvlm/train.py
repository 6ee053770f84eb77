"""``python -m med3dvlm.train stage=siglip|pretrain|finetune``: fit, then test; returns the metric a
sweeper optimises (``optimized_metric``)."""

from __future__ import annotations

import logging

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

import med3dvlm.config  # noqa: F401  (registers the resolvers)
from med3dvlm.metrics.retrieval import format_table

log = logging.getLogger(__name__)


def _instantiate_all(group: DictConfig | None) -> list:
    return [instantiate(node) for node in (group or {}).values() if node and "_target_" in node]


def train(cfg: DictConfig) -> float | None:
    """Build the stage, data, loggers and trainer from ``cfg``; fit, optionally test."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    module = instantiate(cfg.stage.module)
    datamodule = instantiate(cfg.data, **module.datamodule_kwargs())
    callbacks = _instantiate_all(cfg.get("callbacks")) + _instantiate_all(cfg.stage.get("callbacks"))
    loggers = _instantiate_all(cfg.get("logger"))
    if not loggers:  # logger=none: Lightning refuses an LR monitor without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test"):
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    report(metrics)
    return metrics.get(cfg.get("optimized_metric"))


@rank_zero_only
def report(metrics: dict[str, float]) -> None:
    """Print the retrieval table (if the stage measured retrieval) and the final metrics."""
    for split in ("test", "val"):
        table = format_table({k: v for k, v in metrics.items() if k.startswith(f"{split}/")})
        if table.count("\n") > 1:
            print(f"\n{split} retrieval (R@K on the first N pairs):\n{table}\n")
            break
    for key in sorted(k for k in metrics if k.startswith(("test/", "val/")) and "_R@" not in k):
        print(f"{key}: {metrics[key]:.4f}")


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
