"""Train-time augmentation of prepared volumes, with the original's MONAI semantics, fast.

The original Med3DVLM applies, to the ``(C, D, H, W)`` tensor::

    RandRotate90(prob=0.5, spatial_axes=(1, 2))      # the (H, W) plane, k in {1, 2, 3}
    RandFlip(prob=0.1, spatial_axis=0|1|2)            # each spatial axis independently
    RandScaleIntensity(factors=0.1, prob=0.5)         # x * (1 + U(-0.1, 0.1))
    RandShiftIntensity(offsets=0.1, prob=0.5)         # x + U(-0.1, 0.1)

Here rotation and flips are numpy views of the stored (possibly memory-mapped) array, and the
conversion to float32 applies the dequantisation, scale and shift in one multiply and one in-place
add into a single output buffer. Intensities are not clipped, as in MONAI.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_UINT8_SCALE = 1.0 / 255.0


@dataclass(frozen=True)
class Augmentation:
    """Probabilities and magnitudes of the four random transforms (defaults: the original's)."""

    rotate90_prob: float = 0.5
    flip_prob: float = 0.1
    scale_prob: float = 0.5
    scale: float = 0.1
    shift_prob: float = 0.5
    shift: float = 0.1

    def __post_init__(self) -> None:
        for name in ("rotate90_prob", "flip_prob", "scale_prob", "shift_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"augmentation {name} must be in [0, 1], got {value}")
        if self.scale < 0 or self.shift < 0:
            raise ValueError(f"augmentation scale/shift must be >= 0, got {self.scale}/{self.shift}")

    def geometric(self, volume: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Random rot90 in (H, W) and flips of a ``(D, H, W)`` array, as a view (no copy).

        A 90/270 degree turn swaps H and W; on a non-square plane only k=2 is drawn so the
        output keeps the configured shape (the original only sees square 256x256 planes).
        """
        if rng.random() < self.rotate90_prob:
            square = volume.shape[1] == volume.shape[2]
            k = int(rng.integers(1, 4)) if square else 2
            volume = np.rot90(volume, k, axes=(1, 2))
        for axis in range(3):
            if rng.random() < self.flip_prob:
                volume = np.flip(volume, axis)
        return volume

    def intensity(self, rng: np.random.Generator) -> tuple[float, float]:
        """Random ``(factor, offset)``: the output is ``x * factor + offset``."""
        factor = 1.0 + rng.uniform(-self.scale, self.scale) if rng.random() < self.scale_prob else 1.0
        offset = rng.uniform(-self.shift, self.shift) if rng.random() < self.shift_prob else 0.0
        return float(factor), float(offset)

    def __call__(self, stored: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augmented float32 ``(D, H, W)`` copy of a stored volume (uint8 or float)."""
        view = self.geometric(stored, rng)
        factor, offset = self.intensity(rng)
        return affine_to_float(view, factor, offset)


def affine_to_float(stored: np.ndarray, factor: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """``to_float(stored) * factor + offset`` as a new contiguous float32 array (any input strides)."""
    out = np.empty(stored.shape, dtype=np.float32)
    scale = factor * _UINT8_SCALE if stored.dtype == np.uint8 else factor
    np.multiply(stored, np.float32(scale), out=out, casting="unsafe")
    if offset != 0.0:
        np.add(out, np.float32(offset), out=out)
    return out


def to_image_tensor(volume: np.ndarray) -> torch.Tensor:
    """``(1, D, H, W)`` float32 tensor; shares memory with ``volume`` when it is already a
    writable contiguous float32 array (what :func:`affine_to_float` returns)."""
    if volume.dtype != np.float32 or not volume.flags.c_contiguous or not volume.flags.writeable:
        volume = np.array(volume, dtype=np.float32, order="C")
    return torch.from_numpy(volume).unsqueeze(0)
