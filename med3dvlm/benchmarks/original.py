"""The original implementation's encoder and projector, imported from a checkout the user fetched
(``--reference PATH``: a clone of mirthAI/Med3DVLM; never vendored here). Its code runs in this
process, so point it only at a checkout you trust.

The original's DCFormer imports ``timm.layers`` for three helpers; where timm is not installed, a
stand-in provides them (``DropPath`` at rate 0, the only rate the benchmark uses, is the identity).
Its code also imports ``einops``, which must be installed.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import dataclass
from pathlib import Path

from torch import nn

FILES = {"dcformer": "src/model/encoder/dcformer.py", "projector": "src/model/projector/mlp.py"}


@dataclass(frozen=True)
class Original:
    """The original's ``decomp_small`` factory and ``MixerLowHighHybridMLP`` class."""

    decomp_small: object
    mixer: type[nn.Module]


def _drop_path(drop_prob: float = 0.0, **_: object) -> nn.Module:
    if drop_prob:
        raise ValueError("the timm stand-in only provides DropPath at rate 0; install timm for other rates")
    return nn.Identity()


def _timm_stand_in() -> None:
    if "timm.layers" in sys.modules or importlib.util.find_spec("timm") is not None:
        return
    layers = types.ModuleType("timm.layers")
    layers.DropPath = _drop_path
    layers.to_3tuple = lambda x: tuple(x) if isinstance(x, tuple | list) else (x, x, x)
    layers.trunc_normal_ = nn.init.trunc_normal_
    timm = types.ModuleType("timm")
    timm.layers = layers
    sys.modules.setdefault("timm", timm)
    sys.modules.setdefault("timm.layers", layers)


def _load(path: Path, name: str) -> types.ModuleType:
    file = path / FILES[name]
    if not file.is_file():
        raise FileNotFoundError(
            f"--reference {path}: {FILES[name]} not found; pass the root of a mirthAI/Med3DVLM checkout"
        )
    spec = importlib.util.spec_from_file_location(f"_original_{name}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"{file} imports {err.name!r}: pip install {err.name}") from err
    return module


def load_original(path: str | Path) -> Original:
    """Import the original's encoder and projector modules from the checkout at ``path``."""
    path = Path(path).expanduser().resolve()
    _timm_stand_in()
    dcformer, projector = _load(path, "dcformer"), _load(path, "projector")
    return Original(decomp_small=dcformer.decomp_small, mixer=projector.MixerLowHighHybridMLP)
