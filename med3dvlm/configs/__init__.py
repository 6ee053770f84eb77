"""The Hydra config groups of med3dvlm (their resolvers: :mod:`med3dvlm.resolvers`).

The configs ship inside the package (this folder; the checkout's ``configs/`` and ``experiments/``
point here), so an installed wheel runs every command. Data and outputs live under
the *work root*: the current directory, or ``MED3DVLM_ROOT`` when set (``paths.root_dir``).
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_DIR: Path = Path(__file__).resolve().parent


def work_root() -> Path:
    """Where ``data/`` and ``outputs/`` are: ``MED3DVLM_ROOT``, else the current directory."""
    return Path(os.environ.get("MED3DVLM_ROOT") or os.getcwd()).resolve()
