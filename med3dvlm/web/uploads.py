"""The web app's own folder for everything a patient's scan leaves on disk: the uploads, the views
Gradio caches, a DICOM zip's extracted series (every temporary file of the app's process).

It is removed when the app stops: normally, by Ctrl-C (SIGINT), SIGTERM (a service manager,
``kill``) or SIGHUP (its terminal closed). A folder left by an app killed outright (SIGKILL, a
crash, a power cut) is removed when the next app starts. A running app holds a lock on its folder
(``flock``, released by the system however the process ends), so one app never removes another's.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, NoReturn

PREFIX = "med3dvlm-app-"
LOCK = ".lock"
STOPPING_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Signals that end the app through the clean-up. SIGTERM and SIGHUP would end it without; SIGINT would
reach Gradio, whose graceful close waits for open connections (a page's event stream) and can hang,
and a SIGINT ignored by the launching process would be ignored by the app too."""


def remove_leftovers(root: Path) -> list[Path]:
    """Remove the folders in ``root`` of apps no longer running (their lock is free); return them."""
    removed = []
    for folder in sorted(root.glob(f"{PREFIX}*")):
        try:
            with open(folder / LOCK, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(folder)
        except OSError:  # locked by its running app, another user's, or being removed by another app
            continue
        removed.append(folder)
    return removed


def _locked_folder(root: Path) -> tuple[Path, IO[str]]:
    # Made and locked under a name remove_leftovers does not look at, then renamed: a starting app never
    # sees another's folder before its lock is held.
    staging = Path(tempfile.mkdtemp(prefix=f".{PREFIX}", dir=root))
    lock = open(staging / LOCK, "w")  # noqa: SIM115 (held open, and locked, for the folder's life)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    folder = staging.with_name(staging.name.removeprefix("."))
    staging.rename(folder)
    return folder, lock


def _exit_cleanly(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)  # the shell's status for a signal; ``finally`` blocks run


@contextmanager
def private_folder(root: str | os.PathLike | None = None) -> Iterator[Path]:
    """A new locked folder in ``root`` (default: the system's temporary folder) that holds every temporary
    file of this process (``tempfile`` and Gradio's cache) until the block ends, by any of the ways
    above; folders left by killed apps are removed first."""
    root = Path(root or tempfile.gettempdir())
    remove_leftovers(root)
    folder, lock = _locked_folder(root)
    handlers = {sig: signal.signal(sig, _exit_cleanly) for sig in STOPPING_SIGNALS}
    saved_tempdir, saved_cache = tempfile.tempdir, os.environ.get("GRADIO_TEMP_DIR")
    tempfile.tempdir = os.environ["GRADIO_TEMP_DIR"] = str(folder)
    try:
        yield folder
    finally:
        held = set(STOPPING_SIGNALS)
        signal.pthread_sigmask(signal.SIG_BLOCK, held)  # a second signal waits for the clean-up
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        tempfile.tempdir = saved_tempdir
        if saved_cache is None:
            del os.environ["GRADIO_TEMP_DIR"]
        else:
            os.environ["GRADIO_TEMP_DIR"] = saved_cache
        shutil.rmtree(folder, ignore_errors=True)
        lock.close()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
