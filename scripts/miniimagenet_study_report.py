"""The miniImageNet FiLM study's report, claim by claim, from the runs of
scripts/miniimagenet_study.sh: for each claim, the paired differences (same 600 episodes) that test
it at 1 and 5 shots on val and test, the seed spread they are judged against, a verdict and a plot.

    python scripts/miniimagenet_study_report.py RUNS_DIR REPORT_DIR

Verdict rule, per comparison and shot (`judge`): a difference is an effect when on test it is
larger than the seed spread (the largest distance of the reseeded base arms from seed 0 on the
same episodes) and its 95% CI excludes 0, and val agrees in sign. A claim that predicts a sign is
confirmed by an effect of that sign, refuted by one of the other, and unclear without an effect; a
claim of "about equal" is confirmed without an effect and refuted by one. Outer-trained arms were
not reseeded: they are judged against the frozen arms' spread, a lower bound of their own.
Everything is chosen and judged on these rules before the numbers were seen; test is never used to
choose.

Before the claims, a table of every evaluated arm: its accuracies, its train–val gap and the
size of its FiLM deviations (predicted by the encoder, and after the inner loop), and its training
time. Writes REPORT_DIR/claims.md, claims.json, claim<N>.png, and each sweep's own comparison
(sweep.md, sweep.json, its plot, the full report of every arm) under REPORT_DIR/<sweep>/ once that
sweep has finished. While the study runs, the report is interim: a comparison whose arms are not
both evaluated at every split and shot is "pending" and judged later; a claim's verdict is from
its judged comparisons and says how many are pending.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metafilm.errors import ReportError
from metafilm.report import labelled, mean_ci_text, paired_differences, setting_label
from metafilm.rundir import RunFiles, read_run
from metafilm.sweep import Arm, arm_summary

SHOTS = (1, 5)
SPLITS = ("test", "val")
SWEEPS = ("frozen", "linear", "outer")


def outer(encoder: str, aux: str, sites: str = '["block4"]') -> str:
    """The name of an arm of the outer sweep's grid."""
    return f"outer/model.encoder={encoder},outer.aux_weight={aux},model.film_sites={sites}"


@dataclass(frozen=True)
class Comparison:
    """Arm `a` minus arm `b` (`sweep/arm` names); `expect` is the sign the claim predicts for
    a - b (+1, -1), 0 for "about equal", None when the comparison only informs."""

    text: str
    a: str
    b: str
    expect: int | None


@dataclass(frozen=True)
class Claim:
    title: str
    source: str
    comparisons: tuple[Comparison, ...]


CLAIMS = (
    Claim(
        "A learned metric scale beats a fixed one",
        "TADAM",
        (Comparison("learned − fixed", "frozen/base", "frozen/model.learn_metric_scale=false", 1),),
    ),
    Claim(
        "A linear predictor of the deviations beats a deeper one; a task encoder helps",
        "the seed; TADAM",
        (
            Comparison("linear − MLP", "frozen/base", "frozen/model.encoder=mlp", 1),
            Comparison("linear − no encoder", "frozen/base", "frozen/model.encoder=none", 1),
        ),
    ),
    Claim(
        "Task conditioning alone hurts; with auxiliary co-training it helps",
        "TADAM",
        (
            Comparison(
                "encoder − none, no co-training", outer("linear", "0"), outer("none", "0"), -1
            ),
            Comparison(
                "encoder − none, co-training", outer("linear", "1.0"), outer("none", "1.0"), 1
            ),
            Comparison(
                "encoder − none, no co-training, FiLM on all blocks",
                outer("linear", "0", "all"),
                outer("none", "0", "all"),
                -1,
            ),
            Comparison(
                "encoder − none, co-training, FiLM on all blocks",
                outer("linear", "1.0", "all"),
                outer("none", "1.0", "all"),
                1,
            ),
            Comparison(
                "co-training − none, encoder", outer("linear", "1.0"), outer("linear", "0"), None
            ),
            Comparison(
                "co-training − none, no encoder", outer("none", "1.0"), outer("none", "0"), None
            ),
        ),
    ),
    Claim(
        "Gradient steps on the deviations help beyond amortised prediction; first order is enough",
        "CAVIA",
        (
            Comparison("cosine head: 1 step − 0", "frozen/base", "frozen/adapt.inner_steps=0", 1),
            Comparison("cosine head: 5 steps − 1", "frozen/adapt.inner_steps=5", "frozen/base", 1),
            Comparison("linear head: 1 step − 0", "linear/base", "linear/adapt.inner_steps=0", 1),
            Comparison("linear head: 5 steps − 1", "linear/adapt.inner_steps=5", "linear/base", 1),
            Comparison("first − second order", "frozen/adapt.first_order=true", "frozen/base", 0),
        ),
    ),
    Claim(
        "FiLM overfits unless its deviations are regularised toward identity",
        "the seed",
        (
            Comparison("L2 1e-3 − none", "frozen/base", "frozen/outer.film_l2=0", 1),
            Comparison("L2 1e-4 − none", "frozen/outer.film_l2=1e-4", "frozen/outer.film_l2=0", 1),
            Comparison("L2 1e-2 − 1e-3", "frozen/outer.film_l2=1e-2", "frozen/base", None),
            Comparison("L2 1e-1 − 1e-3", "frozen/outer.film_l2=1e-1", "frozen/base", None),
        ),
    ),
    Claim(
        "One FiLM layer does about as well as four",
        "the seed",
        (
            Comparison(
                "frozen: block 3 − block 4", 'frozen/model.film_sites=["block3"]', "frozen/base", 0
            ),
            Comparison(
                "outer-trained: all four − block 4",
                outer("linear", "0", "all"),
                outer("linear", "0"),
                0,
            ),
        ),
    ),
    Claim(
        "Frozen backbone with cached prefix against outer-trained, at about equal wall-clock",
        "the cost a user chooses",
        (Comparison("outer-trained − frozen", outer("linear", "0"), "frozen/base", None),),
    ),
)


def label(split: str, shots: int) -> str:
    """The evaluation label of the study's protocol (`metafilm.report.evaluation_label`)."""
    return f"{split} {setting_label({'ways': 5, 'shots': shots})}"


def judge(
    differences: dict[str, dict[str, Any]], spread: dict[str, float], shots: int, expect: int | None
) -> str:
    """The verdict of one comparison at `shots` (see the module docstring): "confirmed",
    "refuted", "unclear", or "informs" when the claim predicts nothing of it."""
    test, val = differences[label("test", shots)], differences[label("val", shots)]
    effect = (
        abs(test["mean"]) > spread[label("test", shots)]
        and abs(test["mean"]) > test["ci95"]
        and test["mean"] * val["mean"] > 0
    )
    if expect is None:
        return "informs"
    if expect == 0:
        return "refuted" if effect else "confirmed"
    if not effect:
        return "unclear"
    return "confirmed" if test["mean"] * expect > 0 else "refuted"


def claim_verdict(verdicts: list[str]) -> str:
    """A claim's verdict from its comparisons' (every shot): one word when they agree; "pending"
    while none is judged yet."""
    judged = {verdict for verdict in verdicts if verdict not in ("informs", "pending")}
    if not judged:
        return "pending" if "pending" in verdicts else "informs"
    return judged.pop() if len(judged) == 1 else "mixed: " + ", ".join(sorted(judged))


def evaluated(differences: dict[str, dict[str, Any]]) -> bool:
    """Whether paired differences exist at every split and shot of the protocol."""
    return all(label(split, shots) in differences for split in SPLITS for shots in SHOTS)


def seed_spread(base: RunFiles, reseeded: list[RunFiles]) -> dict[str, float]:
    """Per evaluation label, the largest |paired difference| of a reseeded base from seed 0."""
    spread: dict[str, float] = {}
    for run in reseeded:
        for name, summary in paired_differences(run, base).items():
            spread[name] = max(spread.get(name, 0.0), abs(summary["mean"]))
    return spread


def _wall_time(run: RunFiles | None) -> float | None:
    return run.metrics[-1].get("wall_time") if run is not None and run.metrics else None


def _points(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "pending"
    return f"{100 * summary['mean']:+.2f} ± {100 * summary['ci95']:.2f}"


def _plot(claim: Claim, rows: list[dict[str, Any]], spread: dict[str, float], path: Path) -> None:
    """The judged comparisons of a claim: paired differences with their CIs, and the seed spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(SHOTS), figsize=(11, 1.2 + 0.55 * len(rows)), sharey=True)
    for axis, shots in zip(axes, SHOTS, strict=True):
        for y, row in enumerate(rows):
            for offset, split in ((-0.15, "test"), (0.15, "val")):
                summary = row["differences"][label(split, shots)]
                axis.errorbar(
                    100 * summary["mean"],
                    y + offset,
                    xerr=100 * summary["ci95"],
                    fmt="o" if split == "test" else "s",
                    color="C0" if split == "test" else "C1",
                    label=split if y == 0 else None,
                )
        noise = 100 * spread[label("test", shots)]
        axis.axvspan(-noise, noise, color="0.85", label="seed spread (test)")
        axis.axvline(0, color="0.4", linewidth=0.8)
        axis.set_title(f"5-way {shots}-shot")
        axis.set_xlabel("paired difference (points)")
        axis.set_yticks(range(len(rows)), [row["text"] for row in rows])
    axes[0].invert_yaxis()
    axes[-1].legend(loc="lower right", fontsize=8)
    figure.suptitle(claim.title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _read(runs_dir: Path, name: str, cache: dict[str, RunFiles]) -> RunFiles | None:
    """The arm's run, None while its training has not started."""
    if name not in cache:
        path = runs_dir / name
        cache[name] = read_run(path) if (path / "config.toml").is_file() else None
    return cache[name]


def arms_table(runs_dir: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Markdown lines and rows (`metafilm.sweep.arm_summary`) of every arm of `runs_dir` that is
    evaluated at every split and shot, sweep by sweep."""
    arms: list[tuple[str, RunFiles]] = []
    for sweep in SWEEPS:
        found = (runs_dir / sweep).glob("*/config.toml")
        for path in sorted(found, key=lambda path: (path.parent.name != "base", path)):
            run = read_run(path.parent)
            if {label(split, shots) for split in SPLITS for shots in SHOTS} <= set(
                labelled([run]).values()
            ):
                arms.append((f"{sweep}/{path.parent.name}", run))
    rows = [arm_summary(Arm(()), run) | {"arm": name} for name, run in arms]
    columns = [label(split, shots) for shots in SHOTS for split in SPLITS]

    def number(value: float | None, scale: float = 100.0, digits: int = 1) -> str:
        return "–" if value is None else f"{scale * value:.{digits}f}"

    lines = [
        "## Every evaluated arm",
        "",
        "Accuracy in percent, mean ± 95% CI over the 600 episodes. Gap: the last logged training "
        "accuracy minus the last validation accuracy (both 5-way 1-shot). RMS: the FiLM "
        "deviations predicted by the encoder and after the inner loop, at the last log.",
        "",
        "| arm | " + " | ".join(columns) + " | gap | RMS predicted | RMS adapted | training (s) |",
        "|---|" + "---|" * (len(columns) + 4),
    ]
    for row in rows:
        cells = [mean_ci_text(row["results"].get(column)) for column in columns]
        cells += [
            number(row["train_val_gap"]),
            number(row["film_predicted_rms"], 1, 4),
            number(row["film_adapted_rms"], 1, 4),
            number(row["wall_time_s"], 1, 0),
        ]
        lines.append(f"| {row['arm']} | " + " | ".join(cells) + " |")
    return [*lines, ""], rows


def write(runs_dir: Path, out: Path) -> Path:
    """Write the study's report from `runs_dir` into `out`; return the Markdown file."""
    runs: dict[str, RunFiles] = {}
    base = _read(runs_dir, "frozen/base", runs)
    reseeded = [_read(runs_dir, f"frozen/train.seed={seed}", runs) for seed in (1, 2)]
    if base is None or None in reseeded:
        raise ReportError(
            f"{runs_dir} lacks frozen/base or its reseeds (train.seed=1, 2), which every verdict "
            "is judged against: run scripts/miniimagenet_study.sh"
        )
    spread = seed_spread(base, reseeded)
    if not all(evaluated(paired_differences(run, base)) for run in reseeded):
        raise ReportError("the seed spread needs frozen/base and its reseeds evaluated first")
    lines = [
        "# The FiLM study on miniImageNet: the claims",
        "",
        "Produced by `python scripts/miniimagenet_study_report.py` from the runs of "
        "`scripts/miniimagenet_study.sh`. Paired differences in points (a − b on the same 600 "
        "episodes, mean ± 95% CI), test / val. The verdict rule is in the script's docstring: "
        "an effect must exceed the seed spread on test, exclude 0 and agree in sign on val.",
        "",
        "Seed spread (largest distance of the base retrained with seeds 1 and 2 from seed 0): "
        + ", ".join(f"{name} {100 * value:.2f}" for name, value in sorted(spread.items())),
        "",
    ]
    table, arm_rows = arms_table(runs_dir)
    lines += table
    document: dict[str, Any] = {
        "seed_spread": spread,
        "arms": arm_rows,
        "claims": [],
        "pending_comparisons": 0,
    }
    out.mkdir(parents=True, exist_ok=True)
    for number, claim in enumerate(CLAIMS, 1):
        rows, verdicts, pending = [], [], 0
        for comparison in claim.comparisons:
            a, b = _read(runs_dir, comparison.a, runs), _read(runs_dir, comparison.b, runs)
            differences = {} if a is None or b is None else paired_differences(a, b)
            if not evaluated(differences):
                differences, pending = {}, pending + 1
            judged = {
                shots: judge(differences, spread, shots, comparison.expect)
                if differences
                else "pending"
                for shots in SHOTS
            }
            verdicts += judged.values()
            rows.append(
                {
                    "text": comparison.text,
                    "a": comparison.a,
                    "b": comparison.b,
                    "expect": comparison.expect,
                    "differences": differences,
                    "verdicts": judged,
                    "wall_time_s": {
                        "a": _wall_time(a) if judged[1] != "pending" else None,
                        "b": _wall_time(b) if judged[1] != "pending" else None,
                    },
                }
            )
        verdict = claim_verdict(verdicts)
        if pending and verdict != "pending":
            verdict += f" ({pending} of {len(rows)} comparisons pending)"
        figure = out / f"claim{number}.png"
        judged_rows = [row for row in rows if row["differences"]]
        if judged_rows:
            _plot(claim, judged_rows, spread, figure)
        document["claims"].append({"title": claim.title, "verdict": verdict, "rows": rows})
        document["pending_comparisons"] += pending
        lines += [
            f"## {number}. {claim.title} ({claim.source}): **{verdict}**",
            "",
            "| comparison | 1-shot test | 1-shot val | 5-shot test | 5-shot val | verdict 1 / 5 "
            "| time a / b (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            cells = [_points(row["differences"].get(label(s, n))) for n in SHOTS for s in SPLITS]
            times = " / ".join(
                "–" if t is None else f"{t:.0f}" for t in row["wall_time_s"].values()
            )
            lines.append(
                f"| {row['text']} | {' | '.join(cells)} | {row['verdicts'][1]} / "
                f"{row['verdicts'][5]} | {times} |"
            )
        lines += ["", f"![claim {number}]({figure.name})", ""] if judged_rows else [""]
    for sweep in SWEEPS:
        if not (runs_dir / sweep / "sweep.md").is_file():
            continue  # still running
        target = out / sweep
        target.mkdir(parents=True, exist_ok=True)
        for name in ("sweep.md", "sweep.json", "sweep_accuracy.png"):
            shutil.copy2(runs_dir / sweep / name, target / name)
        shutil.copytree(runs_dir / sweep / "report", target / "report", dirs_exist_ok=True)
    if document["pending_comparisons"]:
        total = sum(len(claim.comparisons) for claim in CLAIMS)
        lines[2:2] = [
            f"**Interim**: {document['pending_comparisons']} of {total} comparisons are pending "
            "(their arms are still training or evaluating); their claims are judged on the rest.",
            "",
        ]
    (out / "claims.json").write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    (out / "claims.md").write_text("\n".join(lines), encoding="utf-8")
    return out / "claims.md"


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/miniimagenet_study_report.py RUNS_DIR REPORT_DIR")
    try:
        print(f"claims written to {write(Path(sys.argv[1]), Path(sys.argv[2]))}")
    except ReportError as error:
        print(f"miniimagenet_study_report: error: {error}", file=sys.stderr)
        sys.exit(1)
