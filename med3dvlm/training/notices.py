"""Lightning's notices that nobody running a stage can act on, silenced by their exact text; every
other warning is left as it is."""

from __future__ import annotations

import logging
import warnings

from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning_utilities.core import rank_zero

LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"


def _not_the_litlogger_tip(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(LITLOGGER_TIP)


def quiet_lightning() -> None:
    """Silence, for this process: the advertisement for Lightning's cloud logger (on every run without
    it); Lightning's own use of a torch pytree class torch deprecated (for Lightning to change); and the
    warning about modules in eval mode at the start of training, which stages 2-3 keep so on purpose (the
    frozen encoder and LLM: no dropout, no batch-statistics updates), as the model summary states."""
    rank_zero.log.addFilter(_not_the_litlogger_tip)  # the logger Lightning's rank_zero_info writes to
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    warnings.filterwarnings(
        "ignore",
        message=r"Found \d+ module\(s\) in eval mode at the start of training",
        category=PossibleUserWarning,
    )
