"""``python -m med3dvlm.consolidate CKPT_DIR out=FILE.ckpt``: a sharded checkpoint (the folder that
``trainer=fsdp`` writes) as one Lightning checkpoint file.

The file holds the full ``state_dict``, the optimiser states in PyTorch's own layout (parameters
numbered in optimiser order) and the loop, scheduler and callback states, so ``ckpt_path=FILE``
resumes under any strategy (single device, ``ddp``, ``fsdp``) and ``torch.load(weights_only=True)``
reads it. The whole checkpoint is assembled in CPU memory.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import hydra
import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME
from omegaconf import DictConfig

import med3dvlm.configs  # noqa: F401  (registers the resolvers)
from med3dvlm.training.checkpointing import CorruptCheckpoint, check_checkpoint
from med3dvlm.training.shard_reader import RefusedCheckpointData, load_whole
from med3dvlm.training.sharding import positional_optimizer_state
from med3dvlm.utils.atomic import atomic_path


def consolidate(folder: str | Path, out: str | Path) -> Path:
    """Write the sharded checkpoint ``folder`` as the single file ``out`` (atomically); return ``out``."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a checkpoint folder (a sharded checkpoint is a directory)")
    if not (folder / _METADATA_FILENAME).is_file() or not (folder / ".metadata").is_file():
        raise ValueError(f"{folder}: not a sharded Lightning checkpoint (needs {_METADATA_FILENAME} and .metadata)")
    check_checkpoint(folder)
    try:
        checkpoint = load_whole(folder)
    except RefusedCheckpointData as error:
        raise CorruptCheckpoint(f"{folder}: refused: {error}") from error
    checkpoint.update(torch.load(folder / _METADATA_FILENAME, map_location="cpu", weights_only=True))
    optimizer_keys = sorted((k for k in checkpoint if re.fullmatch(r"optimizer_\d+", k)), key=lambda k: int(k[10:]))
    checkpoint["optimizer_states"] = [positional_optimizer_state(checkpoint.pop(k)) for k in optimizer_keys]
    with atomic_path(out) as tmp:
        torch.save(checkpoint, tmp)
    return out


def positional_checkpoint_argument(argv: list[str]) -> list[str]:
    """``CKPT_DIR`` as the first argument means ``checkpoint=CKPT_DIR`` (Hydra takes key=value only)."""
    if len(argv) > 1 and "=" not in argv[1] and not argv[1].startswith("-"):
        return [argv[0], f"checkpoint={argv[1]}", *argv[2:]]
    return argv


@hydra.main(config_path="configs", config_name="consolidate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out = consolidate(cfg.checkpoint, cfg.out)
    print(f"consolidated checkpoint written to {out}  (resume: ckpt_path={out})")


def cli() -> None:
    """``python -m med3dvlm.consolidate`` / ``med3dvlm-consolidate``: the positional folder, then Hydra."""
    sys.argv = positional_checkpoint_argument(sys.argv)
    main()


if __name__ == "__main__":
    cli()
