"""A user's own images, end to end: class folders in, predictions, task models and ONNX out.

Folders are built from the real data: Omniglot characters written as PNG files of several sizes
(nested alphabet/character class names), and miniImageNet JPEGs re-saved at other sizes.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from episodes.folder import list_folder, load_folder, load_image, split_classes
from metafilm.cli import main
from metafilm.errors import TaskModelError
from metafilm.learner import FiLMLearner
from metafilm.specs import AdaptSpec, ModelSpec
from metafilm.task_model import TaskModel, adapt_task


def _example_folders():
    """scripts/example_folders.py, the README example's own folder builder."""
    path = Path(__file__).resolve().parent.parent / "scripts" / "example_folders.py"
    spec = importlib.util.spec_from_file_location("example_folders", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def omniglot_folders(data_root, omniglot_cache_dir, tmp_path_factory) -> dict[str, Path]:
    """The README example's folders: 40 training characters (with a notes file and a hidden
    file to skip), and a support and a query folder of 5 evaluation characters (1 to 3 support
    images per class, 5 query images each)."""
    out = tmp_path_factory.mktemp("own-images")
    return _example_folders().write_example_folders(out, data_root, omniglot_cache_dir)


CONFIG = """
[data]
dataset = "folder"
root = "{root}"
cache_dir = "{cache}"
channels = 1
image_size = 28
split_fractions = [0.75, 0.25, 0.0]
ways = 5
shots = 1
query = 5
[model]
width = 32
film_sites = "all"
bn_mode = "running"
encoder = "linear"
head = "prototype"
[adapt]
inner_steps = 1
inner_lr = 0.1
[outer]
lr = 0.002
meta_batch_size = 4
[train]
steps = 200
log_every = 50
val_every = 200
val_episodes = 50
checkpoint_every = 100
[eval]
split = "val"
episodes = 50
"""


@pytest.fixture(scope="module")
def trained_run(omniglot_folders, tmp_path_factory) -> Path:
    """A small model trained from a config that names the training folder."""
    root = tmp_path_factory.mktemp("own-run")
    config = root / "folder.toml"
    config.write_text(
        CONFIG.format(root=omniglot_folders["train"], cache=root / "cache"), encoding="utf-8"
    )
    out = root / "run"
    torch.set_num_threads(1)
    assert main(["train", str(config), "--out", str(out)]) == 0
    return out


def test_the_folder_lists_nested_classes_and_skips_what_is_not_an_image(omniglot_folders):
    listing = list_folder(omniglot_folders["train"])
    assert len(listing.classes) == 40 and listing.skipped == 2
    first = next(iter(listing.classes))
    assert first.count("/") == 1 and len(listing.classes[first]) == 20  # alphabet/character


def test_splits_are_disjoint_seeded_and_follow_class_lists(tmp_path):
    names = [f"class{i:02d}" for i in range(20)]
    parts = [split_classes(names, split, seed=3) for split in ("train", "val", "test")]
    assert [len(p) for p in parts] == [12, 4, 4]
    assert sorted(sum(parts, [])) == names
    assert split_classes(names, "val", seed=3) == parts[1]
    assert split_classes(names, "val", seed=4) != parts[1]
    (tmp_path / "val.txt").write_text("# held out\nclass03\n\nclass07\n")
    assert split_classes(names, "val", class_lists=tmp_path) == ["class03", "class07"]
    (tmp_path / "test.txt").write_text("class99\n")
    with pytest.raises(ValueError, match="class99"):
        split_classes(names, "test", class_lists=tmp_path)


def test_images_are_resized_by_the_shorter_side_and_centre_cropped(tmp_path):
    """A 40x20 image of a left and a right half: the crop keeps the middle 20x20, scaled to
    10x10, so the left five columns are the left colour."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (200, 10, 10)
    pixels[:, 20:] = (10, 10, 200)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    array = load_image(tmp_path / "wide.png", 10, 3)
    assert array.shape == (3, 10, 10)
    assert (array[0, :, :4] > 150).all() and (array[2, :, 6:] > 150).all()
    grey = load_image(tmp_path / "wide.png", 10, 1)
    assert grey.shape == (1, 10, 10)


def test_the_cache_notices_an_added_a_removed_and_a_changed_image(tmp_path, caplog):
    for k in range(2):
        (tmp_path / "images" / f"c{k}").mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * i + k).save(tmp_path / "images" / f"c{k}" / f"{i}.png")
    cache = tmp_path / "cache"

    def load():
        return load_folder(tmp_path / "images", image_size=8, channels=1, cache_dir=cache)

    first = load()
    assert len(list((cache / "folders").iterdir())) == 1
    assert torch.equal(load().images, first.images)  # read back from the cache
    Image.new("L", (8, 8), 255).save(tmp_path / "images" / "c0" / "3.png")
    assert len(load().images) == 7
    (tmp_path / "images" / "c1" / "0.png").unlink()
    assert len(load().images) == 6
    Image.new("L", (8, 8), 77).save(tmp_path / "images" / "c0" / "0.png")
    changed = load()
    assert int(changed.images[0, 0, 0, 0]) == 77
    assert len(list((cache / "folders").iterdir())) == 4


def test_predict_adapt_task_model_and_onnx_export_agree(
    omniglot_folders, trained_run, tmp_path, capsys
):
    """The trained model, adapted to 5 held-out characters with 1 to 3 support images each,
    labels their 25 query images far above chance (20%); the task model written by `adapt`
    gives the very same probabilities alone; its ONNX network matches them to 1e-4."""
    support, query = omniglot_folders["support"], omniglot_folders["query"]
    direct = tmp_path / "direct.json"
    assert (
        main(
            [
                "predict",
                str(trained_run),
                "--support",
                str(support),
                str(query),
                "--out",
                str(direct),
            ]
        )
        == 0
    )
    printed = capsys.readouterr()
    assert "running statistics" in printed.err and "predicted" in printed.out
    records = json.loads(direct.read_text())
    assert len(records) == 25
    correct = [Path(r["file"]).parent.name == r["predicted"] for r in records]
    assert np.mean(correct) >= 0.6, np.mean(correct)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in records)

    task_file = tmp_path / "task.safetensors"
    assert (
        main(["adapt", str(trained_run), "--support", str(support), "--out", str(task_file)]) == 0
    )
    assert task_file.stat().st_size < 64 * 1024  # kilobytes: the backbone is not in it
    from_task = tmp_path / "from-task.csv"
    assert main(["predict", "--task", str(task_file), str(query), "--out", str(from_task)]) == 0
    with from_task.open() as file:
        rows = list(csv.reader(file))
    header, rows = rows[0], rows[1:]
    for record, row in zip(records, rows, strict=True):
        assert row[0] == record["file"] and row[1] == record["predicted"]
        assert [float(p) for p in row[2:]] == [record["probabilities"][c] for c in header[2:]]

    onnxruntime = pytest.importorskip("onnxruntime")
    network = tmp_path / "task.onnx"
    assert main(["export", str(task_file), "--onnx", str(network)]) == 0
    assert not list(tmp_path.glob("*.data")) and not list(tmp_path.glob("*.tmp"))  # one file
    task = TaskModel.load(task_file)
    files = sorted(query.rglob("*.png"))
    images = torch.from_numpy(np.stack([load_image(f, 28, 1) for f in files]))
    session = onnxruntime.InferenceSession(str(network))
    logits, probabilities = session.run(None, {"images": images.float().div(255).numpy()})
    assert np.allclose(probabilities, task.predict(images).numpy(), atol=1e-4, rtol=0)
    assert np.allclose(
        logits, task.logits(images).numpy(), atol=1e-4 * np.abs(logits).max(), rtol=0
    )


def test_miniimagenet_jpegs_of_any_size_make_a_colour_support_set(miniimagenet_root, tmp_path):
    """Real photos re-saved at other sizes and modes (grey, RGBA) load as 84x84 RGB classes."""
    folder = miniimagenet_root / "miniimagenet"
    with (folder / "ravi_splits" / "test.csv").open() as file:
        rows = list(csv.DictReader(file))
    labels = sorted({row["label"] for row in rows})[:3]
    for label in labels:
        files = [row["filename"] for row in rows if row["label"] == label][:4]
        (tmp_path / label).mkdir()
        for i, name in enumerate(files):
            with Image.open(folder / "images" / name) as image:
                image = image.resize((84 + 30 * i, 84 + 11 * i))
                image = [image, image.convert("L"), image.convert("RGBA"), image][i]
                image.save(tmp_path / label / f"{i}.{'png' if i == 2 else 'jpg'}")
    classes = load_folder(tmp_path, image_size=84, channels=3, cache_dir=tmp_path / "cache")
    assert classes.names == tuple(labels)
    assert classes.images.shape == (12, 3, 84, 84)
    assert classes.images.dtype == torch.uint8


def _refused(capsys, argv: list[str], *expected: str) -> None:
    """`metafilm argv` exits 1 with one error line naming each of `expected`, no traceback
    (progress lines before it are allowed)."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("metafilm: error: ")]
    assert len(errors) == 1 and err[-1] == errors[0] and "Traceback" not in "".join(err), err
    for text in expected:
        assert text in errors[0], (text, errors[0])


def _config(tmp_path: Path, root: Path, **data: object) -> Path:
    text = CONFIG.format(root=root, cache=tmp_path / "cache")
    for key, value in data.items():
        line = f"{key} = {json.dumps(value)}"
        text, found = re.subn(rf"^{key} = .*$", line, text, count=1, flags=re.MULTILINE)
        if not found:
            text = text.replace("[data]\n", f"[data]\n{line}\n")
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_bad_folders_get_one_line_naming_the_problem(tmp_path, capsys):
    train = ["train", "--out", str(tmp_path / "run")]
    empty = tmp_path / "empty"
    (empty / "class-a").mkdir(parents=True)
    (empty / "class-a" / "readme.md").write_text("no images here")
    _refused(capsys, [train[0], str(_config(tmp_path, empty)), *train[1:]], str(empty), "no images")
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("L", (8, 8)).save(loose / "stray.png")
    _refused(
        capsys, [train[0], str(_config(tmp_path, loose)), *train[1:]], "stray.png", "subfolder"
    )
    few = tmp_path / "few"
    for k in range(3):
        (few / f"c{k}").mkdir(parents=True)
        for i in range(8 if k else 4):
            Image.new("L", (8, 8), i).save(few / f"c{k}" / f"{i}.png")
    config = _config(tmp_path, few, split_fractions=[1.0, 0.0, 0.0], ways=2, query=4)
    _refused(capsys, [train[0], str(config), *train[1:]], "'c0'", "lower shots or query")
    config = _config(tmp_path, few, split_fractions=[1.0, 0.0, 0.0], ways=4, query=2)
    _refused(capsys, [train[0], str(config), *train[1:]], "ways=4", "3 classes")


def test_bad_support_query_and_task_files_get_one_line(
    omniglot_folders, trained_run, tmp_path, capsys
):
    support = tmp_path / "support"
    for name in ("a", "b"):
        (support / name).mkdir(parents=True)
        Image.new("L", (28, 28), 9).save(support / name / "0.png")
    (support / "b" / "broken.jpg").write_bytes(b"not a jpeg at all")
    query = str(omniglot_folders["query"])
    run = str(trained_run)
    _refused(capsys, ["predict", run, "--support", str(support), query], "broken.jpg")
    (support / "b" / "broken.jpg").unlink()
    _refused(capsys, ["predict", run, "--support", str(support), str(tmp_path / "none")], "none")
    _refused(
        capsys,
        ["predict", run, "--support", str(support), query, "--out", str(tmp_path / "p.txt")],
        ".json or a .csv",
    )
    forged = tmp_path / "forged.safetensors"
    forged.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    _refused(capsys, ["predict", "--task", str(forged), query], str(forged), "metafilm adapt")
    task = tmp_path / "task.safetensors"
    assert main(["adapt", run, "--support", str(support), "--out", str(task)]) == 0
    capsys.readouterr()
    other = tmp_path / "other.pt"  # the checkpoint changed by one byte: another digest
    resolved = trained_run / ("best.pt" if (trained_run / "best.pt").is_file() else "last.pt")
    other.write_bytes(resolved.read_bytes() + b"\0")
    args = ["predict", "--task", str(task), "--checkpoint-file", str(other), query]
    _refused(capsys, args, str(other), "adapt the task again")


def test_a_model_with_per_episode_batch_norm_makes_no_task_model():
    learner = FiLMLearner(ModelSpec(width=4, image_size=16, bn_mode="episode"), AdaptSpec())
    support = {name: torch.zeros(1, 1, 16, 16, dtype=torch.uint8) for name in "ab"}
    with pytest.raises(TaskModelError, match='bn_mode = "running"'):
        adapt_task(learner, AdaptSpec(), support, checkpoint=Path("x.pt"), checkpoint_sha256="0")
