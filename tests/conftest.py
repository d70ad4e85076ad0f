"""Shared fixtures: the embedded default model, converted once per test session;
a private model cache for the whole session."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from mlx_flashinfer import convert
from mlx_flashinfer.formats.default_model import default_gguf_path
from mlx_flashinfer.formats.model_cache import CACHE_ENV

_SESSION_DIRS: list[str] = []


def pytest_configure(config):
    """No test, nor any subprocess a test starts, writes into the user's cache; and
    the layouts that test modules build once per session (tempfile.mkdtemp) go
    into one folder, removed at the end."""
    _SESSION_DIRS.append(tempfile.mkdtemp(prefix="flashinfer-test-cache-"))
    os.environ[CACHE_ENV] = _SESSION_DIRS[-1]
    _SESSION_DIRS.append(tempfile.mkdtemp(prefix="flashinfer-test-tmp-"))
    tempfile.tempdir = _SESSION_DIRS[-1]


def pytest_unconfigure(config):
    tempfile.tempdir = None
    for folder in _SESSION_DIRS:
        shutil.rmtree(folder, ignore_errors=True)


DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def default_layout(tmp_path_factory) -> Path:
    try:
        gguf = default_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return convert(gguf, tmp_path_factory.mktemp("default") / "smollm2", progress=False)
