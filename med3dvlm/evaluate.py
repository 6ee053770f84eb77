"""``python -m med3dvlm.evaluate task=vqa_closed|vqa_open|report|retrieval|leakage model=PATH``: score a model."""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import med3dvlm.resolvers  # noqa: F401  (registers the resolvers)
from med3dvlm.utils.command import hydra_command


@hydra_command("evaluate")
def main(cfg: DictConfig) -> None:
    task = instantiate(cfg.task)
    if getattr(task, "reads_data", True) and not Path(cfg.data_dir).is_dir():  # before any model loads
        raise FileNotFoundError(
            f"data_dir={cfg.data_dir}: no such folder (one `python -m med3dvlm.prepare` wrote)"
        )
    loggers = [instantiate(node) for node in (cfg.get("logger") or {}).values()]
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    context = instantiate(cfg.context, loggers=loggers, _convert_="all")
    result = task.run(context)
    print(result.table)
    print("\n".join(f"{kind}: {path}" for kind, path in result.files.items()))


if __name__ == "__main__":
    main()
