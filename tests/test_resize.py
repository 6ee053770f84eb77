"""resize_antialiased against skimage.transform.resize(..., anti_aliasing=True), the FLARE reference."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.transform import resize as skimage_resize

import med3dvlm.data.resize as resize_module
from med3dvlm.data.resize import resize_antialiased

# float32 arithmetic against scikit-image's float64: about 2e-7 measured, 1e-4 allowed.
ATOL = 1e-4

SHAPES = {
    "down-all": ((40, 48, 56), (16, 24, 20)),
    "flare-factors": ((75, 128, 128), (32, 64, 64)),  # 300 -> 128 and 512 -> 256, scaled down
    "non-integer": ((300, 20, 33), (128, 7, 13)),
    "up-one-axis": ((97, 30, 40), (128, 15, 20)),
    "up-only": ((12, 10, 9), (20, 21, 9)),
    "mixed-and-same": ((33, 64, 17), (50, 20, 17)),
    "in-plane-same": ((20, 16, 12), (8, 16, 12)),
    "kernel-wider-than-axis": ((3, 64, 5), (1, 4, 2)),
    "size-1-kept": ((1, 40, 40), (1, 16, 16)),
    "size-1-upsampled": ((40, 1, 40), (16, 3, 16)),
    "down-to-1": ((5, 40, 2), (1, 10, 1)),
}


def reference(volume: np.ndarray, size: tuple[int, int, int], **kwargs) -> np.ndarray:
    return skimage_resize(volume, size, anti_aliasing=True, **kwargs)


def random_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape)


def smooth_volume(shape: tuple[int, int, int]) -> np.ndarray:
    """Low-frequency content in [0, 1], like a CT after windowing."""
    z, y, x = np.meshgrid(*(np.linspace(0.0, 1.0, n) for n in shape), indexing="ij")
    return 0.5 + 0.25 * np.cos(3 * z + 2 * y) + 0.25 * np.sin(5 * x - y * z)


def assert_matches(out: np.ndarray, expected: np.ndarray, atol: float = ATOL) -> None:
    assert out.shape == expected.shape
    difference = np.abs(out.astype(np.float64) - expected)
    assert difference.max() <= atol, (difference.max(), difference.mean())


@pytest.mark.parametrize("make", [random_volume, smooth_volume], ids=["random", "smooth"])
@pytest.mark.parametrize(("shape", "size"), SHAPES.values(), ids=SHAPES.keys())
def test_matches_skimage(make, shape, size):
    volume = make(shape)
    out = resize_antialiased(volume, size)
    assert out.dtype == np.float32 and out.shape == size and out.flags.c_contiguous
    assert_matches(out, reference(volume, size))


@pytest.mark.parametrize("slab_slices", [1, 3, 7])
def test_slab_boundaries_do_not_matter(monkeypatch, slab_slices):
    # The default slab holds a small test volume whole; force several slabs and a partial last one.
    shape, size = (40, 24, 20), (17, 9, 8)
    monkeypatch.setattr(resize_module, "_SLAB_BYTES", 4 * shape[1] * shape[2] * slab_slices)
    volume = random_volume(shape, seed=1)
    assert_matches(resize_antialiased(volume, size), reference(volume, size))


def test_float32_and_hounsfield_range_inputs():
    volume = random_volume((30, 40, 50), seed=2)
    size = (13, 17, 19)
    single = volume.astype(np.float32)
    assert_matches(resize_antialiased(single, size), reference(single, size))
    hounsfield = volume * 3000.0 - 1000.0
    # Floats are resized by value by both; float32 rounding scales with the magnitude.
    assert_matches(resize_antialiased(hounsfield, size), reference(hounsfield, size), atol=3000 * ATOL)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8])
def test_integers_are_resized_by_value(dtype):
    volume = (random_volume((20, 30, 30), seed=3) * 200).astype(dtype)
    size = (9, 11, 12)
    expected = reference(volume, size, preserve_range=True)
    assert_matches(resize_antialiased(volume, size), expected, atol=200 * ATOL)


def test_constant_volume_stays_constant():
    volume = np.full((30, 40, 50), 0.37)
    out = resize_antialiased(volume, (12, 17, 64))
    # The clip to [min, max] = [c, c] removes float32 rounding entirely.
    assert np.all(out == np.float32(0.37))
    assert_matches(out, reference(volume, (12, 17, 64)))


def test_output_stays_within_the_input_range():
    volume = random_volume((20, 30, 40), seed=4) * 0.5 + 0.25
    out = resize_antialiased(volume, (7, 11, 80))
    assert out.min() >= np.float32(volume.min()) and out.max() <= np.float32(volume.max())


def test_non_contiguous_input():
    volume = random_volume((40, 30, 20), seed=5)
    view = volume.transpose(2, 1, 0)[:, ::-1]
    assert_matches(resize_antialiased(view, (9, 13, 17)), reference(view, (9, 13, 17)))


@pytest.mark.parametrize(
    ("volume", "size", "error"),
    [
        (np.zeros((4, 4)), (2, 2, 2), ValueError),
        (np.zeros((4, 4, 4)), (2, 2), ValueError),
        (np.zeros((4, 4, 4)), (2, 0, 2), ValueError),
        (np.zeros((4, 0, 4)), (2, 2, 2), ValueError),
        (np.zeros((4, 4, 4), dtype=bool), (2, 2, 2), TypeError),
        (np.zeros((4, 4, 4), dtype=np.complex64), (2, 2, 2), TypeError),
    ],
)
def test_rejects_bad_arguments(volume, size, error):
    with pytest.raises(error):
        resize_antialiased(volume, size)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_rejects_non_finite_values(bad):
    volume = np.zeros((6, 8, 8))
    volume[5, 3, 2] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        resize_antialiased(volume, (3, 4, 4))
