"""The layout reader: validation on open, checksums, and the embedded default model."""

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import random_weights, tiny_config, write_hf_checkpoint

from mlx_flashinfer import Layout, convert
from mlx_flashinfer.cli import main
from mlx_flashinfer.formats.layout import MANIFEST


@pytest.fixture(scope="module")
def tiny_layout(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("layout")
    config = tiny_config("llama", "relu")
    src = write_hf_checkpoint(
        tmp / "src", config, random_weights(config), chat_template="{{ messages }}"
    )
    return convert(src, tmp / "layout", progress=False)


def copy_of(layout: Path, where: Path) -> Path:
    return Path(shutil.copytree(layout, where / "copy"))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_any_single_corrupted_byte_is_caught_by_verify(tiny_layout, data):
    files = sorted(p.name for p in tiny_layout.iterdir())
    name = data.draw(st.sampled_from(files), label="file")
    size = (tiny_layout / name).stat().st_size
    offset = data.draw(st.integers(0, size - 1), label="offset")
    flip = data.draw(st.integers(1, 255), label="xor")
    with tempfile.TemporaryDirectory() as tmp:
        layout = copy_of(tiny_layout, Path(tmp))
        blob = bytearray((layout / name).read_bytes())
        blob[offset] ^= flip
        (layout / name).write_bytes(bytes(blob))
        try:
            Layout.open(layout).verify()
        except (ValueError, FileNotFoundError):  # e.g. a file name in the manifest
            return  # caught
        # The only change verify may accept: whitespace of the manifest's JSON text,
        # which leaves its content (and so everything that is read) identical.
        assert name == MANIFEST
        assert json.loads(blob) == json.loads((tiny_layout / MANIFEST).read_text())


def edit_manifest(layout: Path, change) -> None:
    manifest = json.loads((layout / MANIFEST).read_text())
    change(manifest)
    (layout / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda m: m.update(version=4), "layout version 4 is not supported"),
        # version 3 is a mixture of experts' (formats/experts.py)
        (lambda m: m.update(version=3), "layout version 3 does not match its model"),
        (lambda m: m.update(dtype="q4"), "q4 layout without its quantization"),
        (
            lambda m: m.update(quantization={"bits": 4, "group_size": 32}),
            "quantization recorded for a float",
        ),
        (lambda m: m.update(format="something-else"), "not an mlx-flashinfer-layout"),
        (lambda m: m.pop("model_args"), "lacks model_args"),
        (lambda m: m["ffn"].pop("layers"), "lacks ffn.layers"),
        (lambda m: m.update(dtype="int4"), "unknown dtype"),
        (lambda m: m["ffn"].update(bundle_bytes=7), "bundle spec does not match"),
    ],
)
def test_bad_manifests_are_refused(tiny_layout, tmp_path, change, message):
    layout = copy_of(tiny_layout, tmp_path)
    edit_manifest(layout, change)
    with pytest.raises(ValueError, match=message):
        Layout.open(layout)


def test_truncated_or_missing_files_are_refused_on_open(tiny_layout, tmp_path):
    layout = copy_of(tiny_layout, tmp_path)
    ffn = layout / "ffn.bin"
    ffn.write_bytes(ffn.read_bytes()[:-100])
    with pytest.raises(
        ValueError, match=r"ffn.bin: size 8092 bytes, manifest says 8192 \(truncated"
    ):
        Layout.open(layout)
    ffn.unlink()
    with pytest.raises(FileNotFoundError, match="ffn.bin: missing"):
        Layout.open(layout)
    with pytest.raises(FileNotFoundError, match="not a converted model"):
        Layout.open(tmp_path)


def test_inspect_verify_cli(tiny_layout, tmp_path, capsys):
    assert main(["inspect", str(tiny_layout), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "checksums    ok" in out and "chat template: yes" in out
    layout = copy_of(tiny_layout, tmp_path)
    blob = bytearray((layout / "resident.safetensors").read_bytes())
    blob[-1] ^= 1
    (layout / "resident.safetensors").write_bytes(bytes(blob))
    assert main(["inspect", str(layout), "--verify"]) == 2
    assert "resident.safetensors: checksum mismatch" in capsys.readouterr().err


def test_a_conversion_records_that_its_checksums_were_computed(tiny_layout, capsys):
    # the sha256s hash the bytes as they were written: a fresh layout is verified
    verified = Layout.open(tiny_layout).manifest["verified"]
    assert verified["by"] == "conversion" and verified["at"].endswith("Z")
    assert main(["inspect", str(tiny_layout)]) == 0
    out = capsys.readouterr().out
    assert f"checksums    computed by the conversion at {verified['at']}" in out


@pytest.mark.slow
def test_default_model_converts_and_inspects(default_layout, capsys):
    assert main(["inspect", str(default_layout)]) == 0
    out = capsys.readouterr().out
    layout = Layout.open(default_layout)
    args = layout.args
    assert (args.num_hidden_layers, args.hidden_size, args.intermediate_size) == (
        30,
        576,
        1536,
    )
    assert (args.num_attention_heads, args.num_key_value_heads, args.vocab_size) == (
        9,
        3,
        49152,
    )
    assert args.rope_theta == 100000.0 and args.tie_word_embeddings
    assert layout.bundle_bytes == 3456 and "3456 bytes (gate, up, down)" in out
    assert "layers       30" in out and "d_model      576" in out
