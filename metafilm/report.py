"""Reports from what runs saved: Markdown, JSON and PNG, each figure recomputable from the files.

Inputs, per run directory (read by `metafilm.rundir.read_run`): `config.toml` (the resolved
config), `metrics.jsonl` (training rows) and `eval/*.json` (one record per evaluated setting, with
the per-episode accuracies and the protocol). Nothing is re-run and no model is loaded. This
module labels the evaluations, pairs those of several runs on the same episodes and writes the
Markdown and JSON; the statistics are `metafilm.stats`', the figures `metafilm.figures`' and the
published numbers `metafilm.published`'.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from metafilm.config import config_to_dict
from metafilm.errors import ReportError
from metafilm.figures import FIGURES, write_figures
from metafilm.markers import REPORT_MARKER, foreign_folder, mark
from metafilm.published import LAKE_PUBLISHED, PUBLISHED, PUBLISHED_SOURCES, published_matches
from metafilm.rundir import BEST, RunFiles, bn_mode_tested, read_run
from metafilm.stats import CI_Z, STD_KIND, accuracy_summary, paired_difference

EPISODE_KEYS = (
    "dataset",
    "image_size",
    "split",
    "ways",
    "shots",
    "query",
    "episodes",
    "episode_seed",
)
"""The fields of an evaluation record that fix its episodes, with its alphabets (`episodes_of`):
two records that agree on all of them were computed on the same episodes, so their accuracies
pair up episode by episode."""


def setting_label(evaluation: Mapping[str, Any]) -> str:
    """`W-way K-shot` of an evaluation record."""
    return f"{evaluation['ways']}-way {evaluation['shots']}-shot"


def _bn_text(bn_mode: str) -> str:
    return {
        "episode": "transductive (episode statistics)",
        "running": "running statistics at test",
    }.get(bn_mode, bn_mode)


def _results(runs: Sequence[RunFiles]) -> list[dict[str, Any]]:
    """One entry per evaluation file: protocol, summary and the per-episode accuracies."""
    results = []
    for run in runs:
        for evaluation in run.evaluations:
            protocol = {key: value for key, value in evaluation.items() if key != "accuracies"}
            results.append(
                {
                    "run": run.name,
                    "run_dir": str(run.path),
                    **protocol,
                    **accuracy_summary(evaluation["accuracies"]),
                    "std_kind": STD_KIND,
                    "accuracies": evaluation["accuracies"],
                }
            )
    return results


def format_percent(mean: float, ci: float | None) -> str:
    """`mean ± ci` of a fraction, in percent with two decimals (no ± without a CI)."""
    return f"{100 * mean:.2f}" + ("" if ci is None else f" ± {100 * ci:.2f}")


def episodes_of(evaluation: Mapping[str, Any]) -> tuple[Any, ...]:
    """What fixes an evaluation's episodes (records from before alphabets could be chosen drew
    from the whole split), and how many accuracies it holds."""
    return (
        *(evaluation.get(key) for key in EPISODE_KEYS),
        len(evaluation["accuracies"]),
        tuple(sorted(evaluation.get("alphabets") or ())),
        bool(evaluation.get("within_alphabet")),
    )


def evaluation_label(evaluation: Mapping[str, Any]) -> str:
    """Split and setting, then each test-time choice that departs from how the run trained
    (another checkpoint than the best, other inner steps, the other batch norm): evaluations of one
    run differ in label, and arms tested as they trained share theirs, so they pair."""
    parts = [episode_classes(evaluation), setting_label(evaluation)]
    if evaluation["checkpoint"] != BEST:
        parts.append(Path(evaluation["checkpoint"]).stem)
    if evaluation["inner_steps_test"] != evaluation["inner_steps_train"]:
        parts.append(f"inner {evaluation['inner_steps_test']}")
    if bn_mode_tested(evaluation) != evaluation["bn_mode"]:
        parts.append(f"bn {bn_mode_tested(evaluation)}")
    return " ".join(parts)


LABEL_DETAILS = (("episode_seed", "seed {}"), ("query", "{} query"), ("episodes", "{} episodes"))
"""What fixes episodes besides the label's split and setting, as a label states it when needed."""


def evaluation_labels(evaluations: Sequence[Mapping[str, Any]]) -> list[str]:
    """The labels of evaluations shown together (in one report, one comparison): each
    `evaluation_label`, followed by the episode seed, the query size or the episode count
    wherever evaluations of that label differ in it, so that no two evaluations of other episodes
    share a label."""
    plain = [evaluation_label(evaluation) for evaluation in evaluations]
    values: dict[tuple[str, str], set[str]] = {}
    for label, evaluation in zip(plain, evaluations, strict=True):
        for key, _ in LABEL_DETAILS:
            values.setdefault((label, key), set()).add(json.dumps(evaluation.get(key)))
    return [
        " ".join(
            [label]
            + [
                text.format(evaluation.get(key))
                for key, text in LABEL_DETAILS
                if len(values[label, key]) > 1
            ]
        )
        for label, evaluation in zip(plain, evaluations, strict=True)
    ]


def labelled(runs: Sequence[RunFiles]) -> dict[int, str]:
    """`evaluation_labels` of every evaluation of `runs`, by `id` of the evaluation record."""
    evaluations = [evaluation for run in runs for evaluation in run.evaluations]
    labels = evaluation_labels(evaluations)
    return {id(evaluation): label for evaluation, label in zip(evaluations, labels, strict=True)}


def paired_differences(
    run: RunFiles, base: RunFiles, among: Sequence[RunFiles] | None = None
) -> dict[str, dict[str, Any]]:
    """Per evaluation label, `run`'s accuracy minus `base`'s on the same episodes: mean and 95% CI
    of the per-episode differences. Evaluations pair when they have the same label among the
    runs `among` (default: these two; see `evaluation_labels`) and the very same episodes
    (`episodes_of`); the others are left out. Swapping `run` and `base` negates each difference
    and pairs the same evaluations."""
    labels = labelled(among if among is not None else (run, base))
    bases = {
        (labels[id(evaluation)], episodes_of(evaluation)): evaluation
        for evaluation in base.evaluations
    }
    differences = {}
    for evaluation in run.evaluations:
        label = labels[id(evaluation)]
        other = bases.get((label, episodes_of(evaluation)))
        if other is not None:
            differences[label] = paired_difference(evaluation["accuracies"], other["accuracies"])
    return differences


def mean_ci_text(summary: Mapping[str, Any] | None, *, bold_if_clear: bool = False) -> str:
    """`mean ± ci` in percent ("–" if missing), bold if asked and the CI excludes zero."""
    if summary is None:
        return "–"
    ci95 = summary["ci95"]
    text = format_percent(summary["mean"], ci95)
    clear = ci95 is not None and abs(summary["mean"]) > ci95
    return f"**{text}**" if bold_if_clear and clear else text


def paired_rows(runs: Sequence[RunFiles]) -> list[dict[str, Any]]:
    """Each run after the first minus the first, per evaluation label they share on the same
    episodes (`paired_differences`), as rows naming both runs."""
    base = runs[0]
    return [
        {"run": run.name, "base": base.name, "evaluation": label, **summary}
        for run in runs[1:]
        for label, summary in paired_differences(run, base, among=runs).items()
    ]


def paired_line(row: Mapping[str, Any]) -> str:
    """One paired difference in words, in points."""
    return (
        f"{row['run']} minus {row['base']}, {row['evaluation']}: "
        f"{format_percent(row['mean'], row['ci95'])} points over {row['episodes']} episodes"
    )


def _paired_markdown(paired: Sequence[dict[str, Any]]) -> list[str]:
    if not paired:
        return []
    lines = [
        "## Paired differences",
        "",
        f"Each run minus {paired[0]['base']} on the very same episodes (for Lake's runs, the same "
        "20 runs): the mean of the per-episode accuracy differences ± its 95% confidence "
        "interval, in points; bold where the interval excludes zero. Pairing removes the "
        "variation between episodes, so this is far tighter than comparing the intervals above.",
        "",
        "| run | evaluation | difference (points) | episodes |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {row['run']} | {row['evaluation']} | {mean_ci_text(row, bold_if_clear=True)} "
        f"| {row['episodes']} |"
        for row in paired
    ]
    return [*lines, ""]


def _markdown(
    runs: Sequence[RunFiles],
    results: Sequence[dict[str, Any]],
    paired: Sequence[dict[str, Any]],
    compare_published: bool,
) -> str:
    lines = [
        "# metafilm report",
        "",
        "Accuracy: mean over the evaluated episodes (of the split in each row) of the per-episode "
        f"query accuracy, in percent; ± is the 95% confidence interval {CI_Z} · s / sqrt(n), s the "
        f"{STD_KIND} over the n episodes.",
        "",
        "## Results",
        "",
    ]
    if not results:
        lines += ["No evaluation yet: run `metafilm evaluate RUN_DIR` first.", ""]
    else:
        lines += [
            "| run | test setting | accuracy (%) | episodes | query / class | episode seed | split "
            "| trained as | inner steps train / test | batch norm | checkpoint |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results:
            trained = f"{r['train_ways']}-way {r['train_shots']}-shot"
            if (r["train_ways"], r["train_shots"]) != (r["ways"], r["shots"]):
                trained += " (differs from test)"
            lines.append(
                f"| {r['run']} | {setting_label(r)} | {format_percent(r['mean'], r['ci95'])} "
                f"| {r['episodes']} | {r['query']} | {r['episode_seed']} | {episode_classes(r)} "
                f"| {trained} | {r['inner_steps_train']} / {r['inner_steps_test']} "
                f"| {_bn_text(bn_mode_tested(r))} "
                f"| {r['checkpoint']} (step {r['checkpoint_step']}) |"
            )
        lines.append("")
    lines += _paired_markdown(paired)
    lines += ["## Protocol", ""]
    for run in runs:
        c = run.config
        lines += [
            f"### {run.name}",
            "",
            f"- run directory: `{run.path}`",
            f"- data: {c.data.dataset}, {c.data.image_size}x{c.data.image_size}, trained on split "
            f"{c.data.train_split!r} ({c.data.ways}-way {c.data.shots}-shot, {c.data.query} query "
            f"per class{', each task within one alphabet' if c.data.within_alphabet else ''}, "
            f"rotation augmentation {'on' if c.data.augment_rotations else 'off'}, "
            f"affine augmentation {'on' if c.data.augment_affine else 'off'}, "
            f"{_photo_text(c.data)}, "
            f"inputs {'standardised per channel' if c.data.normalize else 'in [0, 1]'}), "
            + (
                f"validated on {c.data.val_split!r}"
                if c.train.val_every
                else "not validated (its last checkpoint is tested)"
            ),
            f"- backbone: {c.model.backbone}, width {c.model.width}, "
            + ("frozen" if c.model.backbone_mode == "frozen" else "meta-trained")
            + _pretraining_text(c),
            f"- batch norm: bn_mode {c.model.bn_mode!r}"
            + (
                ", running statistics kept (testable either way)"
                if c.model.bn_mode == "running"
                else ", episode statistics only (transductive)"
            ),
            f"- task encoder: {c.model.encoder}; head: {c.model.head}",
            f"- inner loop: {c.adapt.inner_steps} steps, lr {c.adapt.inner_lr}, "
            f"{'first' if c.adapt.first_order else 'second'} order, "
            f"learned lr {'on' if c.adapt.learn_inner_lr else 'off'}",
            f"- outer loop: {c.train.steps} steps, lr {c.outer.lr}, meta-batch "
            f"{c.outer.meta_batch_size}, seed {c.train.seed}",
        ]
        for r in (r for r in results if r["run"] == run.name):
            lines.append(
                f"- {setting_label(r)} on {r['split']!r}: FiLM sites {', '.join(r['film_sites'])}; "
                f"batch norm {_bn_text(bn_mode_tested(r))}; "
                f"checkpoint {r['checkpoint']} step {r['checkpoint_step']}, "
                f"sha256 `{r['checkpoint_sha256']}`"
                + (
                    ""
                    if "versions" not in r
                    else "; computed with "
                    + ", ".join(f"{name} {version}" for name, version in r["versions"].items())
                )
            )
        lines.append("")
    lines += _lake_markdown(results)
    if compare_published:
        lines += _published_markdown(results)
    lines += ["## Figures", ""] + [f"![{name}]({name})" for name in FIGURES] + [""]
    return "\n".join(lines)


def episode_classes(result: dict[str, Any]) -> str:
    """Where an evaluation's episodes drew their classes: the split, the alphabets chosen of it
    and whether each episode kept to one alphabet."""
    text = _with_alphabets(result["split"], result.get("alphabets"))
    return text + (", within alphabet" if result.get("within_alphabet") else "")


def _with_alphabets(split: str, alphabets: Sequence[str] | None) -> str:
    return split if alphabets is None else f"{split} ({len(alphabets)} alphabets)"


def _split_text(result: dict[str, Any], which: str) -> str:
    return _with_alphabets(result[f"{which}_split"], result.get(f"{which}_alphabets"))


def _lake_markdown(results: Sequence[dict[str, Any]]) -> list[str]:
    """The Lake et al. one-shot challenge in its own terms: error rate over the 400 items."""
    lake = [r for r in results if "error_rate" in r]
    if not lake:
        return []
    lines = [
        "## Lake et al. one-shot challenge",
        "",
        "20 runs of 20-way 1-shot within one evaluation alphabet, one test item per class; the "
        "paper's protocol learns from the 30 background alphabets only (check each run's "
        f"training split below). Published error rates: {LAKE_PUBLISHED}.",
        "",
        "| run | error rate (%) | errors per run | trained on / validated on | inner steps test "
        "| batch norm | checkpoint |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in lake:
        lines.append(
            f"| {r['run']} | {100 * r['error_rate']:.2f} "
            f"| {' '.join(map(str, r['errors_per_run']))} "
            f"| {_split_text(r, 'train')} / {_split_text(r, 'val')} | {r['inner_steps_test']} "
            f"| {_bn_text(bn_mode_tested(r))} | {r['checkpoint']} (step {r['checkpoint_step']}) |"
        )
    return [*lines, ""]


def _photo_text(data: Any) -> str:
    parts = [
        f"crops padded by {data.augment_crop_padding}" if data.augment_crop_padding else "",
        "flips" if data.augment_flip else "",
        f"colour jitter {data.augment_jitter}" if data.augment_jitter else "",
    ]
    chosen = [part for part in parts if part]
    return f"photo augmentation: {', '.join(chosen)}" if chosen else "photo augmentation off"


def _pretraining_text(config: Any) -> str:
    """How the backbone started: from a pretrained file, pretrained in the run, or at random."""
    settings = config.pretrain
    if settings.backbone:
        return f", starting from the pretrained backbone `{settings.backbone}`"
    if not settings.enabled:
        return ", from a random start"
    length = f"{settings.epochs} epochs" if settings.epochs else f"{settings.steps} steps"
    return (
        f", pretrained in the run ({length}, {settings.optimizer}, lr {settings.lr} "
        f"{settings.schedule}, label smoothing {settings.label_smoothing})"
    )


def _published_markdown(results: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "## Published results",
        "",
        "Published figures (percent) next to ours; compare only where the protocols agree.",
        "",
    ]
    settings = sorted({(r["dataset"], r["ways"], r["shots"]) for r in results})
    for dataset, ways, shots in settings:
        ours = [
            r for r in results if (r["dataset"], r["ways"], r["shots"]) == (dataset, ways, shots)
        ]
        published = published_matches(ours[0])
        lines += [f"### {PUBLISHED_SOURCES.get(dataset, dataset)}: {ways}-way {shots}-shot", ""]
        lines += ["| method | backbone | accuracy (%) | protocol |", "|---|---|---|---|"]
        for r in ours:
            lines.append(
                f"| **ours: {r['run']}** | {r['backbone']}, width {r['width']} "
                f"| **{format_percent(r['mean'], r['ci95'])}** | {r['episodes']} episodes, "
                f"{r['query']} query per class, seed {r['episode_seed']}, "
                f"{_bn_text(bn_mode_tested(r))} |"
            )
        for row in published:
            lines.append(
                f"| {row.method} | {row.backbone} | {row.accuracy:.{row.decimals}f}"
                + ("" if row.plus_minus is None else f" ± {row.plus_minus:.{row.decimals}f}")
                + f" | {row.protocol} |"
            )
        if not published:
            lines.append("| (no published figure for this setting) | | | |")
        lines.append("")
    return lines


def accuracy_plot_labels(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """The x labels of the accuracy plot: run, setting, classes, then the seed, query size or
    episode count where evaluations of one label differ in it (`evaluation_labels`)."""
    labels = evaluation_labels(results)
    plain = [evaluation_label(r) for r in results]
    return [
        f"{r['run']}\n{setting_label(r)}\n{episode_classes(r)}"
        + ("\nrunning BN" if bn_mode_tested(r) == "running" else "")
        + (f"\n{label.removeprefix(bare).strip()}" if label != bare else "")
        for r, label, bare in zip(results, labels, plain, strict=True)
    ]


def check_report_dir(out: Path) -> None:
    """Refuse a report folder that is a file, or that holds files `metafilm report` did not write
    there (no `REPORT_MARKER`): a report only ever replaces an earlier report."""
    refusal = foreign_folder(out, REPORT_MARKER, "metafilm report")
    if refusal is not None:
        raise ReportError(refusal)


def write_report(
    run_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    compare_published: bool = False,
    on_paired: Callable[[dict[str, Any]], None] | None = None,
) -> list[Path]:
    """Write `report.md`, `report.json` and the PNG figures for `run_dirs` into `out_dir` (new, or
    an earlier report: see `check_report_dir`); `on_paired` is called with each paired difference
    (see `paired_rows`)."""
    import matplotlib

    matplotlib.use("Agg")
    runs = [read_run(path) for path in run_dirs]
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        runs = [
            RunFiles(str(run.path), run.path, run.config, run.metrics, run.evaluations)
            for run in runs
        ]
    results = _results(runs)
    paired = paired_rows(runs)
    if on_paired is not None:
        for row in paired:
            on_paired(row)
    out = Path(out_dir)
    check_report_dir(out)
    mark(out, REPORT_MARKER)
    document = {
        "statistics": {"ci95": f"{CI_Z} * std / sqrt(episodes)", "std": STD_KIND},
        "runs": [
            {"name": run.name, "path": str(run.path), "config": config_to_dict(run.config)}
            for run in runs
        ],
        "results": results,
        "paired": paired,
    }
    if compare_published:
        document["published"] = [
            dataclasses.asdict(row)
            for row in PUBLISHED
            if any(row in published_matches(result) for result in results)
        ]
    written = [out / "report.md", out / "report.json"]
    written[0].write_text(_markdown(runs, results, paired, compare_published), encoding="utf-8")
    written[1].write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    return written + write_figures(runs, results, accuracy_plot_labels(results), out)
