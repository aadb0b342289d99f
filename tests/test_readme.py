"""The README's Python snippets run as written, on the real Omniglot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

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
    trained = namespace.get("optimizer")
    assert trained is not None and trained.state, "the snippet's optimiser never stepped"
