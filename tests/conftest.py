"""Shared fixtures: the embedded default model, converted once per test session."""

from pathlib import Path

import pytest

from mlx_flashinfer import convert
from mlx_flashinfer.default_model import default_gguf_path

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def default_layout(tmp_path_factory) -> Path:
    try:
        gguf = default_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return convert(gguf, tmp_path_factory.mktemp("default") / "smollm2", progress=False)
