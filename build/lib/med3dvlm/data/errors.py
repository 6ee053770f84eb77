"""The one error type for bad input data: it always names the file and the problem."""

from __future__ import annotations

import os


class DataError(ValueError):
    """Bad input data. ``str(err)`` reads ``"<path>: <problem>"``."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
