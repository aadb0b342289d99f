"""Reports from saved run files: statistics recomputed independently, protocol, valid images."""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from pathlib import Path

import pytest
from PIL import Image

from metafilm.cli import main
from metafilm.config import config_from_dict, to_toml
from metafilm.errors import ReportError
from metafilm.figures import FIGURES
from metafilm.markers import REPORT_FILES, REPORT_MARKER, SWEEP_MARKER
from metafilm.report import (
    _results,
    accuracy_plot_labels,
    evaluation_labels,
    paired_line,
    paired_rows,
    write_report,
)
from metafilm.rundir import evaluation_record, read_run, write_evaluation
from metafilm.stats import accuracy_summary

SHA = "ab" * 32


def fake_run(
    root: Path, name: str, evaluations: list[dict], steps: int = 40, val_every: int = 10
) -> Path:
    """A run directory as `metafilm train` and `metafilm evaluate` leave it (no checkpoints): the
    evaluation records are written by the evaluation's own writer, of a best.pt at step 30 tested
    with 3 inner steps on test, 15 query images per class, seed 1, unless `evaluations` say
    otherwise."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    config = config_from_dict(
        {
            "model": {"width": 16, "film_sites": ["block3", "block4"]},
            "train": {"val_every": val_every},
            "eval": {"inner_steps": 3},
        }
    )
    (run / "config.toml").write_text(to_toml(config))
    rows = []
    for step in range(5, steps + 1, 5):
        row = {"step": step, "wall_time": step * 0.1, "loss": 2.0 / step, "accuracy": 1 - 1 / step}
        for site in ("block3", "block4"):
            row[f"film_predicted/{site}"] = 0.01 * step
            row[f"film_adapted/{site}"] = 0.012 * step
        if val_every and step % val_every == 0:
            row.update(val_accuracy=0.9 - 1 / step, val_ci95=0.02)
        rows.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4')
    for index, evaluation in enumerate(evaluations):
        protocol = {key: value for key, value in evaluation.items() if key != "accuracies"}
        protocol = {"split": "test", "query": 15, "episode_seed": 1, **protocol}
        protocol["episodes"] = len(evaluation["accuracies"])
        record = evaluation_record(
            config,
            protocol,
            evaluation["accuracies"],
            film_sites=["block3", "block4"],
            checkpoint="best.pt",
            checkpoint_step=30,
            checkpoint_sha256=SHA,
        )
        write_evaluation(run / "eval" / f"e{index}.json", record)
    return run


def test_accuracy_summary_uses_the_sample_std() -> None:
    values = [0.8, 0.9, 1.0, 0.6, 0.7]
    summary = accuracy_summary(values)
    assert summary["mean"] == pytest.approx(statistics.fmean(values))
    assert summary["std"] == pytest.approx(statistics.stdev(values))
    assert summary["ci95"] == pytest.approx(1.96 * statistics.stdev(values) / math.sqrt(5))
    single = accuracy_summary([0.5])
    assert single["std"] is None and single["ci95"] is None
    with pytest.raises(ValueError):
        accuracy_summary([])


@pytest.mark.slow
def test_report_recomputes_from_the_saved_accuracies(tmp_path: Path) -> None:
    five = [0.6 + 0.02 * (i % 7) for i in range(30)]
    twenty = [0.4 + 0.01 * (i % 11) for i in range(25)]
    run = fake_run(
        tmp_path,
        "small",
        [
            {"ways": 20, "shots": 1, "accuracies": twenty},
            {"ways": 5, "shots": 1, "accuracies": five},
        ],
    )
    out = tmp_path / "report"
    written = write_report([run], out, compare_published=True)
    assert [path.name for path in written] == ["report.md", "report.json", *FIGURES]

    document = json.loads((out / "report.json").read_text())
    results = document["results"]
    assert [(r["ways"], r["shots"]) for r in results] == [(5, 1), (20, 1)]
    for result, values in zip(results, (five, twenty), strict=True):
        assert result["accuracies"] == values
        assert result["mean"] == pytest.approx(statistics.fmean(values))
        ci = 1.96 * statistics.stdev(values) / math.sqrt(len(values))
        assert result["ci95"] == pytest.approx(ci)
        assert result["std_kind"] == "sample standard deviation (ddof=1)"
    assert {row["method"] for row in document["published"]} >= {"MAML (Finn 2017)"}

    markdown = (out / "report.md").read_text()
    mean, ci = 100 * statistics.fmean(five), 196 * statistics.stdev(five) / math.sqrt(30)
    assert f"| small | 5-way 1-shot | {mean:.2f} ± {ci:.2f} | 30 | 15 | 1 | test |" in markdown
    assert "20-way 1-shot" in markdown and "5-way 1-shot (differs from test)" in markdown
    for field in (
        "transductive",
        "1 / 3",
        "conv4, width 16",
        "FiLM sites block3, block4; batch norm transductive (episode statistics)",
        f"sha256 `{SHA}`",
        "best.pt (step 30)",
        "sample standard deviation (ddof=1)",
        "98.7 ± 0.4",
        "600 test tasks, seed 1",
    ):
        assert field in markdown, field

    for name in FIGURES:
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert image.format == "PNG"
            assert image.size[0] >= 500 and image.size[1] >= 300


@pytest.mark.slow
def test_several_runs_share_one_report_even_untested_ones(tmp_path: Path) -> None:
    a = fake_run(tmp_path, "a", [{"ways": 5, "shots": 1, "accuracies": [0.5, 0.7]}])
    b = fake_run(tmp_path, "b", [{"ways": 5, "shots": 1, "accuracies": [0.6, 0.9]}], val_every=0)
    untested = fake_run(tmp_path, "untested", [])
    out = tmp_path / "all"
    write_report([a, b, untested], out)
    document = json.loads((out / "report.json").read_text())
    assert [r["run"] for r in document["results"]] == ["a", "b"]
    assert [r["name"] for r in document["runs"]] == ["a", "b", "untested"]
    markdown = (out / "report.md").read_text()
    assert "### untested" in markdown
    protocols = {run: markdown.split(f"### {run}")[1].split("###")[0] for run in ("a", "b")}
    assert "validated on 'val'" in protocols["a"]
    assert "not validated (its last checkpoint is tested)" in protocols["b"]
    assert all((out / name).stat().st_size > 1000 for name in FIGURES)
    # b minus a on the same two episodes: differences 0.1 and 0.2
    (paired,) = document["paired"]
    assert (paired["run"], paired["base"], paired["episodes"]) == ("b", "a", 2)
    assert paired["mean"] == pytest.approx(0.15)
    assert paired["ci95"] == pytest.approx(1.96 * statistics.stdev([0.1, 0.2]) / math.sqrt(2))
    assert "## Paired differences" in markdown
    assert f"| b | {paired['evaluation']} | **15.00 ± 9.80** | 2 |" in markdown
    assert (
        paired_line(paired)
        == f"b minus a, {paired['evaluation']}: 15.00 ± 9.80 points over 2 episodes"
    )
    write_report([untested], tmp_path / "none")
    assert "No evaluation yet" in (tmp_path / "none" / "report.md").read_text()


def test_unusable_run_directories_are_named(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="does not exist"):
        write_report([tmp_path / "nothing"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="not a usable run directory"):
        write_report([tmp_path / "empty"], tmp_path / "out")
    run = fake_run(tmp_path, "broken", [])
    (run / "eval" / "bad.json").write_text('{"ways": 5}')
    with pytest.raises(ReportError, match="bad.json lacks"):
        write_report([run], tmp_path / "out")


# --- issue 17: nothing overwritten, nothing stale, pairing that does not depend on the order ---


def test_pairing_with_two_seeds_is_the_same_in_either_order(tmp_path: Path) -> None:
    """Run a was tested at seeds 1 and 7919, run b at seed 1: `report a b` paired nothing."""
    a = read_run(
        fake_run(
            tmp_path,
            "a",
            [
                {"ways": 5, "shots": 1, "episode_seed": 1, "accuracies": [0.5, 0.7, 0.6]},
                {"ways": 5, "shots": 1, "episode_seed": 7919, "accuracies": [0.2, 0.3, 0.4]},
            ],
        )
    )
    b = read_run(fake_run(tmp_path, "b", [{"ways": 5, "shots": 1, "accuracies": [0.6, 0.9, 0.6]}]))
    label = "test 5-way 1-shot inner 3 seed 1"  # fake_run's evaluations test with 3 inner steps
    b_minus_a, a_minus_b = paired_rows([a, b]), paired_rows([b, a])
    assert [(row["run"], row["evaluation"]) for row in b_minus_a] == [("b", label)]
    assert [(row["run"], row["evaluation"]) for row in a_minus_b] == [("a", label)]
    assert b_minus_a[0]["mean"] == pytest.approx(0.1) == -a_minus_b[0]["mean"]
    assert b_minus_a[0]["ci95"] == pytest.approx(a_minus_b[0]["ci95"])
    assert b_minus_a[0]["ci95"] == pytest.approx(1.96 * statistics.stdev([0.1, 0.2, 0.0]) / 3**0.5)
    labels = [
        "a\n5-way 1-shot\ntest\nseed 1",
        "a\n5-way 1-shot\ntest\nseed 7919",
        "b\n5-way 1-shot\ntest\nseed 1",
    ]
    assert accuracy_plot_labels(_results([a, b])) == labels
    # One seed everywhere: labels as before, with no seed in them.
    alone = read_run(
        fake_run(tmp_path / "alone", "a", [{"ways": 5, "shots": 1, "accuracies": [1.0, 1.0, 0.8]}])
    )
    assert evaluation_labels(alone.evaluations) == ["test 5-way 1-shot inner 3"]
    assert accuracy_plot_labels(_results([alone, b])) == ["a\n5-way 1-shot\ntest"] + [
        "b\n5-way 1-shot\ntest"
    ]


def test_evaluations_of_an_earlier_checkpoint_are_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = fake_run(tmp_path, "run", [{"ways": 5, "shots": 1, "accuracies": [0.5, 0.7]}])
    assert len(read_run(run).evaluations) == 1  # no best.pt here: nothing to check against
    (run / "best.pt").write_bytes(b"a newer best.pt")  # its sha256 is not SHA
    with caplog.at_level("WARNING", logger="metafilm"):
        files = read_run(run)
    assert files.evaluations == [] and files.stale == (run / "eval" / "e0.json",)
    assert "1 evaluation file(s) of" in caplog.text and "e0.json" in caplog.text
    (run / "best.pt").write_bytes(b"the evaluated one")
    record = json.loads((run / "eval" / "e0.json").read_text())
    record["checkpoint_sha256"] = hashlib.sha256(b"the evaluated one").hexdigest()
    (run / "eval" / "e0.json").write_text(json.dumps(record))
    assert len(read_run(run).evaluations) == 1


def test_a_report_replaces_only_an_earlier_report(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "run", [{"ways": 5, "shots": 1, "accuracies": [0.5, 0.7]}])
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    with pytest.raises(ReportError) as refused:
        write_report([run], thesis)
    assert str(refused.value) == (
        f"{thesis} already holds files that metafilm report did not write (no .metafilm-report "
        f"marker); choose a new --out"
    )
    assert [path.name for path in thesis.iterdir()] == ["thesis.tex"]
    a_file = tmp_path / "file"
    a_file.write_text("keep")
    with pytest.raises(ReportError, match=r"--out .*file is a file, not a folder"):
        write_report([run], a_file)
    out = tmp_path / "report"
    write_report([run], out)
    (out / "report.md").write_text("stale")
    write_report([run], out)  # its own earlier report: replaced
    assert (out / "report.md").read_text().startswith("# metafilm report")
    assert (out / REPORT_MARKER).is_file() and a_file.read_text() == "keep"


def test_the_command_says_when_it_replaced_an_earlier_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = fake_run(tmp_path, "run", [{"ways": 5, "shots": 1, "accuracies": [0.5, 0.7]}])
    out = tmp_path / "report"
    files = "(report.json, training_curves.png, accuracy.png, film_diagnostics.png)"
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"report written to {out / 'report.md'} {files}\n"
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().out == (
        f"report written to {out / 'report.md'} {files}; it replaced the earlier report there\n"
    )


def test_the_committed_reports_can_be_rewritten_by_the_commands_that_wrote_them() -> None:
    results = Path(__file__).resolve().parents[1] / "docs" / "results"
    reports = sorted(path.parent for path in results.rglob("report.json"))
    sweeps = sorted(path.parent for path in results.rglob("sweep.json"))
    assert len(reports) == 15 and len(sweeps) == 9
    assert [path for path in reports if not (path / REPORT_MARKER).is_file()] == []
    # the FiLM study on miniImageNet keeps its sweeps' comparisons as copies beside its claims
    # (its sweeps themselves run under runs/, not kept): scripts/miniimagenet_study_report.py
    copies = [results / "miniimagenet-study" / sweep for sweep in ("frozen", "linear", "outer")]
    assert [path for path in sweeps if not (path / SWEEP_MARKER).is_file()] == copies
    assert ("report.md", "report.json", *FIGURES) == REPORT_FILES
