"""``python -m med3dvlm.consolidate CKPT_DIR [--out FILE.ckpt]``: a sharded checkpoint (the folder that
``trainer=fsdp`` writes) as one Lightning checkpoint file.

The file holds the full ``state_dict``, the optimiser states in PyTorch's own layout (parameters
numbered in optimiser order) and the loop, scheduler and callback states, so ``ckpt_path=FILE``
resumes under any strategy (single device, ``ddp``, ``fsdp``) and ``torch.load(weights_only=True)``
reads it. The whole checkpoint is assembled in CPU memory (:func:`med3dvlm.training.sharding.consolidate`).
``--weights DIR`` writes only the trained weights, as safetensors shards, one tensor in memory at a
time (:func:`med3dvlm.training.sharding.consolidate_weights`): what a 7B checkpoint needs on a workstation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from med3dvlm.training.sharding import consolidate, consolidate_weights


def arguments() -> argparse.ArgumentParser:
    """The command's arguments (``--help`` lists them)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint", type=Path, help="the sharded checkpoint folder, e.g. <run>/checkpoints/last.ckpt"
    )
    parser.add_argument("--out", type=Path, help="the file to write (default: CKPT_DIR.consolidated.ckpt)")
    parser.add_argument(
        "--weights",
        type=Path,
        metavar="DIR",
        help="write only the trained weights, as safetensors shards in DIR, tensor by tensor (instead of --out)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = arguments()
    args = parser.parse_args(argv)
    if args.weights is not None:
        if args.out is not None:
            parser.error("--out and --weights: one or the other")
        weights = consolidate_weights(args.checkpoint, args.weights)
        print(f"weights written to {weights} (safetensors shards and their index)")
        return
    out = consolidate(
        args.checkpoint, args.out or args.checkpoint.with_name(args.checkpoint.name + ".consolidated.ckpt")
    )
    print(f"consolidated checkpoint written to {out}  (resume: ckpt_path={out})")


if __name__ == "__main__":
    main()
