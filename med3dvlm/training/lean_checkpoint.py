"""Lean checkpoints: what training changes, and a fingerprint of what it does not.

A stage's checkpoint holds its trainable parameters, the persistent buffers of the modules that
train (BatchNorm statistics), the optimizer state (which covers trainable parameters only), the
loop, scheduler, RNG and data-position states, and ``frozen_base``: a fingerprint of every frozen
tensor (name, shape, dtype and an evenly spaced sample of its values) with where the base came
from. Resuming builds the frozen parts from the configured base (encoder export, LLM), as a fresh
run does, loads the lean state, and compares the fingerprint: a checkpoint of another base is a
clear error, never a silent mix. A stage that trains everything (SigLIP) keeps everything.

The fingerprint is taken once, in ``setup``, before FSDP shards the frozen tensors.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

SAMPLES_PER_TENSOR = 256


class FrozenBaseMismatch(ValueError):
    """A checkpoint trained on another frozen base than the configured one."""


def split_state_keys(module: nn.Module) -> tuple[set[str], set[str]]:
    """State-dict keys of ``module`` that train (trainable parameters, persistent buffers of
    modules with a trainable parameter of their own) and those that stay frozen."""
    trained: set[str] = set()
    frozen: set[str] = set()
    for prefix, child in module.named_modules(remove_duplicate=False):
        own = list(child.named_parameters(recurse=False))
        learns = any(p.requires_grad for _, p in own)
        dot = f"{prefix}." if prefix else ""
        for name, param in own:
            (trained if param.requires_grad else frozen).add(dot + name)
        for name, _ in child.named_buffers(recurse=False):
            if name not in child._non_persistent_buffers_set:
                (trained if learns else frozen).add(dot + name)
    return trained, frozen - trained


def tensor_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over each tensor's name, shape, dtype and ``SAMPLES_PER_TENSOR`` evenly spaced values."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        flat = tensor.reshape(-1)
        step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
        sample = flat[::step][:SAMPLES_PER_TENSOR].to("cpu", torch.float64)
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


class LeanCheckpoint:
    """Mixin for the stage LightningModules (listed before ``LightningModule``); a stage names its
    frozen base in ``frozen_base_source``."""

    frozen_base_source: dict[str, Any]

    def _lean_init(self) -> None:
        self.strict_loading = False  # the frozen tensors are not in the checkpoint; on_load_checkpoint checks
        self._frozen_fingerprint: str | None = None

    def lean_keys(self) -> set[str]:
        """The state-dict keys a checkpoint of this stage holds."""
        return split_state_keys(self)[0]

    def frozen_fingerprint(self) -> str:
        if self._frozen_fingerprint is None:
            frozen = split_state_keys(self)[1]
            state = self.state_dict()
            self._frozen_fingerprint = tensor_fingerprint({k: state[k] for k in frozen if k in state})
        return self._frozen_fingerprint

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.frozen_fingerprint()  # before configure_model shards the frozen tensors

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keys = self.lean_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        checkpoint["frozen_base"] = {"fingerprint": self.frozen_fingerprint(), **self.frozen_base_source}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        recorded = checkpoint.get("frozen_base")
        if recorded is not None and recorded.get("fingerprint") != self.frozen_fingerprint():
            raise FrozenBaseMismatch(
                f"the checkpoint was trained on another frozen base ({_describe(recorded)}) than the configured "
                f"one ({_describe({'fingerprint': self.frozen_fingerprint(), **self.frozen_base_source})}): resume "
                "with the encoder export and LLM the run was started with"
            )
        if "state_dict" in checkpoint:  # a file; a shard folder's keys are checked by FSDP2Strategy
            check_lean_keys(set(checkpoint["state_dict"]), self.lean_keys(), "the checkpoint")


def check_lean_keys(present: set[str], expected: set[str], where: str) -> None:
    """Every trained key must be in a checkpoint (frozen ones may be, in a checkpoint written before
    lean checkpoints); a missing one is named."""
    missing = sorted(expected - present)
    if missing:
        raise ValueError(f"{where} lacks {len(missing)} trained tensor(s) of this stage, e.g. {missing[:3]}")


def _describe(base: dict[str, Any]) -> str:
    fields = ", ".join(f"{k}={v}" for k, v in base.items() if k != "fingerprint")
    return f"{fields}, fingerprint {str(base.get('fingerprint'))[:12]}"
