"""FLARE 2025 Task 5's preprocessing, as Med3DVLM's ``flare_preprocess.py`` (FLARE_2025 branch) does it.

Per volume: the array in its stored voxel order (SimpleITK's ``GetArrayFromImage``, no reorientation),
the first volume of a 4-D series, the source's HU window (AMOS abdomen [-160, 240], CT-RATE chest
[-1350, 150]), min-max over the clipped volume, scikit-image's anti-aliased resize to the model's
input size; no foreground crop. The released FLARE weights were trained on exactly this.
"""

from __future__ import annotations

from collections.abc import Mapping

from med3dvlm.data.preprocess import Preprocessing, SourcePreprocessing

ABDOMEN = "abdomen"
CHEST = "chest"
WINDOWS: dict[str, tuple[float, float]] = {ABDOMEN: (-160.0, 240.0), CHEST: (-1350.0, 150.0)}


def source_recipe(source: str, orientation: str | None = None) -> SourcePreprocessing:
    """The recipe of ``source``; ``orientation`` is the voxel order its volumes are stored in (what a
    new scan is reoriented to), ``None`` where unknown."""
    return SourcePreprocessing(
        window=WINDOWS[source],
        scale="minmax",
        orientation=orientation,
        first_frame=True,
        foreground_threshold=None,
        resize="antialiased",
    )


def flare_preprocessing(
    orientations: Mapping[str, str | None] | None = None, prepare: Mapping[str, object] | None = None
) -> Preprocessing:
    """Both sources' recipes (``orientations``: the stored voxel order of each, when known)."""
    orientations = orientations or {}
    return Preprocessing(
        "flare", {name: source_recipe(name, orientations.get(name)) for name in WINDOWS}, dict(prepare or {})
    )
