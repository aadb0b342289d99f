"""scripts/bench_meta.py's own logic: learn2learn's MAML loaded from a source tree without its
package __init__, and the ratios taken per round against the right reference."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_meta.py"
_spec = importlib.util.spec_from_file_location("bench_meta", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)


def _source_tree(root: Path) -> Path:
    """A learn2learn-shaped tree whose package __init__ fails, as the real one does without
    its compiled parts and torchvision."""
    package = root / "learn2learn"
    (package / "utils").mkdir(parents=True)
    (package / "algorithms").mkdir()
    (package / "__init__.py").write_text("raise ImportError('needs torchvision')\n")
    (package / "algorithms" / "__init__.py").write_text("raise ImportError('needs lightning')\n")
    (package / "utils" / "__init__.py").write_text("def clone_module(m):\n    return m\n")
    (package / "algorithms" / "base_learner.py").write_text("class BaseLearner:\n    pass\n")
    (package / "algorithms" / "maml.py").write_text(
        "from learn2learn.algorithms.base_learner import BaseLearner\n"
        "from learn2learn.utils import clone_module\n"
        "class MAML(BaseLearner):\n    clone = staticmethod(clone_module)\n"
    )
    return root


@pytest.fixture
def no_learn2learn_modules():
    yield
    for name in [name for name in sys.modules if name.split(".")[0] == "learn2learn"]:
        del sys.modules[name]


@pytest.mark.usefixtures("no_learn2learn_modules")
def test_learn2learn_maml_is_loaded_from_its_three_files_without_the_package_init(
    tmp_path: Path,
) -> None:
    maml = bench.learn2learn_maml(_source_tree(tmp_path))
    assert maml.__name__ == "MAML" and maml.__module__ == "learn2learn.algorithms.maml"
    assert [base.__name__ for base in maml.__mro__[1:-1]] == ["BaseLearner"]
    assert maml.clone("x") == "x"


@pytest.mark.usefixtures("no_learn2learn_modules")
def test_a_folder_without_learn2learn_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="has no learn2learn/utils/__init__.py"):
        bench.learn2learn_maml(tmp_path)


def test_ratios_are_medians_of_same_round_ratios_against_learn2learn_and_channels_last_plain():
    """Meta-batch 4; two rounds. l2l-maml 2 s then 4 s a step, plain-cl 1 s then 1 s, maml 1 s
    then 8 s: per round maml is 2x then 0.5x l2l (median 1.25), plain-cl 2x then 4x (3)."""
    speed = [
        {
            "step_s": {"l2l-maml": [2.0, 4.0], "plain-cl": [1.0, 1.0], "maml": [1.0, 8.0]},
            "setup_s": {"l2l-maml": 0.0, "plain-cl": 0.0, "maml": 0.5},
        }
    ]
    summary = bench.summarise(speed, {}, 4)
    assert summary["maml"]["vs_maml"] == pytest.approx(1.25)
    assert summary["maml"]["tasks_per_s"] == pytest.approx((4.0 + 0.5) / 2)
    assert summary["plain-cl"]["vs_maml"] == pytest.approx(3.0)
    assert summary["l2l-maml"]["vs_plain"] == pytest.approx((0.5 + 0.25) / 2)
    assert "peak_mib" not in summary["maml"]
