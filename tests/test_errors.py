"""Every user error is one line and exit 2, case by case, and leaves nothing behind:
--force, cut and malformed checkpoints, damaged layouts, the disk's refusals, options
out of range."""

import errno
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from cli_checks import assert_refused, run, snapshot
from tiny_models import random_weights, tiny_config, write_gguf, write_hf_checkpoint

from mlx_flashinfer import Layout, convert, generate, load
from mlx_flashinfer.formats import staging
from mlx_flashinfer.formats.layout import MANIFEST, write_manifest
from mlx_flashinfer.formats.safetensors_stream import read_header
from mlx_flashinfer.generate import context_full, stream_generate
from mlx_flashinfer.model.nonfinite import NonFiniteError

# the package exports the function `convert`, which hides the module of that name
convert_module = importlib.import_module("mlx_flashinfer.formats.convert")
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """A tiny Hugging Face folder, the same model as GGUF, and its layout."""
    tmp = tmp_path_factory.mktemp("errors")
    config = tiny_config("llama", "relu")
    hf = write_hf_checkpoint(
        tmp / "hf", config, random_weights(config), chat_template=TEMPLATE
    )
    config = tiny_config("llama", "relu", vocab_size=300)
    gguf = write_gguf(tmp / "tiny.gguf", config, random_weights(config))
    layout = convert(hf, tmp / "layout", dtype="float32", progress=False)
    return {"hf": hf, "gguf": gguf, "layout": layout}


# -- convert --force -------------------------------------------------------------------


def force_case(case: str, where: Path, gguf: Path) -> list:
    """Set up `case` in `where`; return the convert argv (run from `where`)."""
    shutil.copy(gguf, where / "model.gguf")
    if case == "dst contains src":
        (where / "v").mkdir()
        shutil.move(where / "model.gguf", where / "v" / "model.gguf")
        (where / "v" / "notes.txt").write_text("mine")
        return ["v/model.gguf", "v"]
    if case == "dst is src":
        return ["model.gguf", "model.gguf"]
    if case == "dst is the working directory":
        return ["model.gguf", "."]
    if case == "dst holds other files":
        (where / "photos").mkdir()
        (where / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
        return ["model.gguf", "photos"]
    if case == "dst is a file":
        (where / "notes.txt").write_text("mine")
        return ["model.gguf", "notes.txt"]
    raise AssertionError(case)


FORCE_REFUSALS = {
    "dst contains src": "contains the source",
    "dst is src": "is the source itself",
    "dst is the working directory": "contains the source",
    "dst holds other files": "holds files that are not a layout",
    "dst is a file": "exists and is not a directory",
}


@pytest.mark.parametrize("case", sorted(FORCE_REFUSALS))
def test_force_replaces_nothing_but_a_layout(
    case, sources, tmp_path, capsys, monkeypatch
):
    argv = force_case(case, tmp_path, sources["gguf"])
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    for force in (["--force"], []):
        assert_refused(
            ["convert", *argv, "--quiet", *force], FORCE_REFUSALS[case], capsys
        )
        assert snapshot(tmp_path) == before  # not a byte lost, nothing left behind


def test_force_replaces_a_layout_once_the_new_one_is_complete(
    sources, tmp_path, monkeypatch
):
    dst = convert(sources["hf"], tmp_path / "out", dtype="float32", progress=False)
    before = snapshot(dst)

    def failing(source, out, *args):
        (out / "ffn.bin").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(convert_module, "_write_layout", failing)
    with pytest.raises(OSError, match="No space left"):
        convert(sources["hf"], dst, force=True, progress=False)
    assert snapshot(dst) == before and os.listdir(tmp_path) == ["out"]
    monkeypatch.undo()
    convert(sources["hf"], dst, dtype="bfloat16", force=True, progress=False)
    Layout.open(dst).verify()
    assert Layout.open(dst).dtype == "bfloat16" and os.listdir(tmp_path) == ["out"]


def test_racing_converts_without_force_one_wins_one_is_refused(sources, tmp_path):
    # both pass the check of DST before either renames: the rename itself must refuse
    both_written = threading.Barrier(2)
    real = convert_module._write_layout

    def in_step(*args):
        real(*args)
        both_written.wait(timeout=30)

    results = []

    def attempt(dtype):
        try:
            convert(sources["hf"], tmp_path / "out", dtype=dtype, progress=False)
            results.append(dtype)
        except FileExistsError as err:
            results.append(str(err))

    convert_module._write_layout, saved = in_step, real
    try:
        threads = [
            threading.Thread(target=attempt, args=(d,)) for d in ("float16", "float32")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        convert_module._write_layout = saved
    winners = [r for r in results if r in ("float16", "float32")]
    assert len(winners) == 1, results
    assert any("already exists" in r and "--force" in r for r in results), results
    assert Layout.open(tmp_path / "out").dtype == winners[0]
    assert os.listdir(tmp_path) == ["out"]


# -- bad checkpoints -------------------------------------------------------------------


@pytest.mark.parametrize("cut", [4, 24, 1000, "60%"])
def test_a_cut_gguf_is_one_line_everywhere(cut, sources, tmp_path, capsys):
    data = sources["gguf"].read_bytes()
    size = int(len(data) * 0.6) if cut == "60%" else cut
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:size])
    says = "not a readable GGUF file (truncated or corrupted"
    assert_refused(["convert", bad, tmp_path / "out", "--quiet"], says, capsys)
    assert_refused(["generate", "--model", bad, "-p", "a"], says, capsys)
    with pytest.raises(ValueError, match=r"not a readable GGUF file \(truncated"):
        load(bad)
    assert os.listdir(tmp_path) == ["cut.gguf"]


BAD_CONFIGS = {
    "a list": (lambda c: [c], "a JSON list, not an object"),
    "no hidden_size": (
        lambda c: {k: v for k, v in c.items() if k != "hidden_size"},
        "lacks hidden_size",
    ),
    '"two" layers': (
        lambda c: c | {"num_hidden_layers": "two"},
        "num_hidden_layers must be a positive integer, got 'two'",
    ),
    "0 heads": (
        lambda c: c | {"num_attention_heads": 0},
        "num_attention_heads must be a positive integer, got 0",
    ),
    "not JSON": (lambda c: "{'hidden_size': 16", "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_config_json_is_one_line(case, sources, tmp_path, capsys):
    src = Path(shutil.copytree(sources["hf"], tmp_path / "hf"))
    change, says = BAD_CONFIGS[case]
    changed = change(json.loads((src / "config.json").read_text()))
    text = changed if isinstance(changed, str) else json.dumps(changed)
    (src / "config.json").write_text(text)
    assert_refused(["convert", src, tmp_path / "out", "--quiet"], says, capsys)
    assert_refused(["generate", "--model", src, "-p", "a"], says, capsys)
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_a_malformed_tokenizer_or_template_fails_at_conversion(
    sources, tmp_path, capsys
):
    src = Path(shutil.copytree(sources["hf"], tmp_path / "hf"))
    (src / "tokenizer.json").write_text('{"model": {"type": "Nope"}}')
    argv = ["convert", src, tmp_path / "o", "--quiet"]
    assert_refused(argv, "tokenizer.json does not", capsys)
    shutil.copy(sources["hf"] / "tokenizer.json", src)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m.content "
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    assert_refused(argv, "the chat template fails", capsys)
    assert sorted(os.listdir(tmp_path)) == ["hf"]


# -- damaged layouts -------------------------------------------------------------------


def edit_manifest(layout: Path, change, restamp: bool) -> None:
    manifest = json.loads((layout / MANIFEST).read_text())
    change(manifest)
    if restamp:  # a crafted manifest, consistent with its own checksum
        write_manifest(layout, manifest)
    else:
        (layout / MANIFEST).write_text(json.dumps(manifest))


def rename_resident(name: str):
    def change(manifest):
        manifest["files"][name] = manifest["files"].pop(manifest["resident"])
        manifest["resident"] = name

    return change


DAMAGE = {
    "rope_theta edited": (
        lambda m: m["model_args"].update(rope_theta=20000.0),
        False,
        "manifest.json: checksum mismatch (edited or corrupted",
    ),
    "resident in ../": (
        rename_resident("../other/resident.safetensors"),
        True,
        "names '../other/resident.safetensors', outside the layout directory",
    ),
    "resident at /etc/hostname": (
        rename_resident("/etc/hostname"),
        True,
        "names '/etc/hostname', outside the layout directory",
    ),
    "unlisted ffn file": (
        lambda m: m["ffn"].update(file="elsewhere.bin"),
        True,
        "ffn.file 'elsewhere.bin' is not among its files",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_manifest_is_refused_on_open(case, sources, tmp_path, capsys):
    layout = Path(shutil.copytree(sources["layout"], tmp_path / "layout"))
    change, restamp, says = DAMAGE[case]
    edit_manifest(layout, change, restamp)
    for argv in (["inspect", layout], ["generate", "--model", layout, "-p", "a"]):
        assert_refused(argv, says, capsys)


def test_a_symlink_leading_out_is_refused(sources, tmp_path, capsys):
    layout = Path(shutil.copytree(sources["layout"], tmp_path / "layout"))
    (layout / "ffn.bin").unlink()
    (layout / "ffn.bin").symlink_to(sources["layout"] / "ffn.bin")
    assert_refused(["inspect", layout], "a symlink leading outside", capsys)


def test_a_tokenizer_damaged_after_conversion_is_refused_at_load(
    sources, tmp_path, capsys
):
    layout = Path(shutil.copytree(sources["layout"], tmp_path / "layout"))
    size = (layout / "tokenizer.json").stat().st_size
    (layout / "tokenizer.json").write_text("{" + " " * (size - 1))  # same size
    says = "tokenizer.json does not load"
    assert_refused(["generate", "--model", layout, "-p", "a"], says, capsys)
    assert_refused(["inspect", layout], "re-convert the model", capsys)
    shutil.copy(sources["layout"] / "tokenizer.json", layout)
    edit_manifest(
        layout, lambda m: m["tokenizer"].update(chat_template="{% if %}"), True
    )
    says = "the chat template fails"
    assert_refused(["generate", "--model", layout, "-p", "a"], says, capsys)


def poison(layout: Path, where: str) -> None:
    """Weights of the same size that make inf or nan: ffn.bin all 0xff bytes (NaN in
    float16 and float32), NaN in one norm, or a finite value so large that layer 1's
    attention overflows."""
    if where == "ffn":
        size = (layout / "ffn.bin").stat().st_size
        (layout / "ffn.bin").write_bytes(b"\xff" * size)
        return
    name, value = {
        "norm": ("layers.1.post_attention_layernorm.weight", np.nan),
        "overflow": ("layers.1.self_attn.v_proj.weight", 1e38),
    }[where]
    path = layout / "resident.safetensors"
    header, start = read_header(path)
    begin, end = header[name]["data_offsets"]
    with open(path, "r+b") as f:
        f.seek(start + begin)
        f.write(np.full((end - begin) // 4, value, np.float32).tobytes())


FLASH = [
    "--memory-budget",
    "10MB",
]  # roomy: a tiny model's 100% cannot hold a read buffer
NORM = "resident.safetensors: layers.1.post_attention_layernorm.weight: non-finite"
POISONED = {  # where, flash?, what the line says
    "ffn.bin, dense": ("ffn", [], "after 1 token: first in layer 0's FFN output"),
    "ffn.bin, flash": ("ffn", FLASH, "layer 0's gate rows: non-finite values"),
    "a NaN norm, dense": ("norm", [], NORM),
    "a NaN norm, flash": ("norm", FLASH, NORM),
    "overflow, dense": ("overflow", [], "after 1 token: first in layer 1, before"),
    "overflow, flash": ("overflow", FLASH, "after 1 token: first in layer 1, before"),
}


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("case", sorted(POISONED))
@pytest.mark.parametrize("prompt", ["alice", "alice said the queen was a cat"])
def test_non_finite_weights_stop_generation_naming_the_layer(
    case, prompt, sources, tmp_path, capsys
):
    where, mode, says = POISONED[case]
    if len(prompt) > 5:  # several tokens: prefill sees the values first
        says = says.replace("after 1 token", "after 7 tokens")
    layout = Path(shutil.copytree(sources["layout"], tmp_path / "layout"))
    poison(layout, where)
    Layout.open(layout)  # sizes and manifest intact: only the values tell
    argv = ["generate", "--model", layout, "-p", prompt, "-m", 4, *mode]
    err = assert_refused(argv, says, capsys)
    assert "may be corrupted" in err and "--verify" in err
    budget = "10MB" if mode else None
    with pytest.raises(NonFiniteError, match=re.escape(says)):
        model, tokenizer = load(layout, backend="numpy", memory_budget=budget)
        generate(model, tokenizer, prompt, max_tokens=2)


# -- the disk's refusals ---------------------------------------------------------------


def refuse_mkdir_under(folder: Path, monkeypatch) -> None:
    """Directories under `folder` cannot be made: a read-only file system."""
    real = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if Path(os.path.abspath(self)).is_relative_to(folder):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)


def test_a_read_only_destination_or_cache_is_one_line(
    sources, tmp_path, capsys, monkeypatch
):
    refuse_mkdir_under(tmp_path / "ro", monkeypatch)
    err = assert_refused(
        ["convert", sources["hf"], tmp_path / "ro" / "out"], "Read-only", capsys
    )
    assert "write to another DST" in err
    argv = ["generate", "--model", sources["hf"], "-p", "a"]
    err = assert_refused([*argv, "--cache-dir", tmp_path / "ro"], "Read-only", capsys)
    assert "--cache-dir or $MLX_FLASHINFER_CACHE" in err


def test_a_full_disk_names_dst_and_leaves_nothing(
    sources, tmp_path, capsys, monkeypatch
):
    def full(source, out, *args):
        (out / "resident.safetensors").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(convert_module, "_write_layout", full)
    err = assert_refused(
        ["convert", sources["hf"], tmp_path / "out"], "No space left", capsys
    )
    assert f"{tmp_path / 'out'}: No space left on device; free some space" in err
    assert os.listdir(tmp_path) == []


def test_a_busy_destination_is_one_line(sources, tmp_path, capsys, monkeypatch):
    def busy(src, dst):
        raise OSError(errno.EBUSY, "Device or resource busy", str(dst))

    convert(sources["hf"], tmp_path / "out", progress=False)
    monkeypatch.setattr(staging.os, "rename", busy)
    err = assert_refused(
        ["convert", sources["hf"], tmp_path / "out", "--force", "--quiet"],
        "busy",
        capsys,
    )
    assert "a mount point or a directory in use" in err
    monkeypatch.undo()
    Layout.open(tmp_path / "out").verify()
    assert os.listdir(tmp_path) == ["out"]


# -- options ---------------------------------------------------------------------------

OPTIONS = {
    "temp inf": (["--temp", "inf"], "temp inf"),
    "temp nan": (["--temp", "nan"], "temp nan"),
    "penalty inf": (["--repetition-penalty", "inf"], "must be > 0 and finite"),
    "max-context 0": (["--max-context", "0"], "max_context 0 out of range: 1..64"),
    "budget 0": (["--memory-budget", "0"], "memory budget must be positive"),
}


@pytest.mark.parametrize("case", sorted(OPTIONS))
def test_options_out_of_range_are_refused(case, sources, capsys):
    option, says = OPTIONS[case]
    argv = ["generate", "--model", sources["layout"], "-p", "a", *option]
    assert_refused(argv, says, capsys)


def test_the_api_refuses_what_the_cli_refuses(sources):
    with pytest.raises(ValueError, match="memory budget must be positive"):
        load(sources["layout"], memory_budget=0)
    with pytest.raises(ValueError, match="max_context 0 out of range"):
        load(sources["layout"], max_context=0)
    model, tokenizer = load(sources["layout"], backend="numpy")
    for prompt, says in [
        (b"alice", "the prompt is bytes"),
        ([1, 2.5], "token id 2.5 is not an integer"),
        ([1, False], "token id False is not an integer"),
    ]:
        with pytest.raises(ValueError, match=says):
            generate(model, tokenizer, prompt, max_tokens=2)
    with pytest.raises(ValueError, match="not bytes"):
        model.logits(b"\x01\x02")


def test_bench_takes_limit_or_no_limit_not_both(capsys):
    says = "not allowed with argument"
    assert_refused(["bench", "--no-limit", "--limit", "2GB"], says, capsys)


def test_a_full_context_ends_the_reply_and_says_so(sources, capsys):
    argv = ["generate", "--model", sources["layout"], "-p", "alice"]
    status, _, err = run([*argv, "--max-context", 20, "-m", 100], capsys)
    assert status == 0
    assert (
        "(reply cut: the context of 20 tokens is full; raise --max-context, up to "
        "the model's 64)" in err
    )
    status, _, err = run([*argv, "-m", 3], capsys)
    assert status == 0 and "reply cut" not in err
    model, tokenizer = load(sources["layout"], backend="numpy", max_context=20)
    *_, last = stream_generate(model, tokenizer, [1, 5, 9], max_tokens=100)
    assert last.finish_reason == "length" and context_full(model, last)
    assert last.prompt_tokens + last.generation_tokens == 20
    *_, last = stream_generate(model, tokenizer, [1, 5, 9], max_tokens=2)
    assert last.finish_reason == "length" and not context_full(model, last)


def test_default_is_the_embedded_model_even_beside_a_folder_so_named(
    sources, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(
        "mlx_flashinfer.formats.default_model.default_gguf_path",
        lambda: sources["gguf"],
    )
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()
    (tmp_path / "default" / "notes.txt").write_text("mine")
    status, out, err = run(
        ["generate", "--model", "default", "-p", "a", "-m", 2], capsys
    )
    assert status == 0, err
    status, _, _ = run(["convert", "default", "converted", "--quiet"], capsys)
    assert status == 0 and Layout.open(tmp_path / "converted")
    assert_refused(["generate", "--model", "./default", "-p", "a"], "neither", capsys)


@pytest.mark.parametrize("case", ["cut gguf", "overflow", "force onto src"])
def test_a_real_process_prints_one_line_and_no_warning(case, sources, tmp_path):
    # in a real process: no progress bar, no NumPy warning, no traceback beside it
    if case == "cut gguf":
        bad = tmp_path / "cut.gguf"
        bad.write_bytes(sources["gguf"].read_bytes()[:1000])
        argv, says = ["generate", "--model", bad, "-p", "a"], "not a readable GGUF"
    elif case == "overflow":
        layout = Path(shutil.copytree(sources["layout"], tmp_path / "layout"))
        poison(layout, "overflow")
        argv, says = ["generate", "--model", layout, "-p", "alice"], "non-finite"
    else:
        argv, says = ["convert", sources["gguf"], sources["gguf"], "--force"], "itself"
    done = subprocess.run(
        [sys.executable, "-m", "mlx_flashinfer", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and says in done.stderr, done.stderr
