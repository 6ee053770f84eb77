"""``python -m med3dvlm.evaluate task=vqa_closed|vqa_open|report|retrieval|leakage model=PATH``: score a model."""

from __future__ import annotations

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import med3dvlm.resolvers  # noqa: F401  (registers the resolvers)


@hydra.main(config_path="configs", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    loggers = [instantiate(node) for node in (cfg.get("logger") or {}).values()]
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    context = instantiate(cfg.context, loggers=loggers, _convert_="all")
    result = instantiate(cfg.task).run(context)
    print(result.table)
    print("\n".join(f"{kind}: {path}" for kind, path in result.files.items()))


if __name__ == "__main__":
    main()
