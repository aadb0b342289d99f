"""Affine distortions: the maps drawn, and the resampling checked against exact pixel moves."""

import numpy as np
import pytest
import torch

from episodes.distort import KOCH_RANGES, AffineRanges, apply_affines, draw_affines

NONE = AffineRanges(rotation_deg=0.0, shear=0.0, scale=(1.0, 1.0), translate=0.0)


def images(n: int = 3, side: int = 8) -> torch.Tensor:
    return torch.rand(n, 1, side, side, generator=torch.Generator().manual_seed(0))


def test_zero_ranges_draw_the_identity_and_resampling_through_it_changes_nothing():
    affines = torch.from_numpy(draw_affines(np.random.default_rng(0), 3, NONE))
    assert torch.equal(affines, torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(3, 2, 3))
    x = images()
    torch.testing.assert_close(apply_affines(x, affines), x, atol=1e-6, rtol=0)


def test_a_quarter_turn_and_a_one_pixel_shift_move_pixels_exactly():
    x = images(side=8)
    quarter = torch.tensor([[[0.0, -1, 0], [1, 0, 0]]]).expand(3, 2, 3)
    turned = apply_affines(x, quarter)
    matches = [k for k in (1, 3) if torch.allclose(turned, torch.rot90(x, k, (2, 3)), atol=1e-5)]
    assert matches, "a 90-degree map must equal a quarter turn of the pixel grid"
    one_pixel = 2 / 8  # the image spans [-1, 1]: one of 8 pixels is 2/8
    shift = torch.tensor([[[1.0, 0, one_pixel], [0, 1, 0]]]).expand(3, 2, 3)
    moved = apply_affines(x, shift)
    # output column c samples input column c + 1; the last column repeats the border
    torch.testing.assert_close(moved[..., :-1], x[..., 1:], atol=1e-6, rtol=0)
    torch.testing.assert_close(moved[..., -1], x[..., -1], atol=1e-6, rtol=0)


def test_drawn_maps_stay_within_the_ranges_and_are_reproducible():
    rng = np.random.default_rng(3)
    affines = draw_affines(rng, 20_000)
    assert affines.shape == (20_000, 2, 3) and affines.dtype == np.float32
    np.testing.assert_array_equal(affines, draw_affines(np.random.default_rng(3), 20_000))
    linear, shift = affines[:, :, :2].astype(np.float64), affines[:, :, 2]
    # det(R H S) = sx sy (1 - hx hy): within the product of the scale and shear bounds
    det = np.linalg.det(linear)
    low, high = KOCH_RANGES.scale
    shear = KOCH_RANGES.shear
    assert det.min() >= low**2 * (1 - shear**2) - 1e-6 and det.max() <= high**2 * (1 + shear**2)
    bound = 2 * KOCH_RANGES.translate
    assert np.abs(shift).max() <= bound and np.abs(shift).max() > 0.95 * bound
    # the distortions are centred: the mean map is close to the identity
    np.testing.assert_allclose(linear.mean(0), np.eye(2), atol=0.02)
    np.testing.assert_allclose(shift.mean(0), 0, atol=0.002)


def test_rotation_alone_is_a_rotation_within_its_range():
    ranges = AffineRanges(rotation_deg=10.0, shear=0.0, scale=(1.0, 1.0), translate=0.0)
    linear = draw_affines(np.random.default_rng(1), 5000, ranges)[:, :, :2].astype(np.float64)
    np.testing.assert_allclose(
        linear @ linear.transpose(0, 2, 1), np.eye(2)[None].repeat(5000, 0), atol=1e-6
    )
    angles = np.rad2deg(np.arctan2(linear[:, 1, 0], linear[:, 0, 0]))
    assert angles.min() >= -10 and angles.max() <= 10 and angles.max() - angles.min() > 19


def test_affines_must_match_the_images():
    with pytest.raises(
        ValueError, match=r"affines must be \[3, 2, 3\] for 3 images, got \(2, 2, 3\)"
    ):
        apply_affines(images(), torch.zeros(2, 2, 3))
