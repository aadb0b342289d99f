"""The `metafilm` command: train, pretrain, evaluate, report, sweep, data, adapt, predict,
export.

Exit status 0 on success, 1 with a one-line `metafilm: error: ...` for anything a user's config,
files or data can cause (no traceback), 2 for a malformed command line, 130 when interrupted
(Ctrl-C) and 143 when terminated (SIGTERM), each with a line saying what is kept and how to go
on. Genuine bugs still show their traceback.

One job, the command line; most of its length is the help text of every command and option.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shlex
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from episodes import CacheError, ChecksumError, DownloadError, load_omniglot
from metafilm.checkpoint import load_checkpoint
from metafilm.config import load_config
from metafilm.distributed import launched, process_group
from metafilm.errors import (
    USER_ERRORS,
    CheckpointError,
    ConfigError,
    DataError,
    ReportError,
)
from metafilm.evaluation import evaluate_checkpoint, evaluate_lake, load_trained
from metafilm.export import export_onnx
from metafilm.predict import (
    BATCH,
    predict_files,
    prediction_table,
    query_files,
    read_support,
    write_predictions,
)
from metafilm.report import episode_classes, paired_line, write_report
from metafilm.rundir import LAST, PRETRAIN_CHECKPOINT, REPORT_DIR, resolve_checkpoint
from metafilm.stats import accuracy_summary
from metafilm.stopping import Terminated, handle_signals
from metafilm.sweep import Arm, run_sweep
from metafilm.task_model import BATCH_NORM, TaskModel, adapt_checkpoint
from metafilm.train import pretrain_run, train

RUNS_DIR = Path("runs")


class BarProgress:
    """A tqdm bar per phase with ETA and the smoothed loss and accuracy."""

    def __init__(self, unit: str = "step") -> None:
        self.bar: tqdm | None = None
        self.smoothed: dict[str, float] = {}
        self.unit = unit

    def start(self, phase: str, done: int, total: int, unit: str | None = None) -> None:
        self.bar = tqdm(
            total=total, initial=done, desc=phase, unit=unit or self.unit, mininterval=0.5
        )
        self.smoothed = {}

    def update(self, done: int, metrics: Mapping[str, float]) -> None:
        for key in ("loss", "accuracy"):
            if key in metrics:
                old = self.smoothed.get(key, metrics[key])
                self.smoothed[key] = 0.9 * old + 0.1 * metrics[key]
        assert self.bar is not None
        if self.smoothed:
            self.bar.set_postfix(
                loss=f"{self.smoothed.get('loss', float('nan')):.3f}",
                acc=f"{self.smoothed.get('accuracy', float('nan')):.3f}",
                refresh=False,
            )
        self.bar.update(done - self.bar.n)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _LineAboveBars(logging.Handler):
    """Log lines to stderr, each on a line of its own above a progress bar, never appended to it
    (tqdm clears the bar, writes the line, then draws the bar again)."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="the TOML config file (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config setting, validated like the file (repeatable), "
        "e.g. --set model.width=32 --set train.steps=500",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metafilm",
        description="Few-shot meta-learning with FiLM adaptation: train, evaluate, report.",
        epilog="Example: metafilm train configs/quickstart.toml && "
        "metafilm evaluate runs/quickstart && metafilm report runs/quickstart. "
        "Exit status: 0 success, 1 a config, data, checkpoint or run-directory problem (one "
        "line on stderr), 2 a malformed command line, 130 interrupted, 143 terminated.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train_parser = commands.add_parser(
        "train",
        help="meta-train from a config",
        description="Meta-train from a TOML config into a run directory (config.toml, "
        "metrics.jsonl, last.pt, best.pt, tensorboard/). With pretrain.enabled (the default for "
        "model.backbone_mode = 'frozen') the backbone is first pretrained into the run's "
        "backbone.pt, unless pretrain.backbone names a file written by 'metafilm pretrain'. "
        "Under torchrun (e.g. 'torchrun "
        "--nproc_per_node=2 -m metafilm train CONFIG') each process takes an equal share of "
        "every meta-batch; see docs/distributed.md.",
    )
    _add_config_arguments(train_parser)
    train_parser.add_argument(
        "--out",
        type=Path,
        metavar="RUN_DIR",
        help="run directory to write (default: runs/<config file name>)",
    )
    train_parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in RUN_DIR from its last checkpoint (same config; train.steps "
        "may be raised), reaching the same weights as an uninterrupted run",
    )
    train_parser.add_argument(
        "--force",
        action="store_true",
        help="start over in a run directory metafilm created (it carries a .metafilm-run "
        "marker), deleting only the files metafilm wrote there; any other folder is refused",
    )

    pretrain_parser = commands.add_parser(
        "pretrain",
        help="pretrain a backbone for later runs to start from",
        description="Pretrain the backbone by classification over the training classes (the "
        "[pretrain] section, with the training augmentation of [data]), checkpointed in "
        "RUN_DIR/pretrain.pt, and save the backbone chosen on the validation episodes as "
        "RUN_DIR/backbone.pt, to be named by pretrain.backbone in frozen or outer-trained "
        "configs. ('metafilm train' does this by itself with pretrain.enabled when "
        "pretrain.backbone is empty.)",
    )
    _add_config_arguments(pretrain_parser)
    pretrain_parser.add_argument(
        "--out",
        type=Path,
        metavar="RUN_DIR",
        help="directory to write (default: runs/<config file name>-pretrain)",
    )
    pretrain_parser.add_argument(
        "--resume",
        action="store_true",
        help="continue pretraining in RUN_DIR from pretrain.pt, reaching the same weights as an "
        "uninterrupted run",
    )
    pretrain_parser.add_argument(
        "--force",
        action="store_true",
        help="start over in a directory metafilm created, deleting only the files it wrote",
    )

    eval_parser = commands.add_parser(
        "evaluate",
        help="test a trained run on fixed seeded episodes",
        description="Evaluate a checkpoint on fixed seeded episodes for every combination of "
        "--ways and --shots; write the per-episode accuracies and the protocol to "
        "<run dir>/eval/*.json. Options left out take the run's [eval] config.",
    )
    eval_parser.add_argument(
        "source", type=Path, metavar="RUN_DIR|CHECKPOINT", help="a run directory or a .pt file"
    )
    eval_parser.add_argument(
        "--checkpoint",
        choices=("auto", "best", "last"),
        default="auto",
        help="which checkpoint of a run directory: best.pt, last.pt, or auto (best.pt if the "
        "run validated, else last.pt); default auto",
    )
    eval_parser.add_argument(
        "--ways", type=int, nargs="+", metavar="W", help="test ways, one or more (e.g. 5 20)"
    )
    eval_parser.add_argument(
        "--shots", type=int, nargs="+", metavar="K", help="test shots, one or more (e.g. 1 5)"
    )
    eval_parser.add_argument("--query", type=int, metavar="Q", help="query images per class")
    eval_parser.add_argument("--episodes", type=int, metavar="N", help="test episodes per setting")
    eval_parser.add_argument(
        "--seed", type=int, metavar="S", help="seed of the fixed episodes (same seed, same tasks)"
    )
    eval_parser.add_argument(
        "--split", metavar="SPLIT", help="dataset split to test on (e.g. test, val)"
    )
    eval_parser.add_argument(
        "--alphabets",
        nargs="+",
        metavar="ALPHABET",
        help="Omniglot: test on these alphabets of the split alone (e.g. a run's held-out "
        "validation alphabets: --split background --alphabets Balinese Tifinagh ...)",
    )
    eval_parser.add_argument(
        "--within-alphabet",
        action="store_true",
        default=None,
        help="Omniglot: draw each episode's classes from one alphabet (Lake et al.'s "
        "within-alphabet tasks)",
    )
    eval_parser.add_argument(
        "--inner-steps",
        type=int,
        metavar="N",
        help="inner-loop steps at test time (default: the run's eval.inner_steps)",
    )
    eval_parser.add_argument(
        "--bn-mode",
        choices=("episode", "running"),
        help="batch norm at test time: episode (the test episode's statistics, transductive) or "
        "running (the statistics kept in training; only for models trained with model.bn_mode "
        "= 'running'); default: the run's eval.bn_mode",
    )
    eval_parser.add_argument(
        "--lake",
        action="store_true",
        help="test on the 20 runs of Lake et al.'s one-shot challenge (20-way 1-shot within an "
        "alphabet) instead of seeded episodes, and report the error rate over its 400 items; "
        "only --checkpoint, --inner-steps, --bn-mode and --data-root apply",
    )
    eval_parser.add_argument(
        "--data-root",
        metavar="DIR",
        help="data root to read instead of the run's data.root (else METAFILM_DATA_ROOT)",
    )

    report_parser = commands.add_parser(
        "report",
        help="Markdown / JSON / PNG report of runs",
        description="Write report.md, report.json and PNG figures (training curves, accuracy "
        "per setting with 95% CI, FiLM diagnostics) from the saved files of one or more runs.",
    )
    report_parser.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR", help="run dirs")
    report_parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="output directory (default: RUN_DIR/report for one run; required for several): "
        "a new folder or an earlier report, never a folder with other files",
    )
    report_parser.add_argument(
        "--compare-published",
        action="store_true",
        help="add the published results for the same benchmark and setting, with their protocols",
    )
    sweep_parser = commands.add_parser(
        "sweep",
        help="train, evaluate and compare one run per point of a grid of settings",
        description="Train one run per combination of the --grid values (one after another, "
        "each into OUT/<key=value,...>), evaluate each on the validation split and the test "
        "split with the config's [eval] protocol, and write a comparison (OUT/sweep.md, "
        "sweep.json, sweep_accuracy.png) plus the full report of all arms (OUT/report). Running "
        "the same command again resumes: finished arms and evaluations are kept, an interrupted "
        "arm continues from its last checkpoint.",
    )
    _add_config_arguments(sweep_parser)
    sweep_parser.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="SECTION.KEY=V1,V2,...",
        help="a setting and the values to try (repeatable: every combination is an arm), "
        "e.g. --grid outer.film_l2=0,1e-4,1e-2 --grid model.encoder=linear,mlp,none",
    )
    sweep_parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="directory of the sweep"
    )
    sweep_parser.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="an ablation instead of a grid: the base config's arm ('base'), then each --grid "
        "value with every other setting left at the base config's",
    )
    data_parser = commands.add_parser(
        "data",
        help="verify Omniglot and build its cache (optionally downloading it first)",
        description="Verify the Omniglot zips under the data root by checksum and decode them "
        "into the cache once, so that training starts at once. With --download, missing zips are "
        "first fetched from the original release (md5-checked, resumable).",
    )
    data_parser.add_argument(
        "--root", type=Path, metavar="DIR", help="data root (default: METAFILM_DATA_ROOT)"
    )
    data_parser.add_argument(
        "--cache-dir", type=Path, metavar="DIR", help="cache folder (default: METAFILM_CACHE_DIR)"
    )
    data_parser.add_argument(
        "--image-size", type=int, default=28, metavar="PX", help="cached image size (default 28)"
    )
    data_parser.add_argument(
        "--download", action="store_true", help="fetch missing zips from the original release"
    )
    adapt_parser = commands.add_parser(
        "adapt",
        help="adapt a trained model to your labelled images and save the task model",
        description="Adapt a trained model to a support set (a folder with one subfolder of "
        "images per class, any number each) with the run's own task encoder and inner loop, and "
        "save the adapted task (FiLM deviations, prototypes, class names: kilobytes, loaded "
        "without running code) for metafilm predict --task and metafilm export.",
    )
    adapt_parser.add_argument(
        "source", type=Path, metavar="RUN_DIR|CHECKPOINT", help="a run directory or a checkpoint"
    )
    _add_support_arguments(adapt_parser)
    adapt_parser.add_argument(
        "--out", type=Path, required=True, metavar="TASK", help="the task file to write"
    )
    predict_parser = commands.add_parser(
        "predict",
        help="label images with a model adapted to your support set, or with a task model",
        description="Label image files (or every image under folders): either adapt a trained "
        "run to --support first (metafilm predict RUN --support DIR QUERY...), or use a task "
        "model written by metafilm adapt (metafilm predict --task TASK QUERY...). Prints file, "
        "predicted class, its probability and the runners-up; --out writes every probability.",
    )
    predict_parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="[RUN] then query image files or folders"
    )
    _add_support_arguments(predict_parser, required=False)
    predict_parser.add_argument(
        "--task", type=Path, metavar="TASK", help="a task model (then no RUN and no --support)"
    )
    predict_parser.add_argument(
        "--checkpoint-file",
        type=Path,
        metavar="PT",
        help="with --task: the checkpoint it was adapted from, if it moved",
    )
    predict_parser.add_argument(
        "--out", type=Path, metavar="FILE", help="write every class probability (.json or .csv)"
    )
    export_parser = commands.add_parser(
        "export",
        help="export a task model as one standalone ONNX network",
        description="Write a task model as one ONNX network (FiLM folded into the batch norms, "
        "the head and its prototypes included) that takes float images in [0, 1].",
    )
    export_parser.add_argument(
        "task", type=Path, metavar="TASK", help="a task model written by metafilm adapt"
    )
    export_parser.add_argument("--onnx", type=Path, required=True, metavar="FILE")
    export_parser.add_argument(
        "--checkpoint-file",
        type=Path,
        metavar="PT",
        help="the checkpoint the task was adapted from, if it moved",
    )
    return parser


def _add_support_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument(
        "--support",
        type=Path,
        required=required,
        metavar="DIR",
        help="the labelled images: one subfolder per class",
    )
    parser.add_argument(
        "--checkpoint",
        choices=("auto", "best", "last"),
        default="auto",
        help="which checkpoint of a run directory (default: best if validated, else last)",
    )


def _adapted_to_support(source: Path, support: Path, which: str) -> TaskModel:
    """A run's model adapted to the support folder, with a line saying what was done."""
    checkpoint = resolve_checkpoint(source, which)
    trained = load_trained(checkpoint)
    channels, size, _ = trained.learner.image_shape
    try:
        images = read_support(support, size, channels)
    except (FileNotFoundError, ValueError) as error:
        raise DataError(str(error)) from None
    task = adapt_checkpoint(checkpoint, images)
    counts = ", ".join(f"{name} {len(batch)}" for name, batch in images.items())
    steps = trained.adapt().inner_steps
    print(
        f"adapted {checkpoint} to {len(images)} classes of {support} ({counts} images) with "
        f"its {trained.config.model.encoder} task encoder and {steps} inner step(s)",
        file=sys.stderr,
    )
    return task


def _run_adapt(args: argparse.Namespace) -> None:
    task = _adapted_to_support(args.source, args.support, args.checkpoint)
    path = task.save(args.out)
    kilobytes = path.stat().st_size / 1024
    print(
        f"task model written to {path} ({kilobytes:.1f} KiB; it needs {task.checkpoint}). "
        f"Next: metafilm predict --task {path} IMAGES..."
    )


def _run_predict(args: argparse.Namespace) -> None:
    if args.task is not None:
        if args.support is not None:
            raise ConfigError("--task already holds the support set: drop --support")
        task = TaskModel.load(args.task, args.checkpoint_file)
        queries = args.paths
    else:
        if args.support is None:
            raise ConfigError("name a support set (RUN --support DIR) or a task model (--task)")
        if len(args.paths) < 2:
            raise ConfigError("give the run, then at least one query image or folder")
        task = _adapted_to_support(Path(args.paths[0]), args.support, args.checkpoint)
        queries = args.paths[1:]
    files = query_files(queries)
    print(f"batch norm: {BATCH_NORM}", file=sys.stderr)
    bar = tqdm(total=len(files), desc="predict", unit="image", disable=len(files) <= BATCH)
    try:
        predictions = predict_files(task, files, on_batch=lambda done: bar.update(done - bar.n))
    except (FileNotFoundError, ValueError) as error:
        raise DataError(str(error)) from None
    finally:
        bar.close()
    print(prediction_table(predictions, task.class_names))
    if args.out is not None:
        written = write_predictions(predictions, task.class_names, args.out)
        print(f"every class probability of {len(predictions)} files written to {written}")


def _run_export(args: argparse.Namespace) -> None:
    task = TaskModel.load(args.task, args.checkpoint_file)
    path = export_onnx(task, args.onnx)
    kilobytes = path.stat().st_size / 1024
    print(f"ONNX network of {task.ways} classes written to {path} ({kilobytes:.0f} KiB)")


def _run_data(args: argparse.Namespace) -> None:
    try:
        for split in ("background", "evaluation"):
            classes = load_omniglot(
                args.root,
                split,
                image_size=args.image_size,
                cache_dir=args.cache_dir,
                download=args.download,
            )
            print(
                f"omniglot {split}: {classes.num_classes} characters, {len(classes.images)} "
                f"images at {args.image_size}x{args.image_size}, verified and cached"
            )
    except (FileNotFoundError, ValueError, ChecksumError, CacheError, DownloadError) as error:
        raise DataError(str(error)) from None


def _run_train(args: argparse.Namespace) -> None:
    config = load_config(args.config, args.overrides)
    out = _run_dir(args)
    with process_group() as processes:
        if not processes.is_main:  # rank 0 speaks for the run; the others only report errors
            logging.getLogger("metafilm").setLevel(logging.WARNING)
        result = train(
            config,
            out,
            resume=args.resume,
            force=args.force,
            progress=BarProgress() if processes.is_main else None,
            processes=processes,
            stop=args.stop,
        )
    if not processes.is_main:
        return
    best = result.best_val_accuracy
    print(
        f"trained {result.step} steps into {out}"
        + ("" if best is None else f"; best validation accuracy {100 * best:.2f}%")
        + f". Next: metafilm evaluate {out}"
    )


def _run_pretrain(args: argparse.Namespace) -> None:
    config = load_config(args.config, args.overrides)
    out = _run_dir(args)
    path = pretrain_run(
        config,
        out,
        resume=args.resume,
        force=args.force,
        progress=BarProgress(),
        stop=args.stop,
    )
    print(f"pretrained backbone saved to {path}; use it with --set pretrain.backbone={path}")


def _run_evaluate(args: argparse.Namespace) -> None:
    checkpoint = resolve_checkpoint(args.source, args.checkpoint)
    overrides = {
        "ways": args.ways,
        "shots": args.shots,
        "query": args.query,
        "episodes": args.episodes,
        "seed": args.seed,
        "split": args.split,
        "alphabets": args.alphabets,
        "within_alphabet": args.within_alphabet,
        "inner_steps": args.inner_steps,
        "bn_mode": args.bn_mode,
    }

    def show_lake(path: Path, record: dict[str, Any]) -> None:
        per_run = " ".join(str(errors) for errors in record["errors_per_run"])
        print(
            f"Lake one-shot runs ({record['episodes']} runs of {record['ways']}-way 1-shot "
            f"within an alphabet): error rate {100 * record['error_rate']:.2f}% over "
            f"{record['episodes'] * record['ways']} items; errors per run: {per_run} -> {path}"
        )

    def show(path: Path, record: dict[str, Any]) -> None:
        summary = accuracy_summary(record["accuracies"])
        ci = "" if summary["ci95"] is None else f" ± {100 * summary['ci95']:.2f}"
        print(
            f"{record['ways']}-way {record['shots']}-shot on {episode_classes(record)!r}: "
            f"{100 * summary['mean']:.2f}%{ci} over {summary['episodes']} episodes -> {path}"
        )

    if args.lake:
        given = [
            f"--{key.replace('_', '-')}"
            for key, value in overrides.items()
            if value is not None and key not in ("inner_steps", "bn_mode")
        ]
        if given:
            raise ConfigError(f"--lake tests the fixed Lake runs: drop {', '.join(given)}")
        evaluate_lake(
            checkpoint,
            inner_steps=args.inner_steps,
            bn_mode=args.bn_mode,
            data_root=args.data_root,
            on_result=show_lake,
        )
        return
    evaluate_checkpoint(
        checkpoint,
        overrides,
        data_root=args.data_root,
        on_result=show,
        progress=BarProgress("episode"),
    )


def _run_report(args: argparse.Namespace) -> None:
    if args.out is None and len(args.runs) > 1:
        raise ReportError("a report of several runs needs --out DIR")
    out = args.out or args.runs[0] / REPORT_DIR
    pairs: list[str] = []
    replacing = (out / "report.md").is_file()
    written = write_report(
        args.runs,
        out,
        compare_published=args.compare_published,
        on_paired=lambda row: pairs.append(paired_line(row)),
    )
    print(
        f"report written to {written[0]} ({', '.join(path.name for path in written[1:])})"
        + ("; it replaced the earlier report there" if replacing else "")
    )
    for line in pairs:
        print(line)


def _run_sweep(args: argparse.Namespace) -> None:
    def announce(arm: Arm) -> BarProgress:
        print(f"arm {arm.name}", file=sys.stderr)
        return BarProgress()

    def show(arm: Arm, row: dict[str, Any]) -> None:
        results = ", ".join(
            f"{label} {100 * summary['mean']:.2f}%" for label, summary in row["results"].items()
        )
        print(f"{arm.name}: {results}")

    written = run_sweep(
        args.config,
        args.grid,
        args.out,
        overrides=args.overrides,
        one_at_a_time=args.one_at_a_time,
        progress=announce,
        on_arm=show,
        stop=args.stop,
    )
    print(f"sweep written to {written[0]} (report of every arm in {args.out / 'report'})")


COMMANDS = {
    "train": _run_train,
    "pretrain": _run_pretrain,
    "evaluate": _run_evaluate,
    "report": _run_report,
    "sweep": _run_sweep,
    "data": _run_data,
    "adapt": _run_adapt,
    "predict": _run_predict,
    "export": _run_export,
}


STOP_AT_STEPS = ("train", "pretrain", "sweep")
"""The commands that, on a first SIGTERM or Ctrl-C, stop at a step boundary with a checkpoint
(`metafilm.stopping`); the others stop at once. A distributed run stops at once too: its processes
could not agree on a step to stop at."""


def _run_dir(args: argparse.Namespace) -> Path:
    """The run directory of `train` or `pretrain` (`--out` or its default)."""
    stem = args.config.stem + ("-pretrain" if args.command == "pretrain" else "")
    return args.out or RUNS_DIR / stem


def _resume_command(args: argparse.Namespace) -> str:
    """The command line that continues the run `args` started (`train` or `pretrain`)."""
    words = ["metafilm", args.command, str(args.config), "--out", str(_run_dir(args))]
    for override in args.overrides:
        words += ["--set", override]
    return shlex.join([*words, "--resume"])


def _last_checkpoint(args: argparse.Namespace) -> str:
    """What a run being trained or pretrained has kept: its last checkpoint and step, if any."""
    path = _run_dir(args) / (LAST if args.command == "train" else PRETRAIN_CHECKPOINT)
    try:
        step = load_checkpoint(path)["step"]
    except CheckpointError:
        return "no checkpoint was written yet"
    return f"its last checkpoint {path} (step {step}) is intact"


def _interrupted(args: argparse.Namespace, why: str) -> str:
    """The line printed when a command is interrupted: what is kept and how to go on."""
    if args.command in ("train", "pretrain"):
        return f"metafilm: {why}; {_last_checkpoint(args)}: continue with {_resume_command(args)}"
    if args.command == "sweep":
        return (
            f"metafilm: {why}; finished arms and the last checkpoint of the arm in training "
            f"are kept: run the same metafilm sweep command again to resume"
        )
    return f"metafilm: {why}; every file is written whole, so none is half-written: run it again"


def _no_space(args: argparse.Namespace, error: OSError) -> str:
    """The line for a full disk: the file, what is intact, what to do."""
    where = f" writing {error.filename}" if error.filename else ""
    if args.command in ("train", "pretrain"):
        return (
            f"no space left on the device{where}; {_last_checkpoint(args)} (checkpoints are "
            f"replaced atomically): free some space, then continue with {_resume_command(args)}"
        )
    return f"no space left on the device{where}: free some space and run the command again"


def _warning_line(message: Warning | str, *where: object, **more: object) -> None:
    """A library warning on the command line: one line, without the source line it came from."""
    tqdm.write(f"metafilm: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `metafilm` command line; return the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "predict" or any(word.startswith("-") for word in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # query paths after an option: metafilm predict RUN --support DIR QUERY...
        args.paths += extra
    handler = _LineAboveBars()
    handler.setFormatter(logging.Formatter("%(message)s"))
    loggers = [logging.getLogger(name) for name in ("metafilm", "episodes")]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    deferred = args.command in STOP_AT_STEPS and not launched(os.environ)
    try:
        with handle_signals(deferred) as args.stop, warnings.catch_warnings():
            warnings.showwarning = _warning_line
            COMMANDS[args.command](args)
    except USER_ERRORS as error:
        print(f"metafilm: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a path that cannot be read or written: the user's to fix
        message = _no_space(args, error) if error.errno == errno.ENOSPC else str(error)
        print(f"metafilm: error: {message}", file=sys.stderr)
        return 1
    except Terminated:
        print(_interrupted(args, "terminated (SIGTERM)"), file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(_interrupted(args, "interrupted"), file=sys.stderr)
        return 130
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    return 0
