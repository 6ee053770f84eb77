"""How a Hydra command of this package starts and fails: ``@hydra_command("infer")`` stands for
``@hydra.main(config_path="configs", config_name="infer", version_base="1.3")``.

A user's error (a missing or bad file, a bad setting: ``ValueError`` and its kinds such as
``DataError`` and ``RecordError``, ``FileNotFoundError``, a required ``???`` setting left unset)
prints as one paragraph on stderr and exits with status 2. Anything else is Hydra's report, as is a
user's error in a multirun job (the sweep reports its jobs). ``--verbose`` on the command line, like
``HYDRA_FULL_ERROR=1``, keeps every traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

USER_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, NotADirectoryError)
VERBOSE = "--verbose"


def user_error(error: BaseException) -> str | None:
    """What to tell the user about ``error``, or ``None`` when it is not theirs to fix. An error
    raised while Hydra built an object is judged by its cause."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    if isinstance(error, MissingMandatoryValue):
        return f"{error.full_key}= is required (it has no default): add {error.full_key}=<value>"
    if isinstance(error, USER_ERRORS):
        return str(error)
    return None


def _full_errors() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _command_name(task: Callable[..., Any]) -> str:
    # ``python -m med3dvlm.infer`` runs the module as ``__main__``; its spec keeps the name
    spec = getattr(sys.modules.get(task.__module__), "__spec__", None)
    return spec.name if spec is not None else task.__module__


def hydra_command(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """``hydra.main`` on ``med3dvlm/configs/<config_name>.yaml``, with a user's error as one paragraph."""

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(task)  # Hydra finds the config folder from the task's module
        def paragraph_on_user_error(cfg: DictConfig) -> Any:
            try:
                return task(cfg)
            except Exception as error:
                message = user_error(error)
                if message is None or _full_errors() or _multirun():
                    raise
                print(
                    f"{_command_name(task)}: {message}\n({VERBOSE} or HYDRA_FULL_ERROR=1 shows the traceback)",
                    file=sys.stderr,
                )
                raise SystemExit(2) from None

        hydra_main = hydra.main(config_path="configs", config_name=config_name, version_base="1.3")(
            paragraph_on_user_error
        )

        @functools.wraps(task)
        def main() -> Any:
            if VERBOSE in sys.argv[1:]:  # not a Hydra flag: taken out before Hydra reads the arguments
                sys.argv.remove(VERBOSE)
                os.environ["HYDRA_FULL_ERROR"] = "1"
            return hydra_main()

        return main

    return decorate
