"""Which cheap predictor ranks a SiLU model's neurons like the oracle? Per layer, each
candidate scores every neuron of held-out tokens; each layer then keeps, per token,
the neurons above a sparsity (top-k per token, or one cut per layer chosen on the
calibration tune split) and the perplexity of held-out text is measured with every
layer sparse at once (layer by layer, `calibrate.LayerByLayer`, as train-predictor
measures its cuts).

Candidates: the oracle (|silu(g) x u| x |down| from the exact rows); the low-bit
predictor's score from gate and up rows quantized to 4, 3 or 2 bits (round to
nearest, groups of 64 or 32); the trained low-rank predictor (rank 64, as
train-predictor fits it); reduced-rank regressions of gate and up (the best rank-r
linear map of h to (g, u) under the calibration inputs' covariance, then the same
score); the gate alone (|silu(g)|, CATS).

    python benchmarks/predictor_ranking.py --model LAYOUT --text alice_in_wonderland.txt
        [--held-tokens 2048] [--sparsity 0.3 0.4 0.5] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from mlx_flashinfer.formats.layout import Layout
from mlx_flashinfer.formats.quantize import rows_float32
from mlx_flashinfer.formats.tokenizer import load_tokenizer
from mlx_flashinfer.predictors.calibrate import (
    LayerByLayer,
    calibration_sequences,
    split_sequences,
)
from mlx_flashinfer.predictors.lowrank_fit import train_layer
from mlx_flashinfer.predictors.quality import sequence_nll
from mlx_flashinfer.predictors.texts import calibration_text, held_out_part
from mlx_flashinfer.predictors.train import DEFAULT_EPOCHS, contribution_mask


def silu(x: np.ndarray) -> np.ndarray:
    return x * (0.5 + 0.5 * np.tanh(0.5 * x))


def round_to_bits(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    """w (rows, d) through group-wise affine round-to-nearest at `bits`, float32."""
    g = w.reshape(w.shape[0], -1, group)
    low, high = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    step = np.maximum(high - low, 1e-8) / (2**bits - 1)
    q = np.clip(np.round((g - low) / step), 0, 2**bits - 1)
    return (q * step + low).reshape(w.shape).astype(np.float32)


def reduced_rank(w: np.ndarray, cov: np.ndarray, rank: int):
    """A (rank, d), B (rows, rank) minimising E|w h - B A h|^2 for h of covariance
    cov: the top singular directions of w cov^(1/2)."""
    values, vectors = np.linalg.eigh(cov)
    root = vectors * np.sqrt(np.maximum(values, 0))
    u = np.linalg.svd(w @ root, full_matrices=False)[0][:, :rank]
    return (u.T @ w).astype(np.float32), u.astype(np.float32)


def candidates(gate, up, norms, h_fit, target_fit, seed):
    """name -> h (T, d) -> scores (T, n), for one layer."""
    n = gate.shape[0]

    def score(wg, wu):
        return lambda h: np.abs(silu(h @ wg.T) * (h @ wu.T)) * norms

    group = 64 if gate.shape[1] % 64 == 0 else 32
    out = {"oracle": score(gate, up)}
    for bits in (4, 3, 2):
        out[f"{bits}-bit"] = score(
            round_to_bits(gate, bits, group), round_to_bits(up, bits, group)
        )
    A, B, _ = train_layer(h_fit, target_fit, 64, epochs=DEFAULT_EPOCHS, seed=seed)
    out["low-rank 64 (trained)"] = lambda h: (h @ A.T) @ B.T
    cov = h_fit.T @ h_fit / len(h_fit)
    both = np.concatenate([gate, up])
    for rank in (64, 128):
        A2, B2 = reduced_rank(both, cov, rank)

        def regressed(h, A2=A2, B2=B2):
            y = (h @ A2.T) @ B2.T
            return np.abs(silu(y[:, :n]) * y[:, n:]) * norms

        out[f"regression rank {rank}"] = regressed
    out["gate only (CATS)"] = lambda h: np.abs(silu(h @ gate.T))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Llama-family layout")
    parser.add_argument("--text", required=True, help="the whole of Alice (eBook #11)")
    parser.add_argument("--held-tokens", type=int, default=2048)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.3, 0.4, 0.5])
    parser.add_argument("--out", default=None)
    opts = parser.parse_args()
    layout = Layout.open(opts.model)
    args = layout.args
    tokenizer = load_tokenizer(layout)
    calibration = calibration_sequences(tokenizer, [calibration_text()], 4096, 256)
    fit, tune = split_sequences(len(calibration))
    book = Path(opts.text).read_text(encoding="utf-8")
    ids = tokenizer.encode(held_out_part(book))[: opts.held_tokens]
    held = [ids[s : s + 256] for s in range(0, len(ids), 256)]
    runner = LayerByLayer(layout, "numpy", max_context=256)
    cal_streams, dense = runner.embed(calibration), runner.embed(held)
    sparse: dict = {}  # (name, sparsity, "top-k" | "cut") -> streams
    overlap: dict = {}  # name -> per layer, share of the oracle's top half kept
    started = time.perf_counter()
    for layer in range(args.num_hidden_layers):
        runner.load(layer)
        cal_streams, records = runner.run(
            layer, cal_streams, record=lambda h, g, u, a: (h, g, u)
        )
        h_fit = np.concatenate([records[i][0] for i in fit])
        target = contribution_mask(
            np.concatenate([records[i][1] for i in fit]),
            np.concatenate([records[i][2] for i in fit]),
            0.5,
        )
        h_tune = np.concatenate([records[i][0] for i in tune])
        gate, up, _ = (
            rows_float32(p, layout.dtype, 0, p.shape[0]) for p in runner.stored
        )
        scorers = candidates(gate, up, runner.down_norms, h_fit, target, layer)
        exact = scorers["oracle"](h_tune)
        half = exact.shape[1] // 2
        top_exact = exact > np.partition(exact, half, axis=1)[:, half : half + 1]
        for name, scorer in scorers.items():
            s = scorer(h_tune)
            top = s > np.partition(s, half, axis=1)[:, half : half + 1]
            share = float((top & top_exact).sum() / top_exact.sum())
            overlap.setdefault(name, []).append(share)
        dense = runner.run(layer, dense)
        for name, scorer in scorers.items():
            for sparsity in opts.sparsity:
                cut = float(np.quantile(scorer(h_tune), sparsity))
                for how in ("top-k", "cut"):

                    def keep(h, scorer=scorer, sparsity=sparsity, cut=cut, how=how):
                        s = scorer(runner.B.to_numpy(h))
                        if how == "cut":
                            return s > cut
                        k = int(round(sparsity * (s.shape[1] - 1)))
                        return s > np.partition(s, k, axis=1)[:, k : k + 1]

                    key = (name, sparsity, how)
                    streams = sparse.get(key) or runner.embed(held)
                    sparse[key] = runner.run(layer, streams, keep=keep)
        print(
            f"layer {layer}: {time.perf_counter() - started:.0f} s, overlap with the "
            "oracle's top half: "
            + ", ".join(f"{k} {v[-1]:.3f}" for k, v in overlap.items()),
            flush=True,
        )

    def nll(streams) -> float:
        pairs = zip(streams, held, strict=True)
        return sum(sequence_nll(runner.head(x), s) for x, s in pairs)

    scored = sum(len(s) - 1 for s in held)
    dense_nll = nll(dense)
    rows = {}
    for (name, sparsity, how), streams in sparse.items():
        loss = math.exp((nll(streams) - dense_nll) / scored) - 1
        rows.setdefault(name, {})[f"{sparsity:.0%} {how}"] = loss
    print(
        f"\n{opts.model}: {scored} held-out tokens, dense perplexity "
        f"{math.exp(dense_nll / scored):.3f}; loss with every layer sparse\n"
    )
    columns = [f"{s:.0%} {how}" for s in opts.sparsity for how in ("top-k", "cut")]
    header = " | ".join(["predictor", "overlap with oracle's top half", *columns])
    print(f"| {header} |")
    print("|---" * (len(columns) + 2) + "|")
    for name, losses in rows.items():
        mean = sum(overlap[name]) / len(overlap[name])
        cells = " | ".join(f"{losses[c]:+.1%}" for c in columns)
        print(f"| {name} | {mean:.3f} | {cells} |")
    if opts.out:
        Path(opts.out).write_text(
            json.dumps(
                {"options": vars(opts), "losses": rows, "overlap": overlap}, indent=1
            )
        )


if __name__ == "__main__":
    main()
