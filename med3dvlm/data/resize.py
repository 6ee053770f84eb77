"""Anti-aliased 3-D resize equal to ``skimage.transform.resize(vol, size, anti_aliasing=True)``.

What scikit-image 0.25 computes for a float volume with every other argument at its default:

1. a Gaussian blur (``scipy.ndimage.gaussian_filter``) with, per axis, ``sigma = max(0, (n_in / n_out
   - 1) / 2)``: kernel radius ``int(4 * sigma + 0.5)``, weights normalised to sum 1, axes with
   ``sigma == 0`` (upsampled or unchanged) left alone;
2. linear interpolation (``scipy.ndimage.zoom``, ``order=1`` so no spline prefilter, ``grid_mode=True``):
   output sample ``j`` reads input coordinate ``(j + 0.5) * n_in / n_out - 0.5``;
3. for both steps its boundary mode ``'reflect'`` (numpy.pad's name) is ndimage's ``'mirror'``,
   ``d c b | a b c d | c b a`` (edge sample not repeated), on an axis of length 1 a constant;
4. clipping to the input's ``[min, max]`` (``clip=True``).

Steps 1 and 2 are separable and linear, so along each axis they are one ``(n_out, n_in)`` matrix, the
rows of the (mirror-folded) blur matrix interpolated at the output coordinates, and the resize is the
three axis matrices applied in turn. They are banded (a handful of input samples per output), so
along axes 1 and 2 each is cut into row blocks of 16 outputs, each block a small dense matmul over just
the input span it touches (512 -> 256: 36 columns per block for 6 nonzero weights per row, not 512).

The volume is streamed in slabs of slices along axis 0: a slab is cast to float32 in a cache-sized
buffer, shrunk along axis 1 then axis 2, and added into the output slices it feeds (axis 0 as a
rank-``slab`` update). The input is thus read once, and nothing volume-sized but the output is
allocated. Arithmetic is float32: about 1e-7 from scikit-image's float64 result.

Integer input is resized by value, not rescaled to [0, 1] as scikit-image's ``img_as_float`` does
(that is ``preserve_range=True``); float input is used as is by both.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["resize_antialiased"]

_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default, which scikit-image keeps
_BLOCK_ROWS = 16  # outputs per banded block: fewer waste less on zeros, more make bigger, faster matmuls
_SLAB_BYTES = 2 << 20  # float32 bytes of input per slab: small enough to stay in cache

# One banded block of an axis matrix: (first output row, first input column, end input column, weights).
_Block = tuple[int, int, int, torch.Tensor]


def _mirror(index: np.ndarray, n: int) -> np.ndarray:
    """Fold indices or coordinates into ``[0, n - 1]`` by mirror reflection (ndimage ``'mirror'``)."""
    if n == 1:
        return np.zeros_like(index)
    period = 2 * n - 2
    index = np.mod(index, period)
    return np.where(index > n - 1, period - index, index)


def _axis_matrix(n_in: int, n_out: int) -> np.ndarray:
    """The ``(n_out, n_in)`` float64 matrix of blur-then-interpolate along one axis."""
    scale = n_in / n_out
    sigma = max(0.0, (scale - 1.0) / 2.0)
    if sigma > 0.0:
        radius = int(_TRUNCATE * sigma + 0.5)
        taps = np.arange(-radius, radius + 1)
        weights = np.exp(-0.5 / (sigma * sigma) * taps**2)
        weights /= weights.sum()
        rows = np.arange(n_in)
        blur = np.zeros((n_in, n_in))
        # One tap at a time: within a tap each row gets one column, so the fancy += drops nothing,
        # while taps folding onto the same sample (near a border, on a short axis) accumulate.
        for tap, weight in zip(taps, weights, strict=True):
            blur[rows, _mirror(rows + tap, n_in)] += weight
    else:
        blur = np.eye(n_in)

    coord = _mirror((np.arange(n_out) + 0.5) * scale - 0.5, n_in)
    left = np.minimum(np.floor(coord).astype(np.int64), n_in - 1)
    frac = (coord - left)[:, None]
    return (1.0 - frac) * blur[left] + frac * blur[_mirror(left + 1, n_in)]


@functools.lru_cache(maxsize=64)
def _axis_matrix_f32(n_in: int, n_out: int) -> np.ndarray:
    """Read-only float32 ``_axis_matrix``, cached: a dataset repeats a few shapes many times."""
    matrix = _axis_matrix(n_in, n_out).astype(np.float32)
    matrix.flags.writeable = False
    return matrix


@functools.lru_cache(maxsize=64)
def _banded_blocks(n_in: int, n_out: int) -> tuple[_Block, ...]:
    """Row blocks of the axis matrix, each restricted to the input columns it uses."""
    matrix = _axis_matrix_f32(n_in, n_out)
    blocks = []
    for row in range(0, n_out, _BLOCK_ROWS):
        rows = matrix[row : row + _BLOCK_ROWS]
        used = np.flatnonzero(rows.any(axis=0))
        first, end = int(used[0]), int(used[-1]) + 1
        blocks.append((row, first, end, torch.from_numpy(rows[:, first:end].copy())))
    return tuple(blocks)


def _contract_leading(x: torch.Tensor, blocks: tuple[_Block, ...], out: torch.Tensor) -> torch.Tensor:
    """``out (m, L) = A @ x (n, L)``, each block writing its rows of ``out`` in place."""
    for row, first, end, weights in blocks:
        torch.mm(weights, x[first:end], out=out[row : row + weights.shape[0]])
    return out


def _contract_last(x: torch.Tensor, blocks: tuple[_Block, ...], out: torch.Tensor) -> torch.Tensor:
    """``out (R, m) = x (R, n) @ A.T``."""
    return torch.cat([x[:, first:end] @ weights.T for _, first, end, weights in blocks], dim=1, out=out)


def resize_antialiased(volume: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize a 3-D volume as ``skimage.transform.resize(volume, size, anti_aliasing=True)`` does.

    Args:
        volume: 3-D array of any integer or floating dtype, all finite.
        size: the output shape, three positive ints.

    Returns:
        A C-contiguous float32 array of shape ``size``, clipped to the input's value range. The
        matmuls use torch's intra-op threads (``torch.set_num_threads``).
    """
    volume = np.asarray(volume)
    if volume.ndim != 3 or len(size) != 3:
        raise ValueError(f"expected a 3-D volume and a 3-D size, got shape {volume.shape} and size {size}")
    if not (np.issubdtype(volume.dtype, np.integer) or np.issubdtype(volume.dtype, np.floating)):
        raise TypeError(f"expected an integer or floating volume, got dtype {volume.dtype}")
    out_shape = tuple(int(s) for s in size)
    if min(out_shape) < 1 or min(volume.shape) < 1:
        raise ValueError(f"sizes must be positive, got {volume.shape} -> {out_shape}")

    n0, n1, n2 = volume.shape
    m0, m1, m2 = out_shape
    matrix0 = _axis_matrix_f32(n0, m0)
    blocks1 = _banded_blocks(n1, m1) if n1 != m1 else None
    blocks2 = _banded_blocks(n2, m2) if n2 != m2 else None

    slab = max(1, _SLAB_BYTES // (4 * n1 * n2))
    slab_buf = torch.empty((slab, n1, n2), dtype=torch.float32)
    rows_buf = torch.empty((slab, m1, n2), dtype=torch.float32)
    plane_buf = torch.empty((slab * m1, m2), dtype=torch.float32)
    out = torch.zeros((m0, m1 * m2), dtype=torch.float32)
    low, high = math.inf, -math.inf
    for start in range(0, n0, slab):
        count = min(slab, n0 - start)
        chunk = slab_buf[:count]
        np.copyto(chunk.numpy(), volume[start : start + count], casting="unsafe")
        chunk_low, chunk_high = (v.item() for v in torch.aminmax(chunk))
        # Checked here because the dense blocks would smear a NaN or inf far beyond its Gaussian support.
        if not (math.isfinite(chunk_low) and math.isfinite(chunk_high)):
            raise ValueError("volume contains NaN or infinite values (after the cast to float32)")
        low, high = min(low, chunk_low), max(high, chunk_high)

        if blocks1 is not None:
            for index in range(count):
                _contract_leading(chunk[index], blocks1, rows_buf[index])
            chunk = rows_buf[:count]
        # Axis 2 after axis 1: column blocks are the slower kind, so they get the slab axis 1 shrank.
        if blocks2 is not None:
            chunk = _contract_last(chunk.view(count * m1, n2), blocks2, plane_buf[: count * m1])

        weights = matrix0[:, start : start + count]
        fed = np.flatnonzero(weights.any(axis=1))
        first, end = int(fed[0]), int(fed[-1]) + 1
        out[first:end].addmm_(torch.from_numpy(weights[first:end].copy()), chunk.reshape(count, m1 * m2))
    return out.view(out_shape).clamp_(low, high).numpy()
