"""A resumed run keeps the config it was started with.

``resume=<run folder>`` reuses that folder; Hydra writes the resumed job's config into
``.hydra/resume-<time>/`` instead of over the original ``.hydra/`` (``hydra/default.yaml``), and
:func:`check_resume_config` compares the two before anything is built: a changed training setting
(learning rate, batch size, epochs, model, data, ...) is refused with every difference named,
unless ``resume_override=true`` says it is meant. Paths, loggers, callbacks, tags and the test
switch may change (they do not change what is trained), and so may the process count
(``trainer.devices``, ``trainer.num_nodes``: the resumed run serves the rest of the epoch, in other
per-step batches).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger(__name__)

ORIGINAL_CONFIG = Path(".hydra") / "config.yaml"
# Top-level keys a resume may change: where things go, how they are reported, resume bookkeeping.
FREE_KEYS = frozenset(
    {"resume", "ckpt_path", "resume_override", "paths", "logger", "callbacks", "tags", "test"}
)
# Settings below the top level a resume may change: the process count (a requeued job may get other
# nodes; the data position is a global sample count, see med3dvlm.training.resumable_data).
FREE_SETTINGS = frozenset({"trainer.devices", "trainer.num_nodes"})


class ChangedResumeConfig(ValueError):
    """``resume=`` with training settings other than the run's own."""


def config_differences(
    original: Mapping[str, Any], current: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    """``key: old -> new`` for every leaf that differs between two plain config trees."""
    changes = []
    for key in sorted(set(original) | set(current), key=str):
        name = f"{prefix}{key}"
        if (not prefix and key in FREE_KEYS) or name in FREE_SETTINGS:
            continue
        old, new = original.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            changes += config_differences(old, new, f"{name}.")
        elif old != new:
            changes.append(f"{name}: {old!r} -> {new!r}")
    return changes


def resolved_values(cfg: DictConfig) -> dict[str, Any]:
    """The config's values as the run used them (interpolations resolved where they resolve)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:  # an interpolation that only resolves in its own run: compare as written
        return OmegaConf.to_container(cfg, resolve=False)


def check_resume_config(cfg: DictConfig) -> None:
    """With ``resume=``, refuse training settings that differ from the run folder's recorded config
    (unless ``resume_override``); without one recorded, say so and go on."""
    if not cfg.get("resume"):
        return
    recorded = Path(cfg.paths.output_dir) / ORIGINAL_CONFIG
    if not recorded.is_file():
        log.warning("resume: %s not found; the settings of the resumed run cannot be checked", recorded)
        return
    changes = config_differences(resolved_values(OmegaConf.load(recorded)), resolved_values(cfg))
    if not changes:
        return
    listing = "\n  ".join(changes)
    if cfg.get("resume_override"):
        log.warning(
            "resume_override=true: resuming with settings that differ from %s:\n  %s", recorded, listing
        )
        return
    raise ChangedResumeConfig(
        f"{recorded}: the resumed run's settings differ from the ones it was started with:\n  {listing}\n"
        "Resume with the original settings, or pass resume_override=true if the change is meant "
        "(the original config stays in .hydra/, this resume's in .hydra/resume-<time>/)."
    )
