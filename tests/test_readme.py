"""The README's Python snippets run as written, on the real Omniglot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.M | re.S)

pytestmark = [pytest.mark.slow, pytest.mark.data, pytest.mark.usefixtures("one_thread")]


def test_the_readme_has_its_snippets():
    assert len(SNIPPETS) == 2


@pytest.mark.parametrize("snippet", SNIPPETS, ids=["film_maml", "library"])
def test_readme_snippet_runs(snippet, data_root, omniglot_cache_dir, monkeypatch):
    monkeypatch.setenv("METAFILM_DATA_ROOT", str(data_root))
    monkeypatch.setenv("METAFILM_CACHE_DIR", str(omniglot_cache_dir))
    namespace: dict = {}
    exec(compile(snippet, str(README), "exec"), namespace)
    optimizer = namespace["optimizer"]
    loop = int(re.search(r"for step in range\((\d+)\)", snippet).group(1))
    steps = {int(state["step"]) for state in optimizer.state.values()}
    assert steps == {loop}, "every parameter took one optimiser step per loop iteration"
    if "maml" in namespace:  # the README's claims: adapt leaves your weights as they are...
        maml, model, task = namespace["maml"], namespace["model"], namespace["task"]
        before = {key: value.detach().clone() for key, value in model.named_parameters()}
        learner = maml.clone()
        learner.adapt(F.cross_entropy(learner(task.support_x), task.support_y))
        after = dict(model.named_parameters())
        assert all(torch.equal(before[key], after[key]) for key in before)
        # ... and the query loss back-propagates to them.
        optimizer.zero_grad()
        F.cross_entropy(learner(task.query_x), task.query_y).backward()
        first = next(model.parameters())
        assert first.grad is not None and float(first.grad.abs().sum()) > 0
