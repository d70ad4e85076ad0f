"""The GGUF of a synthetic MoE (bench/synth_moe_gguf.py) is the layout's model: read
back through our own GGUF reader (llama.cpp's names, q/k permutation, routing
metadata undone as for any Mixtral GGUF) it gives the layout's bytes (F16) or its
experts' Q4_0/Q8_0 round trips (q4); and the refusals."""

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from mlx_flashinfer import Layout, convert, load
from mlx_flashinfer.bench.synth_moe import MOE_SHAPES, write_synthetic_moe
from mlx_flashinfer.bench.synth_moe_gguf import synthetic_source, write_synthetic_gguf
from mlx_flashinfer.formats.experts import expert_parts

ROOT = Path(__file__).resolve().parents[1]
TOKENS = np.random.default_rng(1).integers(3, 512, 24).tolist()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """moe-tiny as float16 and q4 layouts (seed 3, skew 1), and their GGUFs."""
    root = tmp_path_factory.mktemp("synth-gguf")
    made = {}
    for dtype in ("float16", "q4"):
        layout = write_synthetic_moe(
            root / dtype, "moe-tiny", dtype, seed=3, skew=1.0, progress=False
        )
        made[dtype] = layout
        made[dtype + ".gguf"] = write_synthetic_gguf(layout, root / f"{dtype}.gguf")
    return made


def test_the_f16_gguf_reads_back_as_the_layout(tiny, tmp_path):
    """F16 tensors (F32 norms and routers) converted to float16 are the layout's
    bytes: every name, the q/k permutation and the stacks' order are llama.cpp's
    (what our reader undoes); so the dense logits are equal too."""
    reader = gguf.GGUFReader(tiny["float16.gguf"])
    meta = {f.name: f.contents() for f in reader.fields.values()}
    assert meta["general.architecture"] == "llama"
    assert (meta["llama.expert_count"], meta["llama.expert_used_count"]) == (8, 2)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.ffn_gate_inp.weight"] == "F32"
    assert types["blk.1.ffn_down_exps.weight"] == "F16"
    back = convert(
        tiny["float16.gguf"], tmp_path / "back", dtype="float16", progress=False
    )
    for file in ("ffn.bin", "resident.safetensors"):
        assert (back / file).read_bytes() == (tiny["float16"] / file).read_bytes()
    ours, _ = load(tiny["float16"], backend="numpy")
    theirs, _ = load(back, backend="numpy")
    np.testing.assert_array_equal(theirs.logits(TOKENS), ours.logits(TOKENS))


def test_the_q4_gguf_holds_the_experts_rounded_to_blocks(tiny, tmp_path):
    """A q4 layout's GGUF: expert stacks Q4_0 (the down columns, 8-bit in the
    layout, Q8_0), every expert exactly its source's round trip through those
    blocks; every other tensor the float16 layout's. Q4_0's rounding (a step of
    max|w| / 8 in 32 weights: ~8% rms of a random weight) moves this 2-layer
    model's logits by 28% rms of theirs (near ties flip routings): asserted < 40%."""
    reader = gguf.GGUFReader(tiny["q4.gguf"])
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    stacks = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
    kinds = [types[f"blk.0.{s}.weight"] for s in stacks]
    assert kinds == ["Q4_0", "Q4_0", "Q8_0"]
    assert types["blk.0.attn_q.weight"] == "F16"
    half = convert(tiny["q4.gguf"], tmp_path / "f16", dtype="float16", progress=False)
    resident = "resident.safetensors"
    assert (half / resident).read_bytes() == (tiny["float16"] / resident).read_bytes()
    back = convert(tiny["q4.gguf"], tmp_path / "f32", dtype="float32", progress=False)
    layout = Layout.open(back)
    source = synthetic_source(Layout.open(tiny["q4"]))
    args = layout.args
    for layer in range(args.num_hidden_layers):
        parts = layout.read_parts(layer)
        for p, kind in enumerate(kinds):
            qtype = gguf.GGMLQuantizationType[kind]
            got = np.asarray(parts[p]).reshape(args.num_experts, -1, args.hidden_size)
            for e in range(args.num_experts):
                name, transposed = expert_parts(args, layer, e)[p]
                blocks = gguf.quants.quantize(source.tensor(name), qtype)
                values = gguf.quants.dequantize(blocks, qtype)
                np.testing.assert_array_equal(
                    got[e], values.T if transposed else values
                )
    ours, _ = load(tiny["float16"], backend="numpy")
    theirs, _ = load(back, backend="numpy")
    a, b = theirs.logits(TOKENS), ours.logits(TOKENS)
    assert np.sqrt(((a - b) ** 2).mean() / (b**2).mean()) < 0.4


def test_a_custom_shape_is_rebuilt_from_its_recorded_sizes(tmp_path):
    """A custom shape (tools/synth.py --layers N, or sizes like Qwen3's head_dim
    that no model arg rebuilds from the others) comes back as the same source."""
    sizes = {**MOE_SHAPES["moe-tiny"], "num_hidden_layers": 1, "head_dim": 32}
    layout = write_synthetic_moe(tmp_path / "c", sizes, "float16", progress=False)
    source = synthetic_source(Layout.open(layout))
    assert source.args.head_dim == 32 and source.args.num_hidden_layers == 1
    name = "layers.0.self_attn.q_proj.weight"
    assert source.shapes[name] == (sizes["num_attention_heads"] * 32, 64)
    # the GGUF says the head size (llama.cpp takes d_model / heads otherwise)
    path = write_synthetic_gguf(layout, tmp_path / "c.gguf")
    fields = gguf.GGUFReader(path).fields
    assert fields["llama.attention.key_length"].parts[-1][0] == 32
    back = convert(path, tmp_path / "back", dtype="float16", progress=False)
    assert Layout.open(back).args.head_dim == 32


def test_refusals(tiny, tmp_path):
    """An existing file (unless forced), a layout not from a synthetic MoE, a
    missing folder: refused, nothing half-written left; the tool exits 2."""
    with pytest.raises(FileExistsError, match="--force"):
        write_synthetic_gguf(tiny["float16"], tiny["float16.gguf"])
    again = write_synthetic_gguf(tiny["float16"], tiny["float16.gguf"], force=True)
    assert again.stat().st_size == tiny["float16.gguf"].stat().st_size
    other = convert(
        tiny["float16.gguf"], tmp_path / "g", dtype="float16", progress=False
    )
    with pytest.raises(ValueError, match="not a synthetic mixture of experts"):
        write_synthetic_gguf(other, tmp_path / "x.gguf")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        write_synthetic_gguf(tiny["float16"], tmp_path / "none" / "x.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]
    done = subprocess.run(
        [sys.executable, ROOT / "tools/synth_gguf.py", tiny["q4"], tiny["q4.gguf"]],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "exists" in done.stderr


def test_llama_cpp_decodes_the_gguf_as_dense(tiny):
    """llama.cpp (where llama-cpp-python is installed) on the F16 GGUF: the first
    step's logits within float16 products' rounding of our dense ones (measured:
    0.003 of 3.4), the same argmax ids."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    feed = TOKENS[8:]
    # one thread: llama.cpp's threads spin waiting for each other, slow when busy
    job = {"model": str(tiny["float16.gguf"]), "n_ctx": 64, "threads": 1}
    job |= {"prompt": TOKENS[:8], "feed": feed, "repack": False}
    done = subprocess.run(
        [sys.executable, ROOT / "benchmarks/llama_cpp_decode.py"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(done.stdout)
    model, _ = load(tiny["float16"], backend="numpy")
    logits = model.logits(TOKENS)
    assert np.abs(np.asarray(got["first_logits"]) - logits[7]).max() < 0.02
    assert got["ids"] == logits[7:].argmax(-1).tolist()
