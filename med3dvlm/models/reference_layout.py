"""Convert state dicts in the original Med3DVLM key layout to ours, strictly.

Original DCFormer keys (``encoder.s0.0.{L}.c{A}.{0,1}.*``, ``encoder.s{i}.{j}.dwconv.c{A}.*``,
``encoder.s{i}.{j}.mlp.mlp.{0,3}.*``) and Mixer keys (``{low,high}_mixer.{i}.ln{1,2}.*``,
``...mlp{1,2}.mm_projector.{0 | m.1}.*``) are renamed to the clean names of
:class:`~med3dvlm.models.dcformer.DCFormer` and :class:`~med3dvlm.models.projectors.MixerProjector`.
Released checkpoints prefix these keys; pass the prefix (see ``DCFORMER_PREFIXES`` and
``MIXER_PREFIXES``). Conversion is strict: every given key must carry the prefix and map to a
key of the model with the same shape, and every model key must be covered; the first offending
key is named in the error. Values are passed through unchanged (``load_state_dict`` casts).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from torch import Tensor, nn

from med3dvlm.models.dcformer import AXES, DCFormer
from med3dvlm.models.projectors import MixerProjector

DCFORMER_PREFIXES: tuple[str, ...] = (
    "",
    "vision_encoder.",
    "model.vision_tower.vision_tower.",
    "vision_tower.",
)
"""``pretrained_ViT.bin``, the SigLIP checkpoint, the merged VLM, ``vision_tower.bin``."""

MIXER_PREFIXES: tuple[str, ...] = ("", "model.mm_projector.")
"""A bare Mixer state dict; ``mm_projector.bin`` and the merged VLM."""


class ReferenceLayoutError(ValueError):
    """A state dict does not match the original layout of the model it should load into."""


Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str]]

_BRANCH = {"c1": AXES[0], "c2": AXES[1], "c3": AXES[2]}
_CONV_OR_NORM = {"0": "conv", "1": "norm"}

DCFORMER_RULES: tuple[Rule, ...] = (
    (
        re.compile(r"encoder\.s0\.0\.(\d+)\.(c[123])\.([01])\.(\w+)"),
        lambda m: f"stages.0.layers.{m[1]}.{_BRANCH[m[2]]}.{_CONV_OR_NORM[m[3]]}.{m[4]}",
    ),
    (
        re.compile(r"encoder\.s([1-4])\.(\d+)\.dwconv\.(c[123])\.([01])\.(\w+)"),
        lambda m: f"stages.{m[1]}.{m[2]}.dwconv.{_BRANCH[m[3]]}.{_CONV_OR_NORM[m[4]]}.{m[5]}",
    ),
    (
        re.compile(r"encoder\.s([1-4])\.(\d+)\.mlp\.mlp\.([03])\.(weight|bias)"),
        lambda m: f"stages.{m[1]}.{m[2]}.mlp.{'fc1' if m[3] == '0' else 'fc2'}.{m[4]}",
    ),
    (re.compile(r"encoder\.s([1-4])\.(\d+)\.(scale|proj\.weight)"), lambda m: f"stages.{m[1]}.{m[2]}.{m[3]}"),
)

_MIXER_PART = {"ln1": "token_norm", "ln2": "channel_norm", "mlp1": "token_mlp", "mlp2": "channel_mlp"}

MIXER_RULES: tuple[Rule, ...] = (
    (
        re.compile(r"(low|high)_mixer\.(\d+)\.(ln[12])\.(weight|bias)"),
        lambda m: f"{m[1]}.{m[2]}.{_MIXER_PART[m[3]]}.{m[4]}",
    ),
    (
        re.compile(r"(low|high)_mixer\.(\d+)\.(mlp[12])\.mm_projector\.0\.(weight|bias)"),
        lambda m: f"{m[1]}.{m[2]}.{_MIXER_PART[m[3]]}.linears.0.{m[4]}",
    ),
    (
        re.compile(r"(low|high)_mixer\.(\d+)\.(mlp[12])\.mm_projector\.([1-9]\d*)\.1\.(weight|bias)"),
        lambda m: f"{m[1]}.{m[2]}.{_MIXER_PART[m[3]]}.linears.{m[4]}.{m[5]}",
    ),
)


# The inverse renamings: our keys to the original's (what a release in the original's layout holds).
_ORIGINAL_BRANCH = {axis: branch for branch, axis in _BRANCH.items()}
_ORIGINAL_INDEX = {part: index for index, part in _CONV_OR_NORM.items()}
_ORIGINAL_PART = {ours: original for original, ours in _MIXER_PART.items()}

DCFORMER_ORIGINAL_NAMES: tuple[Rule, ...] = (
    (
        re.compile(r"stages\.0\.layers\.(\d+)\.(\w+)\.(conv|norm)\.(\w+)"),
        lambda m: f"encoder.s0.0.{m[1]}.{_ORIGINAL_BRANCH[m[2]]}.{_ORIGINAL_INDEX[m[3]]}.{m[4]}",
    ),
    (
        re.compile(r"stages\.([1-4])\.(\d+)\.dwconv\.(\w+)\.(conv|norm)\.(\w+)"),
        lambda m: f"encoder.s{m[1]}.{m[2]}.dwconv.{_ORIGINAL_BRANCH[m[3]]}.{_ORIGINAL_INDEX[m[4]]}.{m[5]}",
    ),
    (
        re.compile(r"stages\.([1-4])\.(\d+)\.mlp\.(fc[12])\.(weight|bias)"),
        lambda m: f"encoder.s{m[1]}.{m[2]}.mlp.mlp.{'0' if m[3] == 'fc1' else '3'}.{m[4]}",
    ),
    (re.compile(r"stages\.([1-4])\.(\d+)\.(scale|proj\.weight)"), lambda m: f"encoder.s{m[1]}.{m[2]}.{m[3]}"),
)

MIXER_ORIGINAL_NAMES: tuple[Rule, ...] = (
    (
        re.compile(r"(low|high)\.(\d+)\.(token_norm|channel_norm)\.(weight|bias)"),
        lambda m: f"{m[1]}_mixer.{m[2]}.{_ORIGINAL_PART[m[3]]}.{m[4]}",
    ),
    (
        re.compile(r"(low|high)\.(\d+)\.(token_mlp|channel_mlp)\.linears\.0\.(weight|bias)"),
        lambda m: f"{m[1]}_mixer.{m[2]}.{_ORIGINAL_PART[m[3]]}.mm_projector.0.{m[4]}",
    ),
    (
        re.compile(r"(low|high)\.(\d+)\.(token_mlp|channel_mlp)\.linears\.([1-9]\d*)\.(weight|bias)"),
        lambda m: f"{m[1]}_mixer.{m[2]}.{_ORIGINAL_PART[m[3]]}.mm_projector.{m[4]}.1.{m[5]}",
    ),
)


def _rename(key: str, rules: tuple[Rule, ...]) -> str | None:
    for pattern, build in rules:
        match = pattern.fullmatch(key)
        if match:
            return build(match)
    return None


def convert_state_dict(
    state_dict: Mapping[str, Tensor], model: nn.Module, rules: tuple[Rule, ...], prefix: str = ""
) -> dict[str, Tensor]:
    """Rename ``state_dict`` (original layout, keys starting with ``prefix``) to ``model``'s keys."""
    expected = model.state_dict()
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            raise ReferenceLayoutError(f"key {key!r} does not start with the expected prefix {prefix!r}")
        ours = _rename(key[len(prefix) :], rules)
        if ours is None:
            raise ReferenceLayoutError(
                f"key {key!r} is not part of the original {type(model).__name__} layout "
                f"after removing the prefix {prefix!r} (is the prefix right?)"
            )
        if ours not in expected:
            raise ReferenceLayoutError(
                f"key {key!r} (ours: {ours!r}) does not exist in this {type(model).__name__}; "
                "the checkpoint has more blocks or layers than the configured model"
            )
        if tuple(value.shape) != tuple(expected[ours].shape):
            raise ReferenceLayoutError(
                f"key {key!r}: shape {list(value.shape)} but the configured model's {ours!r} "
                f"has {list(expected[ours].shape)}"
            )
        if ours in converted:
            raise ReferenceLayoutError(f"key {key!r} maps to {ours!r}, which an earlier key already filled")
        converted[ours] = value
    for ours in expected:
        if ours not in converted:
            raise ReferenceLayoutError(
                f"the checkpoint has no entry for {type(model).__name__} key {ours!r} (prefix {prefix!r})"
            )
    return converted


def rules_for(model: nn.Module) -> tuple[Rule, ...]:
    """The renaming rules for a model class that has an original counterpart."""
    if isinstance(model, DCFormer):
        return DCFORMER_RULES
    if isinstance(model, MixerProjector):
        return MIXER_RULES
    raise TypeError(f"no original key layout is known for {type(model).__name__}")


def load_reference_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], prefix: str = "") -> None:
    """Convert ``state_dict`` from the original layout and load it into ``model`` strictly."""
    model.load_state_dict(convert_state_dict(state_dict, model, rules_for(model), prefix), strict=True)


def to_reference_state_dict(model: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """``model``'s state dict in the original layout, keys under ``prefix`` (what a release of it holds):
    the inverse of :func:`convert_state_dict`, checked by converting it back."""
    rules = rules_for(model)
    names = DCFORMER_ORIGINAL_NAMES if rules is DCFORMER_RULES else MIXER_ORIGINAL_NAMES
    state = model.state_dict()
    original: dict[str, Tensor] = {}
    for key, value in state.items():
        name = _rename(key, names)
        if name is None:
            raise ReferenceLayoutError(
                f"{type(model).__name__} key {key!r} has no counterpart in the original layout"
            )
        original[prefix + name] = value
    back = convert_state_dict(original, model, rules, prefix)
    wrong = next((key for key in state if back[key] is not state[key]), None)
    if wrong is not None:
        raise ReferenceLayoutError(f"{type(model).__name__} key {wrong!r} does not convert back to itself")
    return original
