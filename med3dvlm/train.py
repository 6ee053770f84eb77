"""``python -m med3dvlm.train stage=siglip|pretrain|finetune``: fit, then test; returns the metric a
sweeper optimises (``optimized_metric``: its best validation value, or the last with
``optimized_value=last``)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

import med3dvlm.resolvers  # noqa: F401  (registers the resolvers)
from med3dvlm.metrics.retrieval import retrieval_table
from med3dvlm.training.checkpointing import AtomicCheckpointIO, resolve_checkpoint
from med3dvlm.training.launch import agree_across_processes
from med3dvlm.training.multirun import job_scope
from med3dvlm.training.notices import quiet_lightning
from med3dvlm.training.preflight import check_training_inputs
from med3dvlm.training.resumable_data import make_training_data_resumable
from med3dvlm.training.resume_guard import check_resume_config
from med3dvlm.training.run_summary import MetricHistory, finish_wandb_runs, optimized_value, write_summary
from med3dvlm.utils.command import hydra_command

log = logging.getLogger(__name__)


def _instantiate_all(group: DictConfig | None) -> list:
    return [instantiate(node) for node in (group or {}).values() if node and "_target_" in node]


def checkpoint_dir(trainer: L.Trainer, output_dir: str) -> Path:
    """Where ``ckpt_path=last`` looks: the checkpoint callbacks' folder (``<run>/checkpoints``)."""
    callback = trainer.checkpoint_callback
    return Path(getattr(callback, "dirpath", None) or Path(output_dir) / "checkpoints")


def train(cfg: DictConfig) -> float | None:
    """Build the stage, data, loggers and trainer from ``cfg``; fit (resuming if asked), optionally
    test; return ``cfg.optimized_metric``'s final value."""
    quiet_lightning()
    with job_scope():
        return _train(cfg)


def _train(cfg: DictConfig) -> float | None:
    check_resume_config(cfg)
    check_training_inputs(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    module = instantiate(cfg.stage.module)
    datamodule = instantiate(cfg.data, **module.datamodule_kwargs())
    restore_position = make_training_data_resumable(datamodule, seed=cfg.get("seed") or 0)
    optimized = cfg.get("optimized_metric")
    history = MetricHistory(optimized, cfg.get("optimized_mode") or "max")
    callbacks = [
        *_instantiate_all(cfg.get("callbacks")),
        *_instantiate_all(cfg.stage.get("callbacks")),
        restore_position,
        history,
    ]
    loggers = _instantiate_all(cfg.get("logger"))
    if not loggers:  # logger=none: Lightning refuses an LR monitor without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )
    agree_across_processes(cfg, trainer)  # processes from torchrun/srun: the same settings, code, data
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    resume = cfg.get("ckpt_path") or ("last" if cfg.get("resume") else None)
    ckpt_path = resolve_checkpoint(resume, checkpoint_dir(trainer, cfg.paths.output_dir))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test"):
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    report(metrics)
    value, value_is, step = optimized_value(metrics, history, cfg.get("optimized_value") or "best")
    write_summary(metrics, cfg.paths.output_dir, loggers, optimized, value, value_is, step)
    finish_wandb_runs(loggers)
    if optimized and value is None:
        log.warning("optimized_metric %r was not logged; train() returns None", optimized)
    return value


@rank_zero_only
def report(metrics: dict[str, float]) -> None:
    """Print the retrieval table (if the stage measured retrieval) and the final metrics."""
    for split in ("test", "val"):
        table = retrieval_table({k: v for k, v in metrics.items() if k.startswith(f"{split}/")})
        if table.count("\n") > 1:
            print(f"\n{split} retrieval (R@K on the first N pairs):\n{table}\n")
            break
    for key in sorted(k for k in metrics if k.startswith(("test/", "val/")) and "_R@" not in k):
        print(f"{key}: {metrics[key]:.4f}")


@hydra_command("train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
