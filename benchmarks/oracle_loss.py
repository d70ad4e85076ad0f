"""What a perfect ranking of neurons would cost: the perplexity loss, per domain of the
shipped corpus, on the calibration sequences that `train-predictor` measures its cuts
on, with every layer computed over, per token, the neurons with the largest
|activation| x |down column| (the oracle) at one sparsity for all layers. Compare
with the calibrated loss of a trained predictor (whose promise is the worst domain's).

    python benchmarks/oracle_loss.py --model LAYOUT [--sparsity 0.2 0.3 0.5]
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from mlx_flashinfer.formats.layout import Layout
from mlx_flashinfer.formats.tokenizer import load_tokenizer
from mlx_flashinfer.model.transformer import ffn_activation
from mlx_flashinfer.predictors.calibrate import (
    LayerByLayer,
    domain_sequences,
    split_domains,
)
from mlx_flashinfer.predictors.quality import sequence_nll
from mlx_flashinfer.predictors.streams import quality_sequences
from mlx_flashinfer.predictors.texts import calibration_domains
from mlx_flashinfer.predictors.train import DEFAULT_TOKENS


def oracle_keep(runner: LayerByLayer, args, sparsity: float):
    """h -> per token, the neurons outside the `sparsity` share with the smallest
    |activation| x |down column| of the loaded layer."""
    B = runner.B
    gate_w, up_w = runner.ffn.parts[0], runner.ffn.parts[1]
    norms = runner.down_norms

    def keep(h):
        gate = B.to_numpy(B.linear(h, gate_w))
        up = B.to_numpy(B.linear(h, up_w))
        score = np.abs(ffn_activation(B, args, gate, up)) * norms
        k = int(round(sparsity * (score.shape[1] - 1)))
        return score > np.partition(score, k, axis=1)[:, k : k + 1]

    return keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Llama-family layout")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.2, 0.3, 0.5])
    parser.add_argument("--backend", default="numpy")
    opts = parser.parse_args()
    layout = Layout.open(opts.model)
    args = layout.args
    if args.family == "opt":
        parser.error("the oracle here needs a gate and an up branch (Llama family)")
    tokenizer = load_tokenizer(layout)
    sequences, names = domain_sequences(
        tokenizer, calibration_domains(tokenizer), DEFAULT_TOKENS, 256
    )
    domains = list(dict.fromkeys(names))
    _, tune = split_domains(names)  # as train-predictor
    chosen = [j for d in domains for j in quality_sequences(tune, names, d)]
    ids = [sequences[j] for j in chosen]
    of = [names[j] for j in chosen]
    runner = LayerByLayer(layout, opts.backend, max_context=256)

    def nll(sparsity: float) -> dict[str, float]:
        streams = runner.embed(ids)
        for layer in range(args.num_hidden_layers):
            runner.load(layer)
            keep = oracle_keep(runner, args, sparsity) if sparsity else None
            streams = runner.run(layer, streams, keep=keep)
        per = dict.fromkeys(domains, 0.0)
        for x, s, d in zip(streams, ids, of, strict=True):
            per[d] += sequence_nll(runner.head(x), s)
        return per

    scored = {
        d: sum(len(s) - 1 for s, n in zip(ids, of, strict=True) if n == d)
        for d in domains
    }
    dense = nll(0.0)
    print(
        f"{opts.model}: {sum(scored.values())} calibration tokens, dense "
        + ", ".join(f"{d} {math.exp(dense[d] / scored[d]):.3f}" for d in domains)
    )
    for sparsity in opts.sparsity:
        sparse = nll(sparsity)
        losses = {d: math.exp((sparse[d] - dense[d]) / scored[d]) - 1 for d in domains}
        print(
            f"oracle, {sparsity:.0%} skipped in every layer: worst "
            f"{max(losses.values()):+.1%}; "
            + ", ".join(f"{d} {v:+.1%}" for d, v in losses.items())
        )


if __name__ == "__main__":
    main()
