"""The components a saved artifact may rebuild: its recorded ``_target_`` must be one of ours.

Encoder exports, stage hand-offs and model folders record the ``_target_`` nodes that rebuild their
vision tower and projector. Those files may come from anyone (the hub, a colleague, a shared
cluster), so they are data, not code: :func:`build_component` builds only a class listed in
:data:`COMPONENTS`, from plain JSON values, and refuses anything else with the file and the key
named. Hydra's ``instantiate`` would import and call whatever a file names
(``pathlib.Path.write_text``, ``torch.load`` with ``weights_only=False``, ...).

A research user's own encoder or projector class joins the list with :func:`register_component`
(call it before loading an artifact that names it).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

from torch import nn

from med3dvlm.models.dcformer import DCFormer
from med3dvlm.models.projectors import LinearProjector, MixerProjector, MLPProjector
from med3dvlm.models.vit3d import ViT3D

COMPONENTS: dict[str, type[nn.Module]] = {
    f"{cls.__module__}.{cls.__qualname__}": cls
    for cls in (DCFormer, ViT3D, MixerProjector, LinearProjector, MLPProjector)
}
_PLAIN = (str, int, float, bool, type(None))
RETIRED_SETTINGS: dict[str, dict[str, str]] = {
    "med3dvlm.models.dcformer.DCFormer": {
        "channels_last": "the encoder now chooses the memory layout of each operation itself",
    },
}
"""Settings older artifacts record that a component no longer takes: dropped, with a warning, when
the artifact is loaded (they changed speed, never results)."""


class UntrustedComponentError(ValueError):
    """An artifact names something that is not one of our components; nothing was imported or run."""


def register_component(cls: type[nn.Module]) -> type[nn.Module]:
    """Allow artifacts to rebuild ``cls`` (usable as a class decorator); returns ``cls``."""
    COMPONENTS[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def _check_plain(value: Any, source: str | os.PathLike, key: str) -> None:
    if isinstance(value, Mapping):
        for name, item in value.items():
            if not isinstance(name, str) or name.startswith("_"):
                raise UntrustedComponentError(
                    f"{source}: {key}.{name} is not a plain setting (keys starting with '_' are refused)"
                )
            _check_plain(item, source, f"{key}.{name}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, source, f"{key}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise UntrustedComponentError(f"{source}: {key} has a value of type {type(value).__name__}")


def component_class(node: Mapping[str, Any], source: str | os.PathLike, key: str) -> type[nn.Module]:
    """The allow-listed class ``node["_target_"]`` names, after checking every other value is plain."""
    if not isinstance(node, Mapping) or not isinstance(node.get("_target_"), str):
        raise UntrustedComponentError(f"{source}: {key} is not a component node with a '_target_'")
    target = node["_target_"]
    if target not in COMPONENTS:
        raise UntrustedComponentError(
            f"{source}: {key}._target_ {target!r} is not a med3dvlm component; allowed: {sorted(COMPONENTS)} "
            "(register your own class with med3dvlm.models.components.register_component)"
        )
    _check_plain({k: v for k, v in node.items() if k != "_target_"}, source, key)
    return COMPONENTS[target]


def build_component(node: Mapping[str, Any], source: str | os.PathLike, key: str) -> nn.Module:
    """Build the component a saved ``_target_`` node describes; refuses (naming ``source`` and
    ``key``) any target outside :data:`COMPONENTS`, any other ``_``-key and any non-JSON value."""
    cls = component_class(node, source, key)
    retired = RETIRED_SETTINGS.get(node["_target_"], {})
    for name in retired.keys() & node.keys():
        warnings.warn(
            f"{source}: {key}.{name} is no longer a setting ({retired[name]}); ignored", stacklevel=2
        )
    return cls(**{k: v for k, v in node.items() if k != "_target_" and k not in retired})
