"""The boundaries of docs/architecture.md, read off the source: what must never import what.

Every `import` of `metafilm/` and `episodes/` (at module level or inside a function) is an edge;
a rule forbids a module to reach others through any chain of such edges. Edges into a package's
`__init__` are not followed (Python imports the package before any of its modules anyway, and
`metafilm/__init__.py`, the public API, imports everything). A broken rule fails with the file and
line of the import that starts the chain.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("metafilm", "episodes")
MATHS = (
    "metafilm.specs",
    "metafilm.film",
    "metafilm.inner",
    "metafilm.encoder",
    "metafilm.heads",
    "metafilm.backbones",
    "metafilm.learner",
    "metafilm.meta",
    "metafilm.tiebreak",
    "metafilm.maml",
    "metafilm.interop",
    "metafilm.any_backbone",
)
"""The maths: pure functions and modules over tensors."""
DISK = (
    "metafilm.config",
    "metafilm.checkpoint",
    "metafilm.rundir",
    "metafilm.markers",
    "metafilm.prefix_cache",
    "metafilm.assemble",
    "metafilm.network_loader",
    "metafilm.task_model",
    "metafilm.predict",
    "metafilm.export",
    "episodes.folder",
    "metafilm.distributed",
    "metafilm.train",
    "metafilm.evaluation",
    "metafilm.report",
    "metafilm.figures",
    "metafilm.published",
    "metafilm.sweep",
    "metafilm.cli",
    "episodes.integrity",
    "episodes.omniglot",
    "episodes.miniimagenet",
    "episodes.lake",
    "episodes.download",
    "pathlib",
    "shutil",
    "tempfile",
    "tomllib",
    "json",
    "pickle",
    "zipfile",
)
"""What reads or writes files (modules of the project, and the standard library's)."""
ABOVE_TRAINING = ("metafilm.report", "metafilm.evaluation", "metafilm.sweep", "metafilm.cli")


@dataclass(frozen=True)
class Rule:
    importers: tuple[str, ...]
    forbidden: tuple[str, ...]
    reason: str


RULES = (
    Rule(("episodes", "episodes.*"), ("metafilm",), "episodes never imports metafilm"),
    Rule(MATHS, DISK, "the maths never touch the disk"),
    Rule(("metafilm.stats",), ("metafilm", "episodes"), "stats imports nothing of metafilm"),
    Rule(("metafilm.errors",), ("metafilm", "episodes"), "errors import nothing"),
    Rule(
        ("metafilm.train",),
        (*ABOVE_TRAINING, "metafilm.figures", "metafilm.published"),
        "train never imports report or evaluation",
    ),
    Rule(
        ("metafilm.evaluation",),
        ("metafilm.train", "metafilm.report", "metafilm.sweep", "metafilm.cli"),
        "evaluation never imports train or report",
    ),
    Rule(
        ("metafilm.report", "metafilm.figures", "metafilm.published"),
        ("metafilm.train", "metafilm.evaluation", "metafilm.sweep", "metafilm.cli"),
        "report never imports train or evaluation",
    ),
    Rule(
        ("metafilm.rundir", "metafilm.assemble"),
        ("metafilm.train", *ABOVE_TRAINING),
        "rundir imports neither train nor report",
    ),
    Rule(("metafilm.*",), ("metafilm.cli",), "only __main__ imports cli"),
    Rule(("metafilm.*",), ("metafilm.sweep",), "only cli (and the public API) imports sweep"),
)
EXEMPT = {
    "only __main__ imports cli": {"metafilm.cli", "metafilm.__main__", "metafilm"},
    "only cli (and the public API) imports sweep": {
        "metafilm.sweep",
        "metafilm.cli",
        "metafilm.__main__",
        "metafilm",
    },
}


@dataclass(frozen=True)
class Edge:
    line: int
    target: str


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_sources() -> dict[str, tuple[str, str]]:
    """`{module: (path relative to the repository, source)}` of every module of `PACKAGES`."""
    return {
        module_name(path): (path.relative_to(ROOT).as_posix(), path.read_text(encoding="utf-8"))
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def import_edges(module: str, source: str, modules: frozenset[str] | set[str]) -> list[Edge]:
    """Every import of `source` (the module `module`), in the order written; `from P import x`
    is an edge to `P.x` where that is a module, else to `P`."""
    edges = []
    package = module if module in PACKAGES else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            edges += [Edge(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                name = f"{base}.{alias.name}"
                edges.append(Edge(node.lineno, name if name in modules else base))
    return sorted(edges, key=lambda edge: edge.line)


def graph(sources: Mapping[str, tuple[str, str]]) -> dict[str, list[Edge]]:
    modules = set(sources)
    return {
        module: import_edges(module, source, modules) for module, (_, source) in sources.items()
    }


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(
        name == pattern
        or name.startswith(pattern.removesuffix("*") if pattern.endswith("*") else pattern + ".")
        for pattern in patterns
    )


def violations(sources: Mapping[str, tuple[str, str]]) -> list[str]:
    """One line per module that reaches a module its rules forbid: where the chain starts."""
    edges = graph(sources)
    found = []
    for rule in RULES:
        for module in sorted(edges):
            if not _matches(module, rule.importers) or module in EXEMPT.get(rule.reason, ()):
                continue
            for first in edges[module]:
                chain = _reach(first.target, rule.forbidden, edges, {module})
                if chain is None:
                    continue
                through = f" through {' -> '.join(chain[:-1])}" if chain[:-1] else ""
                found.append(
                    f"{sources[module][0]}:{first.line}: {module} imports {chain[-1]}{through} "
                    f"({rule.reason})"
                )
                break
    return found


def _reach(
    target: str, forbidden: tuple[str, ...], edges: Mapping[str, list[Edge]], seen: set[str]
) -> list[str] | None:
    """The chain of modules from `target` to a forbidden one (None if there is none)."""
    if _matches(target, forbidden):
        return [target]
    if target in seen or target in PACKAGES or target not in edges:
        return None  # visited, a package's __init__, or outside the project
    seen.add(target)
    for edge in edges[target]:
        chain = _reach(edge.target, forbidden, edges, seen)
        if chain is not None:
            return [target, *chain]
    return None


def test_no_module_crosses_a_boundary() -> None:
    assert violations(read_sources()) == []


def test_the_check_reads_the_real_imports() -> None:
    sources = read_sources()
    edges = {(module, edge.target) for module, found in graph(sources).items() for edge in found}
    assert {
        ("metafilm.train", "metafilm.rundir"),
        ("metafilm.report", "metafilm.rundir"),
        ("metafilm.cli", "metafilm.evaluation"),
        ("metafilm.sweep", "metafilm.train"),
        ("metafilm.meta", "episodes.sampler"),
        ("metafilm.rundir", "metafilm"),  # `from metafilm import __version__`, in a function
    } <= edges
    named = {name for rule in RULES for name in (*rule.importers, *rule.forbidden)}
    project = [name for name in named if name.split(".")[0] in PACKAGES and "*" not in name]
    assert [name for name in project if name not in sources and name not in PACKAGES] == []


@pytest.mark.parametrize(
    ("module", "added", "expected"),
    [
        (
            "metafilm.train",
            "from metafilm.report import write_report",
            "metafilm/train.py:{line}: metafilm.train imports metafilm.report "
            "(train never imports report or evaluation)",
        ),
        (
            "metafilm.stats",
            "import metafilm.film",
            "metafilm/stats.py:{line}: metafilm.stats imports metafilm.film "
            "(stats imports nothing of metafilm)",
        ),
        (
            "metafilm.heads",
            "from metafilm import rundir",
            "metafilm/heads.py:{line}: metafilm.heads imports metafilm.rundir "
            "(the maths never touch the disk)",
        ),
    ],
)
def test_a_forbidden_import_fails_with_its_place(module: str, added: str, expected: str) -> None:
    sources = read_sources()
    path, source = sources[module]
    sources[module] = (path, f"{source}\n{added}\n")
    line = len(sources[module][1].splitlines())
    assert expected.format(line=line) in violations(sources)


def test_a_forbidden_import_is_found_through_other_modules() -> None:
    sources = read_sources()
    path, source = sources["metafilm.rundir"]
    sources["metafilm.rundir"] = (path, f"{source}\nimport metafilm.evaluation\n")
    found = violations(sources)
    assert any(
        line.startswith("metafilm/train.py:")
        and "metafilm.train imports metafilm.evaluation through metafilm.rundir" in line
        for line in found
    ), found


def test_the_public_api_hides_no_module() -> None:
    """`import metafilm.train as train` must give the module, not a function exported as `train`."""
    import metafilm

    modules = {name.rpartition(".")[2] for name in read_sources() if name.startswith("metafilm.")}
    assert sorted(modules & set(metafilm.__all__)) == []
