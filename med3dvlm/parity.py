"""``python -m med3dvlm.parity FILE.pt [--tolerance 1e-5]``: check our modules against the original.

FILE is a test-vector file in the layout of ``tests/data/reference/*.pt`` (``kind`` ``dcformer`` or
``mixer``, ``config``, ``state_dict`` in the original's key layout, inputs, expected outputs). The
module is built from ``config``, the weights go through the strict converter, and every output
is compared: the relative difference is ``max|ours - ref| / max|ref|``. Exit status 0 only if
every relative difference is within the tolerance, 1 if one is not, 2 if the file is unusable.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from med3dvlm.data.errors import DataError
from med3dvlm.models.dcformer import VARIANTS, DCFormer
from med3dvlm.models.projectors import MixerProjector
from med3dvlm.models.reference_layout import ReferenceLayoutError, load_reference_state_dict


@dataclass(frozen=True)
class Comparison:
    """Difference between one of our outputs and the reference's."""

    name: str
    max_abs: float
    max_ref: float

    @property
    def relative(self) -> float:
        return self.max_abs / self.max_ref if self.max_ref > 0 else self.max_abs


def _compare(name: str, ours: Tensor, ref: Tensor, path: Path) -> Comparison:
    if ours.shape != ref.shape:
        raise DataError(
            path, f"{name}: our output has shape {list(ours.shape)}, the reference {list(ref.shape)}"
        )
    ref = ref.float()
    return Comparison(name, (ours - ref).abs().max().item(), ref.abs().max().item())


def _require(data: Mapping, keys: tuple[str, ...], path: Path) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise DataError(path, f"missing entries {missing}")


def _float32(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # Files may store float16 or float8 weights; integer buffers (num_batches_tracked) stay as they are.
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def build_dcformer(config: Mapping, path: Path) -> DCFormer:
    """Our DCFormer for an original ``decomp_*`` config."""
    if any(t != "C" for t in config.get("block_types", ["C"])):
        raise DataError(path, f"block_types {config['block_types']} unsupported: only 'C' (ConvBlock) exists")
    variant = str(config.get("variant", "")).removeprefix("decomp_")
    try:
        return DCFormer(
            variant=variant if variant in VARIANTS else "small",
            num_blocks=config["num_blocks"],
            channels=config["channels"],
            kernel_sizes=config["kernel_sizes"],
            in_channels=config.get("in_channels", 1),
            stem_kernel_sizes=config.get("stem_kernel_sizes", (7, 3, 3, 3)),
            stem_stride=config.get("stem_stride", 4),
        )
    except (KeyError, ValueError) as err:
        raise DataError(path, f"config {dict(config)} cannot build a DCFormer: {err}") from err


def build_mixer(config: Mapping, path: Path) -> MixerProjector:
    """Our MixerProjector for an original ``MixerLowHighHybridMLP`` config."""
    try:
        (low_t, low_c), (high_t, high_c) = config["low_input_size"], config["high_input_size"]
        return MixerProjector(
            encoder_channels=[low_c, high_c],
            encoder_tokens=[low_t, high_t],
            llm_dim=config["output_dim"],
            low_tokens=config["low_output_size"],
            high_tokens=config["high_output_size"],
            depth=config["depth"],
            mlp_depth=config["mlp_depth"],
        )
    except (KeyError, ValueError) as err:
        raise DataError(path, f"config {dict(config)} cannot build a MixerProjector: {err}") from err


@torch.no_grad()
def compare_file(path: str | Path) -> list[Comparison]:
    """Load a reference test-vector file, run our module on its inputs, compare every output."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise DataError(path, f"cannot be read as a torch file: {str(err).splitlines()[0]}") from err
    if not isinstance(data, dict):
        raise DataError(path, f"expected a dict, found {type(data).__name__}")
    _require(data, ("kind", "config", "state_dict"), path)
    if data["kind"] == "dcformer":
        _require(data, ("input", "hidden_states"), path)
        model = build_dcformer(data["config"], path)
    elif data["kind"] == "mixer":
        _require(data, ("low", "high", "output"), path)
        model = build_mixer(data["config"], path)
    else:
        raise DataError(path, f"kind {data['kind']!r} unknown; expected 'dcformer' or 'mixer'")
    try:
        load_reference_state_dict(model, _float32(data["state_dict"]))
    except ReferenceLayoutError as err:
        raise DataError(path, str(err)) from err
    model.eval()

    if data["kind"] == "mixer":
        output = model([data["low"].float(), data["high"].float()])
        return [_compare("output", output, data["output"], path)]
    hidden = model(data["input"].float())
    if len(hidden) != len(data["hidden_states"]):
        raise DataError(
            path, f"{len(data['hidden_states'])} hidden_states stored, our model returns {len(hidden)}"
        )
    rows = [
        _compare(f"hidden_states[{i}]", o, r, path)
        for i, (o, r) in enumerate(zip(hidden, data["hidden_states"]))
    ]
    # stage_io lives in the encoder's internal (B, C, H, W, D) frame, which our stages share.
    for name, io in data.get("stage_io", {}).items():
        index = int(name.removeprefix("s"))
        rows.append(
            _compare(f"stage_io.{name}", model.stages[index](io["input"].float()), io["output"], path)
        )
    return rows


def comparison_text(rows: list[Comparison], tolerance: float) -> str:
    """Plain-text table: output, max abs diff, max |ref|, relative diff, verdict."""
    lines = [f"{'output':<18} {'max abs diff':>13} {'max |ref|':>10} {'relative':>10}  within {tolerance:g}"]
    for r in rows:
        lines.append(
            f"{r.name:<18} {r.max_abs:>13.3e} {r.max_ref:>10.3g} {r.relative:>10.3e}  "
            f"{'yes' if r.relative <= tolerance else 'NO'}"
        )
    return "\n".join(lines)


def arguments() -> argparse.ArgumentParser:
    """The command's arguments (``--help`` lists them)."""
    parser = argparse.ArgumentParser(
        prog="python -m med3dvlm.parity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", type=Path, help="reference test-vector .pt file")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="maximum relative difference")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = arguments()
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    try:
        rows = compare_file(args.file)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.file}")
    print(comparison_text(rows, args.tolerance))
    return 0 if all(r.relative <= args.tolerance for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
