"""Lake et al. one-shot runs: facts of the real all_runs.zip, layout, conventions, errors."""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from episodes.integrity import ChecksumError
from episodes.lake import LakeRuns, load_lake_runs
from episodes.omniglot import decode_glyph, omniglot_alphabets
from episodes.sampler import Episode
from metafilm import evaluation
from metafilm.assemble import build_learner
from metafilm.checkpoint import load_checkpoint
from metafilm.cli import main
from metafilm.config import config_from_dict
from metafilm.evaluation import evaluate_lake
from metafilm.meta import evaluate
from metafilm.train import train


@pytest.fixture(scope="module")
def runs(data_root) -> LakeRuns:
    return load_lake_runs(data_root)


def _runs_zip(data_root: Path) -> Path:
    return data_root / "omniglot" / "lake_runs" / "all_runs.zip"


def test_shapes(runs):
    assert runs.support_images.shape == (20, 20, 1, 28, 28)
    assert runs.query_images.shape == (20, 20, 1, 28, 28)
    assert runs.support_images.dtype == runs.query_images.dtype == torch.uint8
    assert runs.query_labels.numel() == 400
    assert torch.equal(runs.support_labels, torch.arange(20).expand(20, 20))


def test_labels_follow_class_labels_files(runs, data_root):
    with zipfile.ZipFile(_runs_zip(data_root)) as archive:
        for run in range(20):
            text = archive.read(f"run{run + 1:02d}/class_labels.txt").decode()
            pairs = [line.split() for line in text.splitlines() if line]
            assert [item for item, _ in pairs] == [
                f"run{run + 1:02d}/test/item{k:02d}.png" for k in range(1, 21)
            ]
            truth = [int(klass[-6:-4]) - 1 for _, klass in pairs]  # ".../classJJ.png" -> JJ-1
            assert runs.query_labels[run].tolist() == truth
    assert runs.query_labels.min() == 0 and runs.query_labels.max() == 19
    sorted_labels = runs.query_labels.sort(dim=1).values
    assert torch.equal(sorted_labels, torch.arange(20).expand(20, 20))  # one item per class


def test_images_follow_omniglot_conventions(runs, data_root):
    with zipfile.ZipFile(_runs_zip(data_root)) as archive:
        support = decode_glyph(archive.read("run07/training/class03.png"), 28)
        query = decode_glyph(archive.read("run07/test/item11.png"), 28)
    assert torch.equal(runs.support_images[6, 2, 0], torch.from_numpy(support))
    assert torch.equal(runs.query_images[6, 10, 0], torch.from_numpy(query))
    grey = (runs.query_images > 0) & (runs.query_images < 255)
    assert grey.any(dim=(2, 3, 4)).all(), "every image has antialiased grey levels"
    assert (runs.support_images == 0).float().mean() > 0.7  # ink 255 on a 0 background
    assert runs.support_images.float().mean() < 40


def test_runs_and_drawings_differ(runs):
    flat = runs.support_images.flatten(1)
    assert len({tuple(row.tolist()) for row in flat}) == 20
    for run in range(20):
        for item in range(20):
            label = runs.query_labels[run, item]
            assert not torch.equal(runs.query_images[run, item], runs.support_images[run, label])


def test_episode_layout(runs):
    episode = runs.episode()
    assert (
        episode.support_x.shape == (20, 20, 1, 28, 28) and episode.support_x.dtype == torch.float32
    )
    assert episode.tasks == 20 and episode.ways == 20 and episode.shots == 1 and episode.query == 1
    assert torch.equal(episode.query_y, torch.arange(20).expand(20, 20))
    assert episode.query_x.min() >= 0.0 and episode.query_x.max() <= 1.0
    run, item = 3, 5
    label = int(runs.query_labels[run, item])
    assert torch.equal(episode.query_x[run, label], runs.query_images[run, item].float() / 255)
    assert torch.equal(episode.support_x[run, label], runs.support_images[run, label].float() / 255)


def test_image_size(data_root):
    assert load_lake_runs(data_root, image_size=14).query_images.shape == (20, 20, 1, 14, 14)
    with pytest.raises(ValueError, match="image_size"):
        load_lake_runs(data_root, image_size=-3)


def test_missing_zip_says_where(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_lake_runs(tmp_path)
    assert str(tmp_path / "omniglot" / "lake_runs" / "all_runs.zip") in str(error.value)
    assert "brendenlake/omniglot" in str(error.value)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_zip_is_a_clear_error(data_root, tmp_path, damage):
    data = bytearray(_runs_zip(data_root).read_bytes())
    if damage == "flip":
        data[1000] ^= 0x01
    else:
        data = data[:-500]
    path = tmp_path / "omniglot" / "lake_runs" / "all_runs.zip"
    path.parent.mkdir(parents=True)
    path.write_bytes(bytes(data))
    with pytest.raises(
        ChecksumError, match="437c1eeab0af8484" if damage == "flip" else "truncated"
    ):
        load_lake_runs(tmp_path)


@pytest.fixture(scope="module")
def trained_run(data_root: Path, omniglot_cache_dir: Path, tmp_path_factory) -> Path:
    """A small model trained a few steps on the background alphabets (the paper's protocol),
    each task within one alphabet."""
    alphabets = omniglot_alphabets(data_root, "background")
    config = config_from_dict(
        {
            "data": {
                "root": str(data_root),
                "cache_dir": str(omniglot_cache_dir),
                "train_split": "background",
                "train_alphabets": list(alphabets[:-5]),
                "val_split": "background",
                "val_alphabets": list(alphabets[-5:]),
                "ways": 5,
                "query": 2,
                "within_alphabet": True,
            },
            "model": {"width": 8},
            "outer": {"meta_batch_size": 2},
            "train": {"steps": 4, "val_every": 4, "val_episodes": 3, "checkpoint_every": 4},
        }
    )
    run = tmp_path_factory.mktemp("lake") / "run"
    train(config, run)
    return run


@pytest.mark.data
def test_lake_evaluation_scores_each_run_by_its_own_labels(runs, trained_run: Path) -> None:
    path = evaluate_lake(trained_run / "last.pt", inner_steps=2)
    assert path.name == "last_lake-runs_inner2_bnepisode.json"
    record = json.loads(path.read_text())
    assert (record["split"], record["ways"], record["shots"], record["episodes"]) == (
        "lake-runs",
        20,
        1,
        20,
    )
    assert (record["train_split"], record["val_split"], record["inner_steps_test"]) == (
        "background",
        "background",
        2,
    )
    assert len(record["train_alphabets"]) == 25 and len(record["val_alphabets"]) == 5
    assert record["versions"]["torch"] == torch.__version__ and record["precision"] == "float64"
    assert not set(record["train_alphabets"]) & set(record["val_alphabets"])
    assert record["errors_per_run"] == [round((1 - a) * 20) for a in record["accuracies"]]
    assert record["error_rate"] == pytest.approx(sum(record["errors_per_run"]) / 400)

    # Independently: each run as its own task, query items in file order with the labels of
    # class_labels.txt, through the same checkpoint in float64.
    payload = load_checkpoint(trained_run / "last.pt")
    config = config_from_dict(payload["config"])
    learner = build_learner(config)
    learner.load_state_dict(payload["model"])
    learner.double()
    adapt = replace(config.adapt, inner_steps=2)
    for run in (0, 7, 19):
        task = Episode(
            support_x=runs.support_images[run : run + 1].double() / 255,
            support_y=runs.support_labels[run : run + 1],
            query_x=runs.query_images[run : run + 1].double() / 255,
            query_y=runs.query_labels[run : run + 1],
            ways=20,
        )
        (accuracy,) = evaluate(learner, [task], adapt)
        assert accuracy == pytest.approx(record["accuracies"][run], abs=1e-12)


@pytest.mark.data
def test_lake_evaluation_from_the_command_line(trained_run: Path, data_root: Path) -> None:
    assert main(["evaluate", str(trained_run), "--lake", "--data-root", str(data_root)]) == 0
    assert (trained_run / "eval" / "best_lake-runs_inner1_bnepisode.json").is_file()
    assert main(["evaluate", str(trained_run), "--lake", "--ways", "5"]) == 1
    record = json.loads((trained_run / "eval" / "best_lake-runs_inner1_bnepisode.json").read_text())
    assert main(["report", str(trained_run)]) == 0
    report = (trained_run / "report" / "report.md").read_text()
    assert "## Lake et al. one-shot challenge" in report
    assert (
        f"| {100 * record['error_rate']:.2f} | {' '.join(map(str, record['errors_per_run']))}"
        in report
    )
    assert "| background (25 alphabets) / background (5 alphabets) |" in report
    assert "2 query per class, each task within one alphabet" in report


@pytest.mark.data
def test_held_out_alphabets_are_evaluated_within_alphabet(trained_run: Path) -> None:
    """The Lake-style validation protocol: 20-way 1-shot episodes on the held-out background
    alphabets, each episode within one of them; its file and report row say so."""
    val_alphabets = config_from_dict(load_checkpoint(trained_run / "best.pt")["config"])
    val_alphabets = list(val_alphabets.data.val_alphabets)
    common = ["evaluate", str(trained_run), "--split", "background", "--ways", "20"]
    common += ["--episodes", "4", "--alphabets", *val_alphabets]
    assert main([*common, "--within-alphabet"]) == 0
    assert main(common) == 0
    files = sorted(p.name for p in (trained_run / "eval").glob("best_background-5alphabets-*"))
    assert len(files) == 2 and files[0].replace("-within", "") == files[1]
    within = json.loads((trained_run / "eval" / files[0]).read_text())
    assert (within["alphabets"], within["within_alphabet"]) == (val_alphabets, True)
    assert main(["report", str(trained_run)]) == 0
    report = (trained_run / "report" / "report.md").read_text()
    assert "| background (5 alphabets), within alphabet |" in report
    assert "| background (5 alphabets) |" in report
    assert main([*common[:-6], "--alphabets", "Klingon"]) == 1


@pytest.mark.data
def test_a_run_not_trained_on_the_background_alphabets_alone_is_warned_about(
    trained_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same checkpoint, its config read as if it had trained on the Vinyals train split: the
    Lake evaluation still runs, and says that its error rate is not comparable."""
    run = shutil.copytree(trained_run, tmp_path / "run")  # the records written stay here
    real_load = evaluation._load

    def load_as_vinyals(*args: object) -> object:
        loaded = real_load(*args)
        data = replace(loaded.config.data, train_split="train", val_split="val")
        return replace(loaded, config=replace(loaded.config, data=data))

    assert evaluate_lake(run / "best.pt") is not None
    assert "challenge's protocol" not in caplog.text
    monkeypatch.setattr(evaluation, "_load", load_as_vinyals)
    evaluate_lake(run / "best.pt")
    assert (
        "warning: this run learned from the split(s) 'train', 'val', not the background alphabets "
        'alone as the challenge\'s protocol asks (data.train_split = "background"): its error '
        "rate is not comparable with the published ones"
    ) in caplog.text
