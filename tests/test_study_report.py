"""The miniImageNet study's verdict rule (scripts/miniimagenet_study_report.py) on pinned numbers,
and its claims naming only arms that scripts/miniimagenet_study.sh trains."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from functools import partial
from pathlib import Path

import pytest

from metafilm.config import RunConfig, load_config, to_toml
from metafilm.rundir import evaluation_record, write_evaluation
from metafilm.sweep import Arm, grid_arms, one_at_a_time_arms, parse_grid

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
CONFIGS = SCRIPTS.parent / "configs" / "study"
_spec = importlib.util.spec_from_file_location(
    "miniimagenet_study_report", SCRIPTS / "miniimagenet_study_report.py"
)
study = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = study  # dataclasses look their module up there
_spec.loader.exec_module(study)


def _differences(test: float, test_ci: float, val: float) -> dict:
    return {
        "test 5-way 1-shot": {"mean": test, "ci95": test_ci},
        "val 5-way 1-shot": {"mean": val, "ci95": 0.005},
    }


SPREAD = {"test 5-way 1-shot": 0.006, "val 5-way 1-shot": 0.008}


@pytest.mark.parametrize(
    ("test", "ci", "val", "expect", "verdict"),
    [
        (0.010, 0.004, 0.002, 1, "confirmed"),  # beyond the spread and the CI, val agrees
        (0.010, 0.004, 0.002, -1, "refuted"),
        (0.010, 0.004, -0.002, 1, "unclear"),  # val disagrees in sign
        (0.005, 0.004, 0.010, 1, "unclear"),  # within the seed spread
        (0.010, 0.011, 0.010, 1, "unclear"),  # the CI includes 0
        (0.005, 0.004, 0.010, 0, "confirmed"),  # "about equal", and no effect
        (-0.010, 0.004, -0.002, 0, "refuted"),
        (-0.010, 0.004, -0.002, None, "informs"),
    ],
)
def test_a_difference_is_an_effect_only_beyond_seed_noise_ci_and_with_val_agreeing(
    test: float, ci: float, val: float, expect: int | None, verdict: str
) -> None:
    assert study.judge(_differences(test, ci, val), SPREAD, 1, expect) == verdict


def test_a_claim_verdict_is_one_word_when_its_comparisons_agree() -> None:
    assert study.claim_verdict(["confirmed", "informs", "confirmed"]) == "confirmed"
    assert study.claim_verdict(["informs"]) == "informs"
    assert study.claim_verdict(["unclear", "confirmed"]) == "mixed: confirmed, unclear"


def _arm_config(config: Path, sets: list[str], arm: Arm) -> RunConfig:
    """An arm's config as `metafilm sweep` loads it."""
    return load_config(config, [*sets, *arm.settings])


def _sweep_arms(script: str) -> set[str]:
    """`sweep/arm` of every arm that the study script's sweeps train, read from the script."""
    text = script.replace("\\\n", " ")
    arrays = {
        name: shlex.split(body) for name, body in re.findall(r"(\w+)=\(\n(.*?)\n\)", text, re.S)
    }
    for name, words in arrays.items():
        text = text.replace(f'"${{{name}[@]}}"', " ".join(map(shlex.quote, words)))
    arms = set()
    for line in text.splitlines():
        if "metafilm sweep" not in line:
            continue
        words = shlex.split(line)
        config = SCRIPTS.parent / words[words.index("sweep") + 1]
        sets = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
        axes = parse_grid([words[i + 1] for i, word in enumerate(words) if word == "--grid"])
        out = words[words.index("--out") + 1].split("/")[-1]
        if "--one-at-a-time" in words:
            found = one_at_a_time_arms(axes, partial(_arm_config, config, sets))
        else:
            found = grid_arms(axes)
        arms |= {f"{out}/{arm.name}" for arm in found}
    return arms


def test_every_arm_a_claim_names_is_trained_by_the_study_script() -> None:
    trained = _sweep_arms((SCRIPTS / "miniimagenet_study.sh").read_text())
    named = {arm for claim in study.CLAIMS for c in claim.comparisons for arm in (c.a, c.b)}
    assert named - trained == set()
    assert {"frozen/train.seed=1", "frozen/train.seed=2"} <= trained


def _fake_arm(runs: Path, name: str, shift: float, wiggle: float) -> None:
    """An arm's run directory as the study leaves it: config, metrics, and evaluations on val and
    test at 1 and 5 shots of 20 episodes; its accuracy is the base's plus `shift`, with
    alternating `wiggle` so that its paired differences have a CI."""
    sweep, _, arm = name.partition("/")
    config_file = "miniimagenet-study-outer.toml" if sweep == "outer" else "miniimagenet-study.toml"
    settings = [] if arm == "base" else arm.split(",")
    if sweep == "linear":
        settings = ["model.head=linear", *settings]
    config = load_config(CONFIGS / config_file, [s for s in settings if not s.endswith("=all")])
    run = runs / name
    (run / "eval").mkdir(parents=True)
    (run / "config.toml").write_text(to_toml(config))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "wall_time": 12.5}) + "\n")
    for split in ("val", "test"):
        for shots in (1, 5):
            accuracies = [0.5 + 0.01 * (i % 5) + shift + wiggle * (-1) ** i for i in range(20)]
            protocol = {"split": split, "ways": 5, "shots": shots, "query": 15}
            protocol |= {"episode_seed": 1, "episodes": 20}
            record = evaluation_record(
                config,
                protocol,
                accuracies,
                film_sites=["block4"],
                checkpoint="best.pt",
                checkpoint_step=10,
                checkpoint_sha256="ab" * 32,
            )
            write_evaluation(run / "eval" / f"{split}{shots}.json", record)


def test_the_report_judges_each_claim_from_the_runs(tmp_path: Path) -> None:
    """Every arm level with the base except the reseeds (+0.4 and -0.6 points: the spread is
    0.6) and the MLP encoder (3 points lower): linear beats MLP beyond the noise (confirmed),
    the encoder against none is within it (unclear), and "about equal" claims hold."""
    runs = tmp_path / "runs"
    named = {arm for claim in study.CLAIMS for c in claim.comparisons for arm in (c.a, c.b)}
    shifts = {"frozen/train.seed=1": 0.004, "frozen/train.seed=2": -0.006}
    shifts["frozen/model.encoder=mlp"] = -0.03
    for name in named | set(shifts):
        _fake_arm(runs, name, shifts.get(name, 0.0), 0.0 if name == "frozen/base" else 0.001)
    for sweep in study.SWEEPS:
        (runs / sweep / "report").mkdir()
        for file in ("sweep.md", "sweep.json", "sweep_accuracy.png"):
            (runs / sweep / file).write_text(file)
    out = tmp_path / "report"
    markdown = study.write(runs, out)
    claims = json.loads((out / "claims.json").read_text())
    assert claims["seed_spread"]["test 5-way 1-shot"] == pytest.approx(0.006)
    verdicts = {claim["title"]: claim["verdict"] for claim in claims["claims"]}
    encoder = "A linear predictor of the deviations beats a deeper one; a task encoder helps"
    assert verdicts[encoder] == "mixed: confirmed, unclear"
    assert verdicts["One FiLM layer does about as well as four"] == "confirmed"
    assert verdicts["A learned metric scale beats a fixed one"] == "unclear"
    text = markdown.read_text()
    ci = 100 * 1.96 * 0.001 * (20 / 19) ** 0.5 / 20**0.5  # ±0.001 alternating: s = 0.001 * √(20/19)
    cells = " | ".join([f"+3.00 ± {ci:.2f}"] * 4)  # 0.04497 points, shown as 0.04
    assert f"| linear − MLP | {cells} | confirmed / confirmed | 12 / 12 |" in text
    arms = [line.split(" | ")[:2] for line in text.splitlines() if line.startswith("| frozen/")]
    assert arms[0] == ["| frozen/base", "52.00 ± 0.64"]  # 0.50-0.54 in turn: s = 0.0145
    assert ["| frozen/model.encoder=mlp", "49.00 ± 0.64"] in arms
    assert sorted(path.name for path in out.glob("claim*.png")) == [
        f"claim{n}.png" for n in range(1, len(study.CLAIMS) + 1)
    ]
    assert (out / "outer" / "sweep.md").read_text() == "sweep.md"


def test_an_interim_report_judges_claims_on_finished_arms_and_marks_the_rest_pending(
    tmp_path: Path,
) -> None:
    """The MLP arm has not started and the fixed-scale arm lacks one evaluation: their
    comparisons are pending, the encoder claim is judged on its other one (linear against none,
    within the noise), the metric-scale claim has nothing judged; a sweep still running has
    nothing copied."""
    runs = tmp_path / "runs"
    named = {arm for claim in study.CLAIMS for c in claim.comparisons for arm in (c.a, c.b)}
    shifts = {"frozen/train.seed=1": 0.004, "frozen/train.seed=2": -0.006}
    shifts["frozen/model.learn_metric_scale=false"] = -0.03
    for name in (named | set(shifts)) - {"frozen/model.encoder=mlp"}:
        _fake_arm(runs, name, shifts.get(name, 0.0), 0.0 if name == "frozen/base" else 0.001)
    (runs / "frozen/model.learn_metric_scale=false/eval/test5.json").unlink()
    markdown = study.write(runs, tmp_path / "report")
    claims = json.loads((tmp_path / "report" / "claims.json").read_text())
    verdicts = {claim["title"]: claim["verdict"] for claim in claims["claims"]}
    encoder = "A linear predictor of the deviations beats a deeper one; a task encoder helps"
    assert verdicts[encoder] == "unclear (1 of 2 comparisons pending)"
    assert verdicts["A learned metric scale beats a fixed one"] == "pending"
    assert verdicts["One FiLM layer does about as well as four"] == "confirmed"
    assert claims["pending_comparisons"] == 2
    text = markdown.read_text()
    assert "**Interim**: 2 of 21 comparisons are pending" in text
    assert (
        "| linear − MLP | pending | pending | pending | pending | pending / pending | – / – |"
        in text
    )
    assert not (tmp_path / "report" / "frozen").exists()
    assert "| frozen/model.encoder=mlp |" not in text  # not started
    assert "| frozen/model.learn_metric_scale=false |" not in text  # not evaluated everywhere
