"""Train-time augmentation: views, MONAI semantics, probabilities and magnitudes, fused conversion."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from med3dvlm.data.transforms import Augmentation, affine_to_float, to_image_tensor
from med3dvlm.data.volume_io import to_float

SQUARE = (4, 6, 6)


def stored(shape=SQUARE, dtype=np.uint8) -> np.ndarray:
    values = np.arange(np.prod(shape)).reshape(shape) % 251
    return values.astype(dtype)


def matching_rotation(original: np.ndarray, result: np.ndarray) -> int | None:
    for k in range(4):
        if np.array_equal(np.rot90(original, k, axes=(1, 2)), result):
            return k
    return None


def test_geometric_is_a_view_and_rotates_in_the_hw_plane():
    volume = stored()
    aug = Augmentation(rotate90_prob=1.0, flip_prob=0.0)
    rng = np.random.default_rng(0)
    ks = Counter()
    for _ in range(300):
        out = aug.geometric(volume, rng)
        assert np.shares_memory(out, volume)
        k = matching_rotation(volume, out)
        assert k is not None and k != 0
        ks[k] += 1
    assert set(ks) == {1, 2, 3}
    assert all(70 < count < 130 for count in ks.values()), ks


def test_rotation_and_flip_probabilities():
    volume = np.arange(np.prod(SQUARE)).reshape(SQUARE)  # unique values: the corner reveals flips
    rng = np.random.default_rng(1)
    n = 4000
    rotate = Augmentation(rotate90_prob=0.5, flip_prob=0.0)
    rotated = sum(not np.array_equal(rotate.geometric(volume, rng), volume) for _ in range(n))
    assert abs(rotated / n - 0.5) < 0.03
    flip = Augmentation(rotate90_prob=0.0, flip_prob=0.1)
    flips = np.zeros(3)
    for _ in range(n):
        corner = np.unravel_index(int(flip.geometric(volume, rng)[0, 0, 0]), SQUARE)
        flips += [index != 0 for index in corner]
    np.testing.assert_allclose(flips / n, 0.1, atol=0.02)


def test_flip_only_flips_the_chosen_axes():
    volume = stored()
    aug = Augmentation(rotate90_prob=0.0, flip_prob=1.0)
    out = aug.geometric(volume, np.random.default_rng(0))
    np.testing.assert_array_equal(out, volume[::-1, ::-1, ::-1])


def test_non_square_plane_keeps_its_shape():
    volume = stored((4, 6, 8))
    aug = Augmentation(rotate90_prob=1.0, flip_prob=0.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        out = aug.geometric(volume, rng)
        assert out.shape == volume.shape
        np.testing.assert_array_equal(out, np.rot90(volume, 2, axes=(1, 2)))


def test_intensity_factor_and_offset_statistics():
    aug = Augmentation(scale_prob=0.5, scale=0.1, shift_prob=0.5, shift=0.1)
    rng = np.random.default_rng(2)
    draws = np.array([aug.intensity(rng) for _ in range(4000)])
    factors, offsets = draws[:, 0], draws[:, 1]
    scaled = factors != 1.0
    shifted = offsets != 0.0
    assert abs(scaled.mean() - 0.5) < 0.03 and abs(shifted.mean() - 0.5) < 0.03
    assert factors.min() >= 0.9 and factors.max() <= 1.1
    assert offsets.min() >= -0.1 and offsets.max() <= 0.1
    # Uniform on (-0.1, 0.1): mean ~0, std 0.1/sqrt(3).
    assert abs((factors[scaled] - 1).mean()) < 0.01
    assert abs((factors[scaled] - 1).std() - 0.1 / np.sqrt(3)) < 0.005
    assert abs(offsets[shifted].std() - 0.1 / np.sqrt(3)) < 0.005


@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32])
def test_affine_to_float_matches_reference_on_strided_views(dtype):
    raw = stored(dtype=np.uint8)
    data = raw if dtype == np.uint8 else (raw / 255.0).astype(dtype)
    view = np.flip(np.rot90(data, 1, axes=(1, 2)), 0)
    out = affine_to_float(view, 1.07, -0.03)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out, to_float(np.ascontiguousarray(view)) * 1.07 - 0.03, rtol=1e-6, atol=1e-6)


def test_augmentation_off_is_identity_and_output_is_not_clipped():
    data = stored()
    identity = Augmentation(rotate90_prob=0, flip_prob=0, scale_prob=0, shift_prob=0)
    np.testing.assert_array_equal(identity(data, np.random.default_rng(0)), to_float(data))
    bright = np.full(SQUARE, 255, dtype=np.uint8)
    out = Augmentation(rotate90_prob=0, flip_prob=0, scale_prob=1, shift_prob=1)(
        bright, np.random.default_rng(3)
    )
    assert not np.allclose(out, 1.0)  # MONAI does not clip after scale/shift


def test_same_seed_same_augmentation():
    data = stored()
    aug = Augmentation()
    a = [aug(data, rng) for rng in [np.random.default_rng(5)] for _ in range(5)]
    b = [aug(data, rng) for rng in [np.random.default_rng(5)] for _ in range(5)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_to_image_tensor_shape_and_dtype():
    tensor = to_image_tensor(affine_to_float(stored(), 1.0, 0.0))
    assert tensor.shape == (1, *SQUARE) and str(tensor.dtype) == "torch.float32"


def test_invalid_probability_rejected():
    with pytest.raises(ValueError, match="flip_prob"):
        Augmentation(flip_prob=1.5)
