"""Optimiser parameter groups and learning-rate schedule shared by the training stages."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

# Normalisation layers keep their affine parameters free of weight decay.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)
# Learnable scalars of a loss (SigLIP's temperature and bias) are never decayed.
NO_DECAY_NAMES: tuple[str, ...] = ("log_scale", "bias")


def _is_norm(module: nn.Module) -> bool:
    # Hugging Face models define their own RMSNorm classes; their names say what they are.
    return isinstance(module, NORM_TYPES) or type(module).__name__.lower().endswith("norm")


def split_decay(module: nn.Module, extra_no_decay: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters that get weight decay and of those that do not.

    Decayed: weight matrices and kernels (``ndim >= 2``) outside normalisation layers. Not decayed:
    biases, every parameter of a normalisation layer, 0-d/1-d parameters (scales), parameters whose
    last name part is in ``NO_DECAY_NAMES`` or ``extra_no_decay``.

    A parameter shared by several modules (tied input and output embeddings) is listed once, under
    its first name, the one ``named_parameters()`` keeps.
    """
    skip_names = set(NO_DECAY_NAMES) | set(extra_no_decay)
    decay, no_decay = [], []
    seen: set[int] = set()
    for module_name, child in module.named_modules():
        for name, param in child.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{name}" if module_name else name
            if param.ndim < 2 or _is_norm(child) or name in skip_names:
                no_decay.append(full)
            else:
                decay.append(full)
    return decay, no_decay


def param_groups(
    module: nn.Module,
    weight_decay: float,
    extra_no_decay: Iterable[str] = (),
    lr_by_prefix: Mapping[str, float] | None = None,
) -> list[dict]:
    """AdamW parameter groups: ``weight_decay`` on weights only (see ``split_decay``).

    ``lr_by_prefix`` gives the parameters whose name starts with a prefix their own learning rate
    (first matching prefix wins, in their own decay / no-decay groups); the others use the
    optimiser's.
    """
    params = dict(module.named_parameters())
    decay, no_decay = split_decay(module, extra_no_decay)
    prefixes: list[str | None] = [*(lr_by_prefix or {}), None]

    def owner(name: str) -> str | None:
        return next((p for p in prefixes if p is None or name.startswith(p)), None)

    groups = []
    for prefix in prefixes:
        lr = {} if prefix is None else {"lr": lr_by_prefix[prefix]}
        for names, decay_value in ((decay, weight_decay), (no_decay, 0.0)):
            chosen = [params[n] for n in names if owner(n) == prefix]
            if chosen:
                groups.append({"params": chosen, "weight_decay": decay_value, **lr})
    return groups


class WarmupCosine:
    """LR factor: linear warm-up over ``ceil(warmup_ratio * total_steps)`` steps, then cosine to
    ``min_lr_ratio``. A class rather than a closure so the scheduler state is picklable."""

    def __init__(self, total_steps: int, warmup_ratio: float = 0.03, min_lr_ratio: float = 0.0) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.total_steps = total_steps
        self.warmup_steps = math.ceil(warmup_ratio * total_steps)
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float = 0.03, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step cosine schedule with linear warm-up (configure as a ``_partial_`` node)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_ratio, min_lr_ratio))


def constant(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Constant learning rate (same call signature as ``cosine_with_warmup``)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _constant_factor)


def _constant_factor(step: int) -> float:
    return 1.0


SchedulerFactory = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]
