"""The dataset releases ``prepare`` reads, by name (``dataset=<name>``); each is one module
(:mod:`.base` is the interface). A new dataset is one more module and one line here."""

from __future__ import annotations

from pathlib import Path

from med3dvlm.data.releases import ctrate, flare, m3d, own
from med3dvlm.data.releases.base import Release

RELEASES: dict[str, Release] = {
    release.name: release for release in (m3d.RELEASE, own.RELEASE, flare.RELEASE, ctrate.RELEASE)
}


def release(name: str | None, source: str | Path | None = None) -> Release:
    """The release ``name``; ``None`` (or ``m3d``) with a ``.csv`` source is your own data."""
    if name in (None, "m3d") and source is not None and str(source).lower().endswith(".csv"):
        name = "own"
    name = name or "m3d"
    if name not in RELEASES:
        raise ValueError(f"dataset={name!r}: one of {sorted(RELEASES)}")
    return RELEASES[name]
