"""Episodic sampling: determinism, episode facts, gather pixels, rotations, input errors."""

import hashlib
from dataclasses import replace

import pytest
import torch

from episodes.classes import ClassImages
from episodes.distort import apply_affines
from episodes.photo import PHOTO_PARAMS, PhotoAugmentation, apply_photo
from episodes.sampler import EpisodeSampler, FixedEpisodes, IndexEpisode, gather

SIDE = 5


def synthetic(sizes: list[int], side: int = SIDE, width: int | None = None) -> ClassImages:
    """Images whose channels say what they are: channel 0 = class id, channel 1 = position inside
    the class (both constant over the image, so rotation leaves them alone), channel 2 = 255 at
    the top-left pixel only, a marker that shows how the image was turned."""
    width = side if width is None else width
    per_class = []
    for c, n in enumerate(sizes):
        x = torch.zeros(n, 3, side, width, dtype=torch.uint8)
        x[:, 0] = c
        x[:, 1] = torch.arange(n, dtype=torch.uint8)[:, None, None]
        x[:, 2, 0, 0] = 255
        per_class.append(x)
    return ClassImages.from_arrays(per_class, [f"class{c}" for c in range(len(sizes))])


EQUAL = synthetic([12] * 30)
RAGGED = synthetic([7, 15, 9, 12, 20, 8, 11, 7, 13, 10])


def assert_same(a: IndexEpisode, b: IndexEpisode) -> None:
    for name in ("support_idx", "support_y", "query_idx", "query_y", "classes", "rotations"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def row_of(ep: IndexEpisode, t: int) -> tuple[torch.Tensor, ...]:
    return (ep.support_idx[t], ep.query_idx[t], ep.classes[t], ep.rotations[t])


# ---- determinism -------------------------------------------------------------------------------


def test_same_seed_same_episodes_other_seed_other_episodes():
    a = EpisodeSampler(EQUAL, 5, 2, 3, seed=11).sample(4, 6)
    b = EpisodeSampler(EQUAL, 5, 2, 3, seed=11).sample(4, 6)
    c = EpisodeSampler(EQUAL, 5, 2, 3, seed=12).sample(4, 6)
    assert_same(a, b)
    assert not torch.equal(a.support_idx, c.support_idx)


def test_steps_differ_and_resume_needs_only_the_step():
    sampler = EpisodeSampler(EQUAL, 5, 2, 3, seed=3)
    step7 = sampler.sample(7, 4)
    for step in range(7):  # drawing other steps first changes nothing
        sampler.sample(step, 4)
    assert_same(step7, sampler.sample(7, 4))
    assert not torch.equal(step7.support_idx, sampler.sample(8, 4).support_idx)


def test_task_slices_are_the_rows_of_the_full_meta_batch():
    sampler = EpisodeSampler(RAGGED, 4, 2, 3, seed=5, augment_rotations=True)
    full = sampler.sample(9, 8)
    for task_slice in (slice(0, 4), slice(4, 8), slice(1, None, 3), slice(-2, None)):
        part = sampler.sample(9, 8, task_slice=task_slice)
        rows = range(8)[task_slice]
        assert part.tasks == len(rows)
        for t, j in enumerate(rows):
            for got, want in zip(row_of(part, t), row_of(full, j), strict=True):
                assert torch.equal(got, want)
    # task j of a step does not depend on the meta-batch size either
    small = sampler.sample(9, 3)
    for name in ("support_idx", "query_idx", "classes", "rotations"):
        assert torch.equal(getattr(small, name), getattr(full, name)[:3])


def test_fixed_episode_i_does_not_depend_on_what_was_drawn_before():
    fixed = FixedEpisodes(EQUAL, 5, 1, 4, seed=2, episodes=10)
    one_by_one = list(fixed)
    assert len(one_by_one) == len(fixed) == 10
    assert_same(fixed[7], one_by_one[7])
    assert_same(fixed[-1], one_by_one[9])
    for size in (1, 3, 4, 10):
        batches = list(fixed.batches(size))
        assert [b.tasks for b in batches] == [min(size, 10 - s) for s in range(0, 10, size)]
        rows = [row_of(b, t) for b in batches for t in range(b.tasks)]
        for i, row in enumerate(rows):
            for got, want in zip(row, row_of(one_by_one[i], 0), strict=True):
                assert torch.equal(got, want)
    assert_same(fixed.take([7, 2]), fixed.take([7, 2]))
    assert torch.equal(fixed.take([7, 2]).classes[0], fixed[7].classes[0])


def test_fixed_episodes_same_seed_same_set_and_distinct_from_training():
    a = FixedEpisodes(EQUAL, 5, 1, 4, seed=2, episodes=6).take(range(6))
    b = FixedEpisodes(EQUAL, 5, 1, 4, seed=2, episodes=6).take(range(6))
    assert_same(a, b)
    train = EpisodeSampler(EQUAL, 5, 1, 4, seed=2).sample(0, 6)
    assert not torch.equal(a.classes, train.classes)


# ---- facts about every episode -----------------------------------------------------------------


@pytest.mark.parametrize("classes", [EQUAL, RAGGED], ids=["equal", "ragged"])
def test_episode_facts(classes):
    ways, shots, query = 5, 3, 4
    ep = EpisodeSampler(classes, ways, shots, query, seed=0).sample(0, 64)
    assert ep.support_idx.shape == ep.support_y.shape == (64, ways * shots)
    assert ep.query_idx.shape == ep.query_y.shape == (64, ways * query)
    assert ep.classes.shape == ep.rotations.shape == (64, ways)
    assert (ep.ways, ep.shots, ep.query) == (ways, shots, query)
    class_of = classes.class_of()
    for t in range(ep.tasks):
        assert len(set(ep.classes[t].tolist())) == ways
        support, query_rows = ep.support_idx[t].tolist(), ep.query_idx[t].tolist()
        assert len(set(support + query_rows)) == ways * (shots + query)  # no image used twice
        assert torch.equal(ep.support_y[t].bincount(), torch.full((ways,), shots))
        assert torch.equal(ep.query_y[t].bincount(), torch.full((ways,), query))
        # every example belongs to the class of its label
        assert torch.equal(class_of[ep.support_idx[t]], ep.classes[t][ep.support_y[t]])
        assert torch.equal(class_of[ep.query_idx[t]], ep.classes[t][ep.query_y[t]])
    # class-major layout
    assert torch.equal(ep.support_y[0], torch.arange(ways).repeat_interleave(shots))
    assert torch.equal(ep.query_y[0], torch.arange(ways).repeat_interleave(query))


def test_labels_are_shuffled_relative_to_class_ids():
    ways = 5
    ep = EpisodeSampler(EQUAL, ways, 1, 1, seed=1).sample(0, 1000)
    # the label carrying the smallest class id is uniform over 0..ways-1 (expected 200 each)
    counts = ep.classes.argmin(dim=1).bincount(minlength=ways)
    assert counts.min() > 150 and counts.max() < 250
    assert (ep.classes.diff(dim=1) > 0).all(dim=1).float().mean() < 0.05  # rarely sorted


def test_classes_and_images_are_drawn_uniformly():
    ep = EpisodeSampler(RAGGED, 3, 2, 2, seed=4).sample(0, 3000)
    # each of the 10 classes takes part in 3/10 of the tasks: 900 expected
    presence = ep.classes.flatten().bincount(minlength=RAGGED.num_classes)
    assert presence.min() > 800 and presence.max() < 1000
    # the largest class (20 images) gives every one of its images to support about equally often
    largest = int(RAGGED.class_sizes.argmax())
    start = int(RAGGED.offsets[largest])
    taken = ep.support_idx[(ep.support_idx >= start) & (ep.support_idx < start + 20)] - start
    counts = taken.bincount(minlength=20).float()
    assert counts.min() > 0.7 * counts.mean() and counts.max() < 1.3 * counts.mean()


# ---- gather ------------------------------------------------------------------------------------


def test_gather_gives_the_pixels_of_the_indexed_images():
    ep = EpisodeSampler(EQUAL, 4, 2, 3, seed=8).sample(1, 6)
    batch = gather(EQUAL, ep)
    assert batch.support_x.shape == (6, 4 * 2, 3, SIDE, SIDE)
    assert batch.query_x.shape == (6, 4 * 3, 3, SIDE, SIDE)
    assert batch.support_x.dtype == batch.query_x.dtype == torch.float32
    assert batch.support_x.is_contiguous() and batch.query_x.is_contiguous()
    assert (batch.ways, batch.shots, batch.query, batch.tasks) == (4, 2, 3, 6)
    assert torch.equal(batch.support_y, ep.support_y) and torch.equal(batch.query_y, ep.query_y)
    for x, idx, y in (
        (batch.support_x, ep.support_idx, ep.support_y),
        (batch.query_x, ep.query_idx, ep.query_y),
    ):
        assert torch.equal(x, EQUAL.images[idx].float() / 255)
        # channel 0 says the class, channel 1 the position inside it
        class_ids = (x[:, :, 0, 0, 0] * 255).round().long()
        assert torch.equal(class_ids, torch.gather(ep.classes, 1, y))
        positions = (x[:, :, 1, 0, 0] * 255).round().long()
        assert torch.equal(positions, idx - EQUAL.offsets[class_ids])
    assert batch.support_x.max() == 1.0 and batch.support_x.min() == 0.0


def test_task_and_to():
    batch = gather(EQUAL, EpisodeSampler(EQUAL, 3, 1, 2, seed=0).sample(0, 4))
    task = batch.task(2)
    assert task.support_x.shape == (3, 3, SIDE, SIDE) and task.query_y.shape == (6,)
    assert (task.ways, task.shots, task.query) == (3, 1, 2)
    assert torch.equal(task.query_x, batch.query_x[2])
    moved = batch.to("cpu")
    assert torch.equal(moved.support_x, batch.support_x) and moved.ways == 3


MARKER_AT = {0: (0, 0), 1: (SIDE - 1, 0), 2: (SIDE - 1, SIDE - 1), 3: (0, SIDE - 1)}


def marker_turns(x: torch.Tensor) -> torch.Tensor:
    """Counter-clockwise quarter turns of each image, read from where its marker ended up."""
    turns = torch.full(x.shape[:2], -1)
    for k, (r, c) in MARKER_AT.items():
        turns[x[:, :, 2, r, c] == 1.0] = k
    return turns


def test_rotation_augmentation_turns_every_image_of_a_class_alike():
    plain = EpisodeSampler(EQUAL, 5, 2, 3, seed=6)
    turned = EpisodeSampler(EQUAL, 5, 2, 3, seed=6, augment_rotations=True)
    ep_plain, ep = plain.sample(2, 40), turned.sample(2, 40)
    assert not ep_plain.rotations.any()  # off by default
    assert torch.equal(marker_turns(gather(EQUAL, ep_plain).support_x), torch.zeros(40, 10).long())
    # the same classes and images with the flag on; only the turns are added
    for name in ("support_idx", "query_idx", "classes"):
        assert torch.equal(getattr(ep, name), getattr(ep_plain, name))
    assert set(ep.rotations.unique().tolist()) == {0, 1, 2, 3}
    batch = gather(EQUAL, ep)
    assert torch.equal(marker_turns(batch.support_x), torch.gather(ep.rotations, 1, ep.support_y))
    assert torch.equal(marker_turns(batch.query_x), torch.gather(ep.rotations, 1, ep.query_y))
    # turning keeps the constant class channel
    assert torch.equal(
        (batch.support_x[:, :, 0] * 255).round().long().amax(dim=(2, 3)),
        torch.gather(ep.classes, 1, ep.support_y),
    )


def test_affine_augmentation_distorts_each_training_image_by_its_own_map():
    classes = synthetic([12] * 30, side=8)
    plain = EpisodeSampler(classes, 5, 2, 3, seed=6, augment_rotations=True)
    distorted = EpisodeSampler(
        classes, 5, 2, 3, seed=6, augment_rotations=True, augment_affine=True
    )
    ep_plain, ep = plain.sample(2, 4), distorted.sample(2, 4)
    assert ep_plain.affines is None  # off by default
    # the same classes, images and turns with the flag on; only the maps are added
    assert_same(ep, ep_plain)
    assert ep.affines.shape == (4, 5, 2 + 3, 2, 3)
    assert len(ep.affines.reshape(-1, 6).unique(dim=0)) == 4 * 5 * 5
    batch, turned = gather(classes, ep), gather(classes, ep_plain)
    # support image j*shots + k of a task takes map [j, k], query image j*query + k map [j, shots+k]
    for t in range(4):
        for j in range(5):
            for k in range(2):
                expected = apply_affines(turned.support_x[t, [j * 2 + k]], ep.affines[t, j, [k]])
                assert torch.equal(batch.support_x[t, [j * 2 + k]], expected)
            for k in range(3):
                expected = apply_affines(turned.query_x[t, [j * 3 + k]], ep.affines[t, j, [2 + k]])
                assert torch.equal(batch.query_x[t, [j * 3 + k]], expected)
    # a constant channel stays constant: the class id survives the distortion
    torch.testing.assert_close(
        batch.support_x[:, :, 0].amax(dim=(2, 3)), turned.support_x[:, :, 0].amax(dim=(2, 3))
    )
    assert not torch.equal(batch.support_x[:, :, 2], turned.support_x[:, :, 2])
    # evaluation episodes are never distorted
    assert FixedEpisodes(classes, 5, 2, 3, seed=0, episodes=3).take([0, 1]).affines is None


PHOTO = PhotoAugmentation(crop_padding=2, flip=True, jitter=0.3)


def test_photo_augmentation_leaves_every_other_draw_as_it_was():
    classes = synthetic([12] * 30, side=8)
    settings = dict(seed=6, augment_rotations=True, augment_affine=True)
    plain = EpisodeSampler(classes, 5, 2, 3, **settings).sample(2, 4)
    ep = EpisodeSampler(classes, 5, 2, 3, **settings, photo=PHOTO).sample(2, 4)
    assert plain.photo is None and plain.photo_augmentation is None  # off by default
    assert_same(ep, plain)
    assert torch.equal(ep.affines, plain.affines)
    assert ep.photo.shape == (4, 5, 2 + 3, PHOTO_PARAMS) and ep.photo.dtype == torch.float32
    assert ep.photo_augmentation == PHOTO
    assert len(ep.photo.reshape(-1, PHOTO_PARAMS).unique(dim=0)) == 4 * 5 * 5
    # an inactive augmentation is no augmentation
    inactive = EpisodeSampler(classes, 5, 2, 3, **settings, photo=PhotoAugmentation()).sample(2, 4)
    assert inactive.photo is None and inactive.photo_augmentation is None
    assert_same(inactive, plain)


def test_photo_params_are_a_function_of_the_task_key():
    classes = synthetic([12] * 30, side=8)
    sampler = EpisodeSampler(classes, 4, 2, 3, seed=5, augment_rotations=True, photo=PHOTO)
    full = sampler.sample(9, 8)
    assert torch.equal(full.photo, sampler.sample(9, 8).photo)
    again = EpisodeSampler(classes, 4, 2, 3, seed=5, augment_rotations=True, photo=PHOTO)
    assert torch.equal(full.photo, again.sample(9, 8).photo)
    assert not torch.equal(full.photo, sampler.sample(10, 8).photo)
    for task_slice in (slice(0, 4), slice(4, 8), slice(1, None, 3), slice(-2, None)):
        part = sampler.sample(9, 8, task_slice=task_slice)
        assert torch.equal(part.photo, full.photo[task_slice])
    assert torch.equal(sampler.sample(9, 3).photo, full.photo[:3])
    # evaluation episodes are never augmented
    fixed = FixedEpisodes(classes, 4, 2, 3, seed=5, episodes=3)
    assert fixed.take([0, 1]).photo is None and fixed[2].photo_augmentation is None


def test_gather_applies_each_slot_its_own_photo_params():
    classes = synthetic([12] * 30, side=8)
    settings = dict(seed=6, augment_rotations=True, augment_affine=True)
    ep = EpisodeSampler(classes, 5, 2, 3, **settings, photo=PHOTO).sample(2, 4)
    batch, turned = gather(classes, ep), gather(classes, replace(ep, photo=None))
    assert not torch.equal(batch.support_x, turned.support_x)
    # support image j*shots + k takes slot [j, k], query image j*query + k slot [j, shots + k]
    t, j, shots, query = 2, 3, 2, 3
    for x, plain, row, slot in (
        (batch.support_x, turned.support_x, j * shots + 1, 1),
        (batch.query_x, turned.query_x, j * query + 2, shots + 2),
    ):
        expected = apply_photo(plain[t, [row]], ep.photo[t, j, [slot]], PHOTO)
        torch.testing.assert_close(x[t, [row]], expected, atol=1e-6, rtol=0)
        other = apply_photo(plain[t, [row]], ep.photo[t, j, [slot - 1]], PHOTO)
        assert not torch.allclose(x[t, [row]], other, atol=1e-3)
    assert batch.support_x.min() >= 0 and batch.support_x.max() <= 1
    with pytest.raises(ValueError, match="needs its photo_augmentation"):
        gather(classes, replace(ep, photo_augmentation=None))


def test_photo_augmentation_needs_images_it_can_crop():
    with pytest.raises(ValueError, match="crop_padding=5 must be smaller than the image sides"):
        EpisodeSampler(EQUAL, 5, 1, 1, seed=0, photo=PhotoAugmentation(crop_padding=5))
    with pytest.raises(TypeError, match="photo must be a PhotoAugmentation"):
        EpisodeSampler(EQUAL, 5, 1, 1, seed=0, photo=True)


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(ways=31), ValueError, "exceeds the 30 classes"),
        (dict(ways=1), ValueError, "at least 2"),
        (dict(ways=0), ValueError, "ways must be positive"),
        (dict(shots=0), ValueError, "shots must be positive"),
        (dict(query=-1), ValueError, "query must be positive"),
        (dict(shots=8, query=5), ValueError, "exceeds the 12 images of the smallest class"),
        (dict(shots=2.0), TypeError, "shots must be an int"),
        (dict(seed=-1), ValueError, "seed must be in"),
        (dict(seed=2**32), ValueError, "seed must be in"),
    ],
)
def test_bad_episode_shapes_are_refused(kwargs, error, message):
    args = dict(ways=5, shots=1, query=1, seed=0) | kwargs
    with pytest.raises(error, match=message):
        EpisodeSampler(EQUAL, **args)
    if "seed" not in kwargs:
        with pytest.raises(error, match=message):
            FixedEpisodes(EQUAL, **args, episodes=3)


def test_smallest_class_is_named_and_rotations_need_square_images():
    with pytest.raises(ValueError, match=r"7 images of the smallest class \('class0'\)"):
        FixedEpisodes(RAGGED, 3, 4, 4, seed=0, episodes=1)
    wide = synthetic([6] * 4, width=SIDE + 1)
    EpisodeSampler(wide, 3, 1, 1, seed=0)  # fine without rotations
    with pytest.raises(ValueError, match="square images, got 5x6"):
        EpisodeSampler(wide, 3, 1, 1, seed=0, augment_rotations=True)


def test_bad_sample_and_index_arguments_are_refused():
    sampler = EpisodeSampler(EQUAL, 5, 1, 1, seed=0)
    with pytest.raises(ValueError, match="step must be in"):
        sampler.sample(-1, 4)
    with pytest.raises(ValueError, match="meta_batch_size must be positive"):
        sampler.sample(0, 0)
    with pytest.raises(ValueError, match="selects no task"):
        sampler.sample(0, 4, task_slice=slice(4, 8))
    with pytest.raises(TypeError, match="task_slice must be a slice"):
        sampler.sample(0, 4, task_slice=[0, 1])
    fixed = FixedEpisodes(EQUAL, 5, 1, 1, seed=0, episodes=3)
    with pytest.raises(IndexError, match="episode 3 out of range for 3"):
        fixed[3]
    with pytest.raises(IndexError, match="out of range"):
        fixed.take([0, 5])
    with pytest.raises(ValueError, match="episodes must be positive"):
        FixedEpisodes(EQUAL, 5, 1, 1, seed=0, episodes=0)
    with pytest.raises(ValueError, match="size must be positive"):
        next(fixed.batches(0))


# ---- within-alphabet tasks ---------------------------------------------------------------------


def with_alphabets(sizes: dict[str, int]) -> ClassImages:
    """Synthetic classes named `Alphabet/characterNN`, `sizes[alphabet]` characters each."""
    names = [f"{alphabet}/character{i:02d}" for alphabet, n in sizes.items() for i in range(n)]
    images = synthetic([6] * len(names))
    return ClassImages(images.images, images.offsets, tuple(names))


def test_within_alphabet_tasks_keep_to_one_alphabet_large_enough_for_the_ways():
    classes = with_alphabets({"Alpha": 8, "Beta": 3, "Gamma": 5, "Delta": 6})
    alphabet_of = [name.split("/")[0] for name in classes.names]
    sampler = EpisodeSampler(classes, 5, 1, 2, seed=0, within_alphabet=True)
    fixed = FixedEpisodes(classes, 5, 1, 2, seed=0, episodes=300, within_alphabet=True)
    for ep in (sampler.sample(0, 300), next(fixed.batches(300))):
        per_task = [{alphabet_of[c] for c in task.tolist()} for task in ep.classes]
        assert all(len(alphabets) == 1 for alphabets in per_task)
        drawn = [alphabets.pop() for alphabets in per_task]
        # Beta has too few characters for 5-way tasks; the other three are drawn alike
        assert set(drawn) == {"Alpha", "Gamma", "Delta"}
        assert all(80 <= drawn.count(alphabet) <= 120 for alphabet in ("Alpha", "Gamma", "Delta"))
        # classes of a task are distinct and their images belong to them
        assert all(len(set(task.tolist())) == 5 for task in ep.classes)
        class_of = classes.class_of()
        assert torch.equal(class_of[ep.query_idx], torch.gather(ep.classes, 1, ep.query_y))
    # without the option the same split mixes alphabets
    mixed = EpisodeSampler(classes, 5, 1, 2, seed=0).sample(0, 50)
    assert any(len({alphabet_of[c] for c in task.tolist()}) > 1 for task in mixed.classes)


def test_within_alphabet_needs_alphabet_names_and_a_large_enough_alphabet():
    with pytest.raises(ValueError, match=r"no alphabet of this split has ways=9 .*largest has 8"):
        EpisodeSampler(
            with_alphabets({"Alpha": 8, "Beta": 3}), 9, 1, 1, seed=0, within_alphabet=True
        )
    with pytest.raises(ValueError, match="needs class names 'Alphabet/characterNN'.*'class0'"):
        FixedEpisodes(EQUAL, 5, 1, 1, seed=0, episodes=1, within_alphabet=True)


# ---- real Omniglot -----------------------------------------------------------------------------


@pytest.fixture
def omniglot_trainval(omniglot_split) -> ClassImages:
    return omniglot_split("trainval")


@pytest.mark.data
def test_omniglot_20_way_5_shot_meta_batch(omniglot_trainval):
    classes = omniglot_trainval
    sampler = EpisodeSampler(classes, 20, 5, 15, seed=0, augment_rotations=True)
    ep = sampler.sample(0, 32)
    batch = gather(classes, ep)
    assert batch.support_x.shape == (32, 100, 1, 28, 28)
    assert batch.query_x.shape == (32, 300, 1, 28, 28)
    class_of = classes.class_of()
    assert torch.equal(class_of[ep.support_idx], torch.gather(ep.classes, 1, ep.support_y))
    assert torch.equal(class_of[ep.query_idx], torch.gather(ep.classes, 1, ep.query_y))
    rows = torch.cat([ep.support_idx, ep.query_idx], dim=1)
    assert all(len(set(r.tolist())) == 400 for r in rows)
    # ink (towards 1.0) on a 0.0 background covers a small part of each character
    assert batch.support_x.min() == 0.0 and batch.support_x.max() == 1.0
    assert 0.02 < batch.support_x.mean() < 0.4
    # a turn by k quarter turns is exactly torch.rot90 of the stored image
    t, e = 3, 17
    k = int(ep.rotations[t, ep.support_y[t, e]])
    stored = classes.images[ep.support_idx[t, e]].float() / 255
    assert torch.equal(batch.support_x[t, e], torch.rot90(stored, k, dims=(1, 2)))


@pytest.mark.data
def test_omniglot_within_alphabet_episodes_span_the_alphabets(omniglot_trainval):
    classes = omniglot_trainval
    alphabet_of = [name.split("/")[0] for name in classes.names]
    episodes = FixedEpisodes(classes, 20, 1, 1, seed=1, episodes=400, within_alphabet=True)
    drawn = [
        {alphabet_of[c] for c in task.tolist()} for task in next(episodes.batches(400)).classes
    ]
    assert all(len(alphabets) == 1 for alphabets in drawn)
    # rotations count as classes of their alphabet, so each of the 38 trainval alphabets has 20
    assert len(set().union(*drawn)) == len(set(alphabet_of)) == 38


@pytest.mark.data
def test_omniglot_evaluation_set_is_reproducible(omniglot_trainval):
    """The 600 fixed 5-way 1-shot episodes of seed 1 are pinned (first task by name, the whole
    set by digest): they are what every reported figure was measured on, and any change to the
    sampler or the split would silently change them. Drawn whole or one at a time, the same."""
    a = FixedEpisodes(omniglot_trainval, 5, 1, 15, seed=1, episodes=600)
    (everything,) = list(a.batches(600))
    names = [omniglot_trainval.names[c] for c in everything.classes[0].tolist()]
    assert names == [
        "Futurama/character07/rot000",
        "Greek/character20/rot090",
        "Atemayar_Qelisayer/character06/rot000",
        "Atlantean/character21/rot180",
        "Arcadian/character26/rot270",
    ]
    assert everything.support_idx[0].tolist() == [35215, 31621, 69201, 62682, 30066]
    assert everything.classes[599].tolist() == [3676, 1131, 3012, 3136, 2013]
    digest = hashlib.sha256()
    for part in (everything.classes, everything.support_idx, everything.query_idx):
        digest.update(part.numpy().astype("int64").tobytes())
    digest.update(everything.rotations.numpy().astype("int64").tobytes())
    assert digest.hexdigest() == (
        "0b444c8c631f611ce113b5a6fdc7f770f85673064982e5a9ab10f9c243d35dfd"
    )
    for got, want in zip(row_of(a[599], 0), row_of(everything, 599), strict=True):
        assert torch.equal(got, want)
