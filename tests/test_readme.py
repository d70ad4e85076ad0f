"""The README's Python example runs as written."""

import re
from pathlib import Path

import pytest

from mlx_flashinfer.formats.default_model import default_gguf_path
from mlx_flashinfer.formats.model_cache import CACHE_ENV, cache_name

README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_block() -> str:
    """The first ```python block of the "## Python API" section."""
    section = README.read_text(encoding="utf-8").split("\n## Python API\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README: no python block under '## Python API'"
    return match.group(1)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["flash", "dense"])
def test_the_python_api_example_runs(
    mode, default_layout, tmp_path, monkeypatch, capsys
):
    # the session's converted default model stands in for the cache's, so the example
    # does not convert it a second time
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    (tmp_path / cache_name(default_gguf_path())).symlink_to(default_layout)
    monkeypatch.chdir(tmp_path)
    code = python_api_block()
    if mode == "dense":  # the budget omitted, as the example's comment offers
        assert 'load(None, memory_budget="100%")' in code
        code = code.replace('load(None, memory_budget="100%")', "load(None)")
    exec(compile(code, str(README), "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    assert "Paris" in out
    assert ("MB/token, hit rate" in out) == (mode == "flash")
