"""Photo augmentation: pixels checked against numpy and hand computations, draws, bad input."""

import itertools

import numpy as np
import pytest
import torch

from episodes.photo import (
    PHOTO_PARAMS,
    PhotoAugmentation,
    apply_photo,
    draw_photo,
    photo_batch_params,
)

ALL = PhotoAugmentation(crop_padding=3, flip=True, jitter=0.4)


def images(n: int = 4, channels: int = 3, height: int = 7, width: int = 9) -> torch.Tensor:
    """Random pixels; not square, so that swapped rows and columns show."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, channels, height, width, generator=g)


def params(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


IDENTITY_ALL = [3, 3, 0, 1, 1, 1]


# ---- pixels ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity_params_give_back_the_input_bit_exactly(dtype):
    x = images().to(dtype)
    before = x.clone()
    out = apply_photo(x, params([IDENTITY_ALL] * 4), ALL)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, x)
    assert torch.equal(x, before)  # the input is left alone
    off = PhotoAugmentation()
    assert not off.active
    assert torch.equal(apply_photo(x, params([[0, 0, 0, 1, 1, 1]] * 4), off), x)


def test_a_flip_mirrors_left_to_right_and_only_the_flipped_images():
    x = images()
    out = apply_photo(
        x, params([[0, 0, f, 1, 1, 1] for f in (1, 0, 1, 0)]), PhotoAugmentation(flip=True)
    )
    assert torch.equal(out[[0, 2]], torch.flip(x[[0, 2]], dims=[3]))
    assert torch.equal(out[[1, 3]], x[[1, 3]])


@pytest.mark.parametrize("channels", [1, 3])
def test_a_crop_is_a_slice_of_the_reflect_padded_image(channels):
    p, height, width = 3, 7, 9
    offsets = list(itertools.product([0, 1, 3, 6], [0, 2, 5, 6]))  # includes both extremes
    x = images(len(offsets), channels, height, width)
    rows = [[dy, dx, 0, 1, 1, 1] for dy, dx in offsets]
    out = apply_photo(x, params(rows), PhotoAugmentation(crop_padding=p))
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (p, p), (p, p)), mode="reflect")
    for i, (dy, dx) in enumerate(offsets):
        np.testing.assert_array_equal(
            out[i].numpy(), padded[i, :, dy : dy + height, dx : dx + width]
        )
    # with a flip the crop is mirrored afterwards
    flipped = apply_photo(x, params([r[:2] + [1, 1, 1, 1] for r in rows]), ALL)
    for i, (dy, dx) in enumerate(offsets):
        crop = padded[i, :, dy : dy + height, dx : dx + width]
        np.testing.assert_array_equal(flipped[i].numpy(), crop[:, :, ::-1])


def test_brightness_contrast_and_saturation_by_hand():
    jitter = PhotoAugmentation(jitter=1.0)
    # brightness scales and clips: 1.5 * [0.2, 0.6; 0.9, 0.5]
    gray = torch.tensor([[[[0.2, 0.6], [0.9, 0.5]]]])
    out = apply_photo(gray, params([[0, 0, 0, 1.5, 1, 1]]), jitter)
    torch.testing.assert_close(out, torch.tensor([[[[0.3, 0.9], [1.0, 0.75]]]]))
    # contrast blends with the mean 0.3: 0.5 x + 0.15, and 2 x - 0.3 clipped at 0
    ramp = torch.tensor([[[[0.0, 0.2], [0.4, 0.6]]]])
    out = apply_photo(
        ramp.expand(2, -1, -1, -1), params([[0, 0, 0, 1, 0.5, 1], [0, 0, 0, 1, 2, 1]]), jitter
    )
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.15, 0.25], [0.35, 0.45]]))
    torch.testing.assert_close(out[1, 0], torch.tensor([[0.0, 0.1], [0.5, 0.9]]))
    # saturation of one channel is the identity
    out = apply_photo(ramp, params([[0, 0, 0, 1, 1, 0.0]]), jitter)
    assert torch.equal(out, ramp)
    # RGB: a red and a blue pixel; grayscale 0.299 and 0.114, mean grayscale 0.2065
    rgb = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]).view(1, 3, 1, 2)
    out = apply_photo(rgb, params([[0, 0, 0, 1, 0.0, 1]]), jitter)  # no contrast left
    torch.testing.assert_close(out, torch.full((1, 3, 1, 2), 0.2065))
    out = apply_photo(rgb, params([[0, 0, 0, 1, 1, 0.5]]), jitter)  # half saturation
    expected = [[0.5 + 0.1495, 0.057], [0.1495, 0.057], [0.1495, 0.5 + 0.057]]
    torch.testing.assert_close(out, torch.tensor(expected).view(1, 3, 1, 2))


def numpy_jitter(x: np.ndarray, b: float, c: float, s: float) -> np.ndarray:
    """torchvision's ColorJitter formulas for one RGB image [3, H, W], in this fixed order."""
    x = x.astype(np.float64)

    def luma(y):
        return 0.299 * y[0] + 0.587 * y[1] + 0.114 * y[2]

    x = np.clip(b * x, 0, 1)
    x = np.clip(c * x + (1 - c) * luma(x).mean(), 0, 1)
    return np.clip(s * x + (1 - s) * luma(x)[None], 0, 1)


def test_jitter_of_random_images_follows_the_formulas():
    x = images(6, 3, 5, 6)
    factors = [
        (1.4, 0.6, 1.3),
        (0.6, 1.4, 0.7),
        (1.0, 1.0, 1.4),
        (1.2, 0.8, 0.6),
        (1, 1, 1),
        (0.9, 1.3, 1.1),
    ]
    rows = [[0, 0, 0, *f] for f in factors]
    out = apply_photo(x, params(rows), PhotoAugmentation(jitter=0.4))
    assert out.min() >= 0 and out.max() <= 1
    assert (out == 1).any()  # the clipping was exercised
    for i, (b, c, s) in enumerate(factors):
        np.testing.assert_allclose(out[i].numpy(), numpy_jitter(x[i].numpy(), b, c, s), atol=1e-6)


def test_everything_at_once_crops_flips_then_jitters():
    p, x = 3, images(2, 3, 7, 9)
    rows = [[1, 5, 1, 1.3, 0.7, 1.2], [6, 0, 0, 0.8, 1.2, 0.9]]
    out = apply_photo(x, params(rows), ALL)
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (p, p), (p, p)), mode="reflect")
    for i, (dy, dx, flip, b, c, s) in enumerate(rows):
        moved = padded[i, :, dy : dy + 7, dx : dx + 9]
        moved = moved[:, :, ::-1] if flip else moved
        np.testing.assert_allclose(out[i].numpy(), numpy_jitter(moved, b, c, s), atol=1e-6)


# ---- draws -------------------------------------------------------------------------------------


def test_draws_are_within_their_ranges_and_flips_are_fair():
    augmentation = PhotoAugmentation(crop_padding=4, flip=True, jitter=0.3)
    drawn = draw_photo(np.random.default_rng(0), 20_000, augmentation)
    assert drawn.shape == (20_000, PHOTO_PARAMS) and drawn.dtype == np.float32
    offsets, flips, factors = drawn[:, :2], drawn[:, 2], drawn[:, 3:]
    assert np.array_equal(offsets, offsets.round())
    assert set(np.unique(offsets).tolist()) == set(range(9))
    assert set(np.unique(flips).tolist()) == {0.0, 1.0}
    assert 0.48 < flips.mean() < 0.52
    assert factors.min() >= 0.7 - 1e-6 and factors.max() <= 1.3 + 1e-6
    assert factors.min() < 0.701 and factors.max() > 1.299
    np.testing.assert_allclose(factors.mean(0), 1.0, atol=0.01)
    # the three factors are drawn independently of each other
    assert abs(np.corrcoef(factors.T)[0, 1]) < 0.05


@pytest.mark.parametrize(
    ("crop", "flip", "jitter"), list(itertools.product([0, 2], [False, True], [0.0, 0.25]))
)
def test_components_that_are_off_draw_nothing_and_hold_the_identity(crop, flip, jitter):
    count = 50
    drawn = draw_photo(
        rng := np.random.default_rng(7), count, PhotoAugmentation(crop, flip, jitter)
    )
    # the documented draws, made here for the active components only
    fresh = np.random.default_rng(7)
    expected = np.tile(np.array([crop, crop, 0, 1, 1, 1], dtype=np.float32), (count, 1))
    if crop:
        expected[:, :2] = fresh.integers(0, 2 * crop + 1, (2, count)).T
    if flip:
        expected[:, 2] = fresh.integers(0, 2, count)
    if jitter:
        expected[:, 3:] = fresh.uniform(1 - jitter, 1 + jitter, (3, count)).T
    np.testing.assert_array_equal(drawn, expected)
    assert rng.random() == fresh.random()  # both generators stand at the same place


def test_no_component_leaves_the_generator_untouched():
    rng = np.random.default_rng(3)
    drawn = draw_photo(rng, 10, PhotoAugmentation(crop_padding=0, flip=False, jitter=0.0))
    np.testing.assert_array_equal(drawn, np.tile([0, 0, 0, 1, 1, 1], (10, 1)))
    assert rng.random() == np.random.default_rng(3).random()


def test_batch_params_are_a_function_of_the_key():
    a = photo_batch_params([1, 2, 3], 64, ALL)
    assert a.dtype == torch.float32 and a.shape == (64, PHOTO_PARAMS)
    assert torch.equal(a, photo_batch_params([1, 2, 3], 64, ALL))
    assert not torch.equal(a, photo_batch_params([1, 2, 4], 64, ALL))
    fresh = np.random.default_rng([1, 2, 3])
    np.testing.assert_array_equal(a[:, :2].numpy(), fresh.integers(0, 7, (2, 64)).T)
    np.testing.assert_array_equal(a[:, 2].numpy(), fresh.integers(0, 2, 64))
    np.testing.assert_array_equal(a[:, 3:].numpy(), fresh.uniform(0.6, 1.4, (3, 64)).T.astype("f4"))
    assert apply_photo(images(64), a, ALL).shape == (64, 3, 7, 9)


def test_active():
    assert not PhotoAugmentation().active
    assert PhotoAugmentation(crop_padding=1).active
    assert PhotoAugmentation(flip=True).active
    assert PhotoAugmentation(jitter=0.1).active


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(crop_padding=-1), ValueError, "crop_padding must be >= 0"),
        (dict(crop_padding=1.5), TypeError, "crop_padding must be an int"),
        (dict(flip=1), TypeError, "flip must be a bool"),
        (dict(jitter=1.5), ValueError, r"jitter must be in \[0, 1\]"),
        (dict(jitter=-0.1), ValueError, r"jitter must be in \[0, 1\]"),
    ],
)
def test_bad_settings_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        PhotoAugmentation(**kwargs)


def test_bad_params_are_refused():
    x = images(2)
    with pytest.raises(ValueError, match=r"photo params must be \[2, 6\] for 2 images"):
        apply_photo(x, params([IDENTITY_ALL]), ALL)
    with pytest.raises(ValueError, match=r"crop offsets must be integers in 0..6"):
        apply_photo(x, params([IDENTITY_ALL, [7, 3, 0, 1, 1, 1]]), ALL)
    with pytest.raises(ValueError, match=r"flips must be 0 \(flip is off\)"):
        apply_photo(x, params([[0, 0, 1, 1, 1, 1]] * 2), PhotoAugmentation(jitter=0.2))
    with pytest.raises(ValueError, match=r"jitter factors must be in \[0.8, 1.2\]"):
        apply_photo(x, params([[0, 0, 0, 1.5, 1, 1]] * 2), PhotoAugmentation(jitter=0.2))
    with pytest.raises(ValueError, match="smaller than the image sides"):
        apply_photo(x, params([[7, 7, 0, 1, 1, 1]] * 2), PhotoAugmentation(crop_padding=7))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        apply_photo(images(2, channels=2), params([IDENTITY_ALL] * 2), ALL)


def test_cached_prefix_features_refuse_photo_augmented_episodes():
    from episodes.sampler import IndexEpisode
    from metafilm.meta import _gather_features

    zeros = torch.zeros(1, 2, dtype=torch.int64)
    ep = IndexEpisode(zeros, zeros, zeros, zeros, zeros, zeros)
    _gather_features(torch.zeros(1, 4), ep)  # fine without augmentation
    photo = torch.tensor(IDENTITY_ALL, dtype=torch.float32).expand(1, 2, 2, 6)
    augmented = IndexEpisode(zeros, zeros, zeros, zeros, zeros, zeros, None, photo, ALL)
    with pytest.raises(ValueError, match="photo augmentation change images"):
        _gather_features(torch.zeros(1, 4), augmented)
