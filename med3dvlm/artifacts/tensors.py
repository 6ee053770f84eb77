"""Weights as files: a module's tensors written to safetensors whole, read back strictly (a missing,
unexpected or mis-shaped key is an error naming the file)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``tensors`` (detached, contiguous, on the CPU) to the safetensors file ``path``."""
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_state_strict(module: nn.Module, path: str | os.PathLike) -> None:
    """Load a safetensors file into ``module``; missing, extra or mis-shaped keys are an error."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: weights not found")
    state = load_file(str(path))
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(
            f"{path}: does not fit {type(module).__name__}: missing keys {missing[:5]}, unexpected keys {extra[:5]}"
        )
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ValueError(
                f"{path}: key {key!r} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}"
            )
    module.load_state_dict(state, strict=True)
