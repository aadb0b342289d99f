"""Reports from what runs saved: Markdown, JSON and PNG, each figure recomputable from the files.

Inputs, per run directory: `config.toml` (the resolved config), `metrics.jsonl` (training rows)
and `eval/*.json` (one file per evaluated setting, with the per-episode accuracies and the
protocol). Nothing is re-run and no model is loaded.

Statistics: the accuracy of a setting is the mean of its per-episode query accuracies; its 95%
confidence interval is `1.96 * s / sqrt(n)`, with `s` the *sample* standard deviation (ddof = 1)
over the `n` episodes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metafilm.config import ConfigError, RunConfig, config_to_dict, load_config
from metafilm.markers import REPORT_MARKER, foreign_folder, mark

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
EVAL_DIR = "eval"
LAST = "last.pt"
BEST = "best.pt"
CI_Z = 1.96
STD_KIND = "sample standard deviation (ddof=1)"
EVAL_ORDER = (
    "split",
    "ways",
    "shots",
    "checkpoint",
    "query",
    "episodes",
    "episode_seed",
    "inner_steps_test",
)
"""How evaluations of a run are listed."""
EVAL_KEYS = (
    *EVAL_ORDER,
    "dataset",
    "inner_steps_train",
    "train_ways",
    "train_shots",
    "bn_mode",
    "backbone",
    "width",
    "film_sites",
    "checkpoint_step",
    "checkpoint_sha256",
    "accuracies",
)
"""What every evaluation file holds (written by `metafilm.train.evaluate_checkpoint`)."""
FIGURES = ("training_curves.png", "accuracy.png", "film_diagnostics.png")
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


log = logging.getLogger(__name__)


class ReportError(RuntimeError):
    """A run directory without the files a report needs."""


def accuracy_summary(accuracies: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Mean, sample std (ddof=1) and 95% CI `1.96 * std / sqrt(n)` of per-episode accuracies.

    With a single episode the std and CI are undefined and given as None.
    """
    values = np.asarray(accuracies, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(
            f"need a non-empty list of per-episode accuracies, got shape {values.shape}"
        )
    n = len(values)
    std = float(values.std(ddof=1)) if n > 1 else None
    return {
        "episodes": n,
        "mean": float(values.mean()),
        "std": std,
        "ci95": None if std is None else CI_Z * std / math.sqrt(n),
    }


@dataclass(frozen=True)
class Published:
    """One published figure: accuracy in percent, its ± (None if not given), and its protocol."""

    method: str
    backbone: str
    dataset: str
    ways: int
    shots: int
    accuracy: float
    plus_minus: float | None
    protocol: str
    decimals: int = 1
    """Decimals as published."""


def _published_table() -> tuple[Published, ...]:
    """Published results (percent) with their protocol notes, from the papers and the authors'
    code; '±' is a 95% CI unless the protocol note says otherwise."""
    omniglot = "Conv-4"
    rows: list[Published] = []
    settings = ((5, 1), (5, 5), (20, 1), (20, 5))
    for method, backbone, figures, protocol in (
        (
            "MAML (Finn 2017)",
            omniglot,
            ((98.7, 0.4), (99.9, 0.1), (95.8, 0.3), (98.9, 0.2)),
            "600 test tasks, seed 1, batch statistics at test (transductive BN)",
        ),
        (
            "MAML, fully connected net",
            "MLP",
            ((89.7, 1.1), (97.5, 0.6), None, None),
            "600 test tasks, seed 1, transductive BN",
        ),
        (
            "Prototypical Networks (Snell 2017)",
            omniglot,
            ((98.8, None), (99.7, None), (96.0, None), (98.9, None)),
            "1000 test episodes, no CI, model in eval mode; trained 60-way",
        ),
        (
            "ANIL (Raghu 2020)",
            omniglot,
            (None, None, (96.2, None), (98.0, None)),
            "± in the paper is the std over 3 seeds, not a CI",
        ),
        (
            "learn2learn MAML example",
            omniglot,
            ((99.1, None), None, None, None),
            "no CI, protocol not stated",
        ),
    ):
        for (ways, shots), figure in zip(settings, figures, strict=True):
            if figure is not None:
                rows.append(Published(method, backbone, "omniglot", ways, shots, *figure, protocol))
    for method, backbone, one_shot, five_shot, protocol in (
        (
            "MAML",
            "Conv-4, 32 filters",
            (48.70, 1.84),
            (63.11, 0.92),
            "600 tasks; query = K per class; 5 inner steps train, 10 test",
        ),
        (
            "first-order MAML",
            "Conv-4, 32 filters",
            (48.07, 1.75),
            (63.15, 0.91),
            "600 tasks; query = K per class; 5 inner steps train, 10 test",
        ),
        (
            "Prototypical Networks",
            "Conv-4, 64 filters",
            (49.42, 0.78),
            (68.20, 0.66),
            "600 episodes, 15 query per class",
        ),
        (
            "CAVIA (Zintgraf 2019)",
            "Conv-4, 32 filters",
            (47.24, 0.65),
            (59.05, 0.54),
            "15 query per class, transductive BN",
        ),
        (
            "CAVIA",
            "Conv-4, 128 filters",
            (49.84, 0.68),
            (64.63, 0.54),
            "15 query per class, transductive BN",
        ),
        (
            "CAVIA",
            "Conv-4, 512 filters",
            (51.82, 0.65),
            (65.85, 0.55),
            "15 query per class, transductive BN; first-order: 49.92 / 63.59",
        ),
        (
            "TADAM (Oreshkin 2018)",
            "ResNet-12",
            (58.5, 0.3),
            (76.7, 0.3),
            "10 restarts x 500 tasks, 100 query per task",
        ),
        ("Simple CNAPs", "ResNet-18 + FiLM", (53.2, 0.9), (70.8, 0.7), "600 tasks"),
    ):
        decimals = 1 if backbone.startswith("ResNet") else 2
        for shots, figure in ((1, one_shot), (5, five_shot)):
            rows.append(
                Published(method, backbone, "miniimagenet", 5, shots, *figure, protocol, decimals)
            )
    return tuple(rows)


PUBLISHED: tuple[Published, ...] = _published_table()
PUBLISHED_SOURCES = {
    "omniglot": "Omniglot, Vinyals split (1200 training characters x4 rotations, 423 test), 28x28",
    "miniimagenet": "miniImageNet, Ravi & Larochelle split (64 / 16 / 20 classes), 84x84, 5-way",
}


@dataclass(frozen=True)
class RunFiles:
    """What one run directory saved."""

    name: str
    path: Path
    config: RunConfig
    metrics: list[dict[str, Any]]
    evaluations: list[dict[str, Any]]
    stale: tuple[Path, ...] = ()
    """Evaluation files of an earlier checkpoint of the same name (its sha256 differs from the
    file's now): left out of `evaluations`."""


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a `metrics.jsonl` (a half-written last line, from a kill, is skipped)."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def read_run(path: str | os.PathLike[str]) -> RunFiles:
    """Load a run directory's config, metrics and evaluations."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"run directory {path} does not exist")
    try:
        config = load_config(path / CONFIG_FILE)
    except ConfigError as error:
        raise ReportError(f"{path} is not a usable run directory: {error}") from None
    evaluations: list[dict[str, Any]] = []
    stale: list[Path] = []
    digests: dict[str, str | None] = {}
    for file in sorted((path / EVAL_DIR).glob("*.json")):
        try:
            evaluation = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ReportError(f"evaluation file {file} is not valid JSON: {error}") from None
        missing = [key for key in EVAL_KEYS if key not in evaluation]
        if missing:
            raise ReportError(
                f"evaluation file {file} lacks {', '.join(missing)}: not written by "
                f"metafilm evaluate (run it again)"
            )
        if not isinstance(evaluation["accuracies"], list) or not evaluation["accuracies"]:
            raise ReportError(
                f"evaluation file {file} holds no per-episode accuracies: not written by "
                f"metafilm evaluate (delete it and evaluate again)"
            )
        name = str(evaluation["checkpoint"])
        if name not in digests:
            checkpoint = path / name
            digests[name] = _sha256(checkpoint) if checkpoint.is_file() else None
        if digests[name] not in (None, evaluation["checkpoint_sha256"]):
            stale.append(file)
            continue
        evaluations.append(evaluation)
    if stale:
        log.warning(
            f"warning: {len(stale)} evaluation file(s) of {path} were computed on an earlier "
            f"checkpoint of the same name and are left out (e.g. {stale[0].name}); run metafilm "
            f"evaluate again"
        )
    evaluations.sort(key=lambda e: (*(e[key] for key in EVAL_ORDER), bn_mode_tested(e)))
    metrics = read_metrics(path / METRICS_FILE)
    return RunFiles(path.name, path, config, metrics, evaluations, tuple(stale))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def setting_label(evaluation: Mapping[str, Any]) -> str:
    """`W-way K-shot` of an evaluation record."""
    return f"{evaluation['ways']}-way {evaluation['shots']}-shot"


def _bn_text(bn_mode: str) -> str:
    return {
        "episode": "transductive (episode statistics)",
        "running": "running statistics at test",
    }.get(bn_mode, bn_mode)


def bn_mode_tested(evaluation: Mapping[str, Any]) -> str:
    """The batch norm an evaluation tested with (records written before `bn_mode_test` existed
    always tested with the model's own mode)."""
    return evaluation.get("bn_mode_test", evaluation["bn_mode"])


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
            differences[label] = accuracy_summary(
                np.subtract(evaluation["accuracies"], other["accuracies"])
            )
    return differences


def mean_ci_text(summary: Mapping[str, Any] | None, *, bold_if_clear: bool = False) -> str:
    """`mean ± ci` in percent ("–" if missing), bold if asked and the CI excludes zero."""
    if summary is None:
        return "–"
    ci95 = summary["ci95"]
    text = format_percent(summary["mean"], ci95)
    clear = ci95 is not None and abs(summary["mean"]) > ci95
    return f"**{text}**" if bold_if_clear and clear else text


def _published_matches(result: dict[str, Any]) -> list[Published]:
    return [
        row
        for row in PUBLISHED
        if (row.dataset, row.ways, row.shots)
        == (result["dataset"], result["ways"], result["shots"])
    ]


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


LAKE_PUBLISHED = "people 4.5%, Bayesian Program Learning 3.3%, a deep Siamese convnet 8.0%"
"""Error rates on the Lake et al. (2015) one-shot runs, as published there."""


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
        published = _published_matches(ours[0])
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


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*points, strict=True)
    return np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)


def _film_keys(runs: Sequence[RunFiles], prefix: str) -> list[str]:
    return sorted(
        {key for run in runs for row in run.metrics for key in row if key.startswith(prefix)}
    )


def _plot_training_curves(runs: Sequence[RunFiles], path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for run in runs:
        steps, values = _series(run.metrics, "accuracy")
        accuracy_axis.plot(steps, values, label=f"{run.name} train")
        steps, values = _series(run.metrics, "val_accuracy")
        if len(steps):
            line = accuracy_axis.plot(steps, values, marker="o", label=f"{run.name} validation")
            _, ci = _series(run.metrics, "val_ci95")
            if len(ci) == len(values):
                accuracy_axis.fill_between(
                    steps, values - ci, values + ci, alpha=0.2, color=line[0].get_color()
                )
        steps, values = _series(run.metrics, "loss")
        loss_axis.plot(steps, values, label=f"{run.name} train")
    accuracy_axis.set(xlabel="outer step", ylabel="query accuracy", title="Accuracy")
    loss_axis.set(xlabel="outer step", ylabel="query loss", title="Training loss")
    for axis in (accuracy_axis, loss_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


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


def _plot_accuracy(results: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(results) + 2), 4.5), dpi=100)
    if results:
        labels = accuracy_plot_labels(results)
        means = [100 * r["mean"] for r in results]
        errors = [0 if r["ci95"] is None else 100 * r["ci95"] for r in results]
        positions = np.arange(len(results))
        axis.errorbar(positions, means, yerr=errors, fmt="o", capsize=6)
        axis.set_xticks(positions, labels, fontsize="small")
        axis.set_xlim(-0.5, len(results) - 0.5)
    else:
        axis.text(0.5, 0.5, "no evaluation yet", ha="center", va="center")
    axis.set(ylabel="test accuracy (%), 95% CI", title="Accuracy per setting")
    axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _plot_film_diagnostics(runs: Sequence[RunFiles], path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
    for axis, prefix, title in (
        (axes[0], "film_predicted/", "Predicted deviations (encoder)"),
        (axes[1], "film_adapted/", "Adapted deviations (after inner loop)"),
    ):
        keys = _film_keys(runs, prefix)
        for run in runs:
            for key in keys:
                steps, values = _series(run.metrics, key)
                label = key.removeprefix(prefix) if len(runs) == 1 else f"{run.name} {key}"
                axis.plot(steps, values, label=label)
        if not keys:
            axis.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axis.transAxes)
        else:
            axis.legend(fontsize="x-small")
        axis.set(xlabel="outer step", ylabel="RMS size", title=title)
        axis.grid(alpha=0.3)
    gap_axis = axes[2]
    for run in runs:
        val_steps, val_accuracy = _series(run.metrics, "val_accuracy")
        train_steps, train_accuracy = _series(run.metrics, "accuracy")
        if len(val_steps) and len(train_steps):
            gap = np.interp(val_steps, train_steps, train_accuracy) - val_accuracy
            gap_axis.plot(val_steps, gap, marker="o", label=run.name)
    gap_axis.axhline(0, color="grey", linewidth=0.8)
    gap_axis.set(
        xlabel="outer step", ylabel="train - validation accuracy", title="Generalisation gap"
    )
    gap_axis.grid(alpha=0.3)
    if gap_axis.lines[1:]:  # beyond the zero line: some run validated
        gap_axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


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
            if any(row in _published_matches(result) for result in results)
        ]
    written = [out / "report.md", out / "report.json"]
    written[0].write_text(_markdown(runs, results, paired, compare_published), encoding="utf-8")
    written[1].write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    _plot_training_curves(runs, out / FIGURES[0])
    _plot_accuracy(results, out / FIGURES[1])
    _plot_film_diagnostics(runs, out / FIGURES[2])
    written += [out / name for name in FIGURES]
    return written
