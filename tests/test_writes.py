"""What the commands write, and where: nothing but our own files is replaced,
nothing half-written is left, and a refused write names the file the user chose and
the option that would send it elsewhere."""

import errno
import importlib
import os
import shutil
from pathlib import Path

import pytest
from cli_checks import assert_refused, run, snapshot
from tiny_models import random_weights, tiny_config, write_gguf, write_hf_checkpoint

from mlx_flashinfer import Layout, convert, load, make_prompt_cache, save_prompt_cache
from mlx_flashinfer.cli import main
from mlx_flashinfer.formats import staging
from mlx_flashinfer.prompt_cache import cache_metadata, load_prompt_cache

store_module = importlib.import_module("mlx_flashinfer.predictors.store")
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """A tiny GGUF and the layout of a tiny SiLU model with a chat template."""
    tmp = tmp_path_factory.mktemp("writes")
    config = tiny_config("llama", "relu", vocab_size=300)
    gguf = write_gguf(tmp / "tiny.gguf", config, random_weights(config))
    config = tiny_config("llama", "silu", hidden_size=64, intermediate_size=96)
    hf = write_hf_checkpoint(
        tmp / "hf", config, random_weights(config, seed=7), chat_template=TEMPLATE
    )
    layout = convert(hf, tmp / "layout", dtype="float16", progress=False)
    return {"gguf": gguf, "layout": layout}


def cache_prompt(layout, file, *more) -> list:
    return ["cache-prompt", "--model", layout, "--prompt-cache-file", file, *more]


# -- cache-prompt replaces only a prompt cache -----------------------------------------


def test_cache_prompt_never_replaces_a_file_that_is_not_a_prompt_cache(
    sources, tmp_path, capsys
):
    shutil.copy(sources["gguf"], tmp_path / "x.gguf")
    (tmp_path / "notes.safetensors").write_text("mine")
    before = snapshot(tmp_path)
    for name in ("x.gguf", "notes.safetensors"):
        argv = cache_prompt(sources["layout"], tmp_path / name, "-p", "alice")
        assert_refused(argv, f"{name}: exists and is not a prompt cache", capsys)
    assert snapshot(tmp_path) == before  # not a byte changed, nothing left beside
    model, tokenizer = load(sources["layout"])
    cache = make_prompt_cache(model)
    cache.feed(model, tokenizer.encode("alice"))
    with pytest.raises(FileExistsError, match="not a prompt cache"):
        save_prompt_cache(tmp_path / "x.gguf", cache, model)
    assert snapshot(tmp_path) == before


def test_cache_prompt_replaces_its_own_file(sources, tmp_path, capsys):
    file = tmp_path / "c.safetensors"
    for prompt in ("alice", "the queen said"):
        status, out, err = run(
            cache_prompt(sources["layout"], file, "-p", prompt), capsys
        )
        assert status == 0, err
        assert cache_metadata(file)["prompt"] == prompt
    model, tokenizer = load(sources["layout"])
    cached = load_prompt_cache(file, model)
    assert len(cached.tokens) == int(out.split("cached ")[1].split()[0])
    assert os.listdir(tmp_path) == ["c.safetensors"]


@pytest.mark.parametrize("case", ["a folder", "under a file", "no such folder"])
def test_a_prompt_cache_file_that_cannot_be_is_refused_before_the_prefill(
    case, sources, tmp_path, capsys, monkeypatch
):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "kept.txt").write_text("mine")
    shutil.copy(sources["gguf"], tmp_path / "x.gguf")
    file, says = {
        "a folder": (tmp_path / "folder", "folder: is a folder; give a file name"),
        "under a file": (tmp_path / "x.gguf" / "c", "x.gguf is a file, not a folder"),
        "no such folder": (tmp_path / "nope" / "c", "no folder"),
    }[case]
    loaded = []
    monkeypatch.setattr("mlx_flashinfer.loader.load", lambda *a, **k: loaded.append(1))
    before = snapshot(tmp_path)
    err = assert_refused(cache_prompt(sources["layout"], file, "-p", "a"), says, capsys)
    assert ".tmp" not in err and not loaded  # the model was never loaded
    assert snapshot(tmp_path) == before


# -- refused writes: the file the user chose, the option to change --------------------


def read_only(monkeypatch, module) -> None:
    """`open` for writing fails in `module` as on a read-only file system."""

    def refuse(path, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(module, "open", refuse, raising=False)


def test_a_read_only_prompt_cache_file_names_it_and_its_option(
    sources, tmp_path, capsys, monkeypatch
):
    file = tmp_path / "c.safetensors"
    read_only(monkeypatch, staging)
    err = assert_refused(
        cache_prompt(sources["layout"], file, "-p", "alice"), "Read-only", capsys
    )
    assert f"{file}: Read-only file system; write to another --prompt-cache-file" in err
    assert ".tmp" not in err and "--cache-dir" not in err
    assert os.listdir(tmp_path) == []


def test_a_read_only_layout_tells_train_predictor_to_train_a_copy(
    sources, tmp_path, capsys, monkeypatch
):
    layout = Path(shutil.copytree(sources["layout"], tmp_path / "layout"))
    before = snapshot(layout)

    def refuse(path, *args):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    argv = ["train-predictor", layout, "--tokens", 600]
    says = f"{layout}: Read-only file system; write into a copy of the layout"
    # refused at the end (the disk turned read-only meanwhile), or checked first
    monkeypatch.setattr(store_module, "_write_tensors", refuse)
    err = assert_refused(argv, says, capsys)
    assert f"cp -r {layout} COPY" in err and "--cache-dir" not in err
    monkeypatch.setattr(Path, "touch", refuse)
    assert_refused(argv, says, capsys)
    assert snapshot(layout) == before


# -- convert: its source, its destination ----------------------------------------------


def test_convert_says_a_layout_is_converted_already(sources, tmp_path, capsys):
    argv = ["convert", sources["layout"], tmp_path / "again", "--quiet"]
    assert_refused(argv, "already a layout (converted): use it as it is", capsys)
    with pytest.raises(ValueError, match="already a layout"):
        convert(sources["layout"], tmp_path / "again", progress=False)
    assert os.listdir(tmp_path) == []


def test_convert_under_a_file_names_the_file(sources, tmp_path, capsys):
    shutil.copy(sources["gguf"], tmp_path / "file.gguf")
    before = snapshot(tmp_path)
    argv = ["convert", sources["gguf"], tmp_path / "file.gguf" / "sub", "--quiet"]
    err = assert_refused(argv, "file.gguf is a file, not a folder", capsys)
    assert "choose another DST" in err
    assert snapshot(tmp_path) == before


def test_the_api_converts_default_as_the_cli_does(sources, tmp_path, monkeypatch):
    monkeypatch.setattr(
        "mlx_flashinfer.formats.default_model.default_gguf_path",
        lambda: sources["gguf"],
    )
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()  # a folder so named is "./default", not this
    out = convert("default", "my-layout", progress=False)
    layout = Layout.open(out)
    assert layout.manifest["source"]["path"] == str(sources["gguf"].resolve())
    assert layout.manifest["source"]["kind"] == "gguf"
    assert main(["convert", "default", "cli-layout", "--quiet"]) == 0
    assert Layout.open("cli-layout").weights_id == layout.weights_id
