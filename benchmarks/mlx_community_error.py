"""What converting an mlx-community checkpoint to a q4 layout rounds again.

Makes a small random Llama-shaped checkpoint as mlx-lm's `convert -q` writes it
(tests/tiny_mlx.py: MLX's own `mx.quantize`, 4 bits, groups of 64), converts it to q4
(down columns at 8 bits, the default, and at 4), and compares with the same model
dequantized: what was taken unchanged, the down columns' error, and the logits'. For
contrast, the dequantized weights converted as a plain folder (every matrix rounded
a second time). Needs mlx.

    python benchmarks/mlx_community_error.py --hidden 512 --ffn 1536 --layers 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from tiny_mlx import write_float, write_mlx_checkpoint  # noqa: E402
from tiny_models import random_weights, tiny_config  # noqa: E402

from mlx_flashinfer import Layout, convert, load  # noqa: E402
from mlx_flashinfer.formats.quantize import dequantize  # noqa: E402


def down_error(layout: Path, values: dict) -> dict:
    """The down columns against the dequantized down matrices: RMS error over RMS
    value, and the largest error in steps of the columns' own groups."""
    lay = Layout.open(layout)
    group = lay.quantization["group_size"]
    err, ref, steps = [], [], []
    for layer in range(lay.args.num_hidden_layers):
        q = lay.read_parts(layer)[-1]
        got = dequantize(q.packed, q.scales, q.biases, q.bits, group)
        want = values[f"model.layers.{layer}.mlp.down_proj.weight"].T
        err.append(got - want)
        ref.append(want)
        step = np.repeat(np.abs(q.scales.astype(np.float32)), group, axis=1)
        steps.append(np.abs(got - want) / np.maximum(step, 1e-12))
    e, r = np.concatenate(err), np.concatenate(ref)
    return {
        "rms_relative": float(np.sqrt((e**2).mean() / (r**2).mean())),
        "max_in_steps": float(max(s.max() for s in steps)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    opts = parser.parse_args()
    config = tiny_config(
        "llama",
        "silu",
        hidden_size=opts.hidden,
        intermediate_size=opts.ffn,
        num_hidden_layers=opts.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=40,
        max_position_embeddings=max(64, opts.tokens),
    )
    tokens = np.random.default_rng(0).integers(0, 40, opts.tokens).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src, _, values = write_mlx_checkpoint(
            tmp / "mlx", config, random_weights(config, seed=0)
        )
        plain = write_float(tmp / "plain", config, values)
        reference = load(
            convert(plain, tmp / "ref", dtype="float32", progress=False),
            backend="numpy",
        )[0].logits(tokens)
        scale = float(np.abs(reference).max())
        rows = {}
        for name, source, down_bits in [
            ("mlx q4, down 8-bit", src, 8),
            ("mlx q4, down 4-bit", src, 4),
            ("plain q4 of the dequantized, down 8-bit", plain, 8),
        ]:
            out = tmp / name.replace(" ", "_").replace(",", "")
            convert(source, out, dtype="q4", down_bits=down_bits, progress=False)
            logits = load(out, backend="numpy")[0].logits(tokens)
            record = Layout.open(out).quantization
            rows[name] = {
                "exact_from_source": record["exact_from_source"],
                "requantized_from_source": record["requantized_from_source"],
                "down": down_error(out, values),
                "logits_max_abs_error": float(np.abs(logits - reference).max()),
                "logits_max_abs": scale,
                "top1_agreement": float(
                    (logits.argmax(-1) == reference.argmax(-1)).mean()
                ),
            }
    print(json.dumps({"config": vars(opts), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
