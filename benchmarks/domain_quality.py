"""Does the calibrated loss hold on every kind of text? Held-out passages of each
domain of the shipped corpus, and of a domain no calibration sees, scored dense and
through the sparse path with the layout's trained predictor.

The predictor is trained as `flashinfer train-predictor` trains it (the shipped
corpus; `--max-loss`, `--recall` as there; timed), or taken as the layout has it
(`--use-trained`). Scored per domain: the first `--tokens` tokens of its held-out
text (`texts.held_out_domains`; narrative: chapters VII-XII of Alice with `--book`,
else the shipped chapter IX opening), and of the `--unshipped` files (one domain,
never calibrated on: legal text by default, Debian's licences). Two measures:

- `--measure flash` (default): each chunk's first `--prefill` tokens as a prompt,
  every later token a decode step through the flash path at each `--config`
  BUDGET:WINDOW (what users run); "skipped": FFN neurons per decoded token neither
  predicted nor cached.
- `--measure layers`: as calibration measures (every layer over its predicted
  neurons only, whole chunks at once, layer by layer): fast, the promise's terms.

    python benchmarks/domain_quality.py --model LAYOUT [--max-loss 5% | --use-trained]
        [--book alice_in_wonderland.txt] [--unshipped FILE ...] [--tokens 512]
        [--config 100%:0 60%:4] [--measure flash|layers] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import mlx_flashinfer
from mlx_flashinfer.perplexity import perplexity
from mlx_flashinfer.predictors.calibrate import LayerByLayer
from mlx_flashinfer.predictors.quality import sequence_nll
from mlx_flashinfer.predictors.texts import held_out_domains, held_out_part
from mlx_flashinfer.predictors.train import parse_max_loss, train_predictor

LICENCES = ["Apache-2.0", "GPL-3", "MPL-2.0"]
UNSHIPPED = [f"/usr/share/common-licenses/{name}" for name in LICENCES]


def flash_score(layout, ids, opts, budget, window) -> dict:
    model, _ = mlx_flashinfer.load(
        layout, backend=opts.backend, memory_budget=budget, window=window
    )
    started = time.perf_counter()
    result = perplexity(model, ids, opts.context, prefill=opts.prefill)
    stats = model.io_stats()["decode"]
    args = model.args
    neurons = max(stats["tokens"], 1) * args.num_hidden_layers * args.intermediate_size
    model.ffn.close()
    return {
        "perplexity": result["perplexity"],
        "tokens": result["tokens"],
        "skipped": 1 - stats["neurons_predicted"] / neurons,
        "seconds": time.perf_counter() - started,
    }


def layer_scores(layout, chunks: list[list[int]], backend) -> tuple[dict, dict]:
    """Dense and sparse (every layer over its predicted neurons) NLL of the chunks,
    layer by layer as calibration measures; with the share skipped."""
    flash, _ = mlx_flashinfer.load(
        layout, backend=backend, memory_budget="100%", window=0
    )
    predictor = flash.ffn.predictor
    runner = LayerByLayer(
        mlx_flashinfer.Layout.open(layout), backend, max(map(len, chunks))
    )
    dense = runner.embed(chunks)
    sparse = list(dense)
    kept = []

    def keep(layer):
        def mask(h):
            m = predictor.predict(layer, h)
            kept.append(float(np.mean(m)))
            return m

        return mask

    for layer in range(runner.args.num_hidden_layers):
        runner.load(layer)
        dense = runner.run(layer, dense)
        sparse = runner.run(layer, sparse, keep=keep(layer))
    scored = sum(len(c) - 1 for c in chunks)

    def ppl(streams):
        nll = sum(
            sequence_nll(runner.head(x), c)
            for x, c in zip(streams, chunks, strict=True)
        )
        return float(np.exp(nll / scored))

    flash.ffn.close()
    return (
        {"perplexity": ppl(dense), "tokens": scored},
        {"perplexity": ppl(sparse), "tokens": scored, "skipped": 1 - np.mean(kept)},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--book", default=None, help="the whole of Alice (eBook #11)")
    parser.add_argument("--unshipped", nargs="*", default=UNSHIPPED)
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--prefill", type=int, default=32)
    parser.add_argument("--config", nargs="+", default=["100%:0", "60%:4"])
    parser.add_argument("--measure", choices=["flash", "layers"], default="flash")
    parser.add_argument("--max-loss", default="5%")
    parser.add_argument("--recall", type=float, default=None)
    parser.add_argument("--train-tokens", type=int, default=None)
    parser.add_argument("--use-trained", action="store_true")
    parser.add_argument("--out", default=None)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        layout = Path(tmp) / "layout"
        shutil.copytree(opts.model, layout)
        started = time.perf_counter()
        if opts.use_trained:
            section = mlx_flashinfer.Layout.open(layout).manifest["predictor"]
        else:
            cuts = (
                {"recall": opts.recall}
                if opts.recall
                else {"max_loss": parse_max_loss(opts.max_loss)}
            )
            extra = {"tokens": opts.train_tokens} if opts.train_tokens else {}
            section = train_predictor(layout, progress=False, **cuts, **extra)
        trained_s = time.perf_counter() - started
        dense_model, tok = mlx_flashinfer.load(layout, backend=opts.backend)
        texts = held_out_domains(tok)
        if opts.book:
            texts["narrative"] = held_out_part(Path(opts.book).read_text("utf-8"))
        if opts.unshipped:
            texts["legal (unshipped)"] = "\n\n".join(
                Path(f).read_text("utf-8") for f in opts.unshipped
            )
        rows = {}
        for name, text in texts.items():
            ids = tok.encode(text)[: opts.tokens]
            row = rows[name] = {}
            if opts.measure == "layers":
                chunks = [
                    ids[s : s + opts.context]
                    for s in range(0, len(ids), opts.context)
                    if len(ids[s : s + opts.context]) > 1
                ]
                row["dense"], row["layers"] = layer_scores(layout, chunks, opts.backend)
                continue
            row["dense"] = perplexity(dense_model, ids, opts.context)
            for config in opts.config:
                budget, window = config.split(":")
                row[config] = flash_score(layout, ids, opts, budget, int(window))
    measured = section.get("quality") or {}
    promise = measured.get("loss", float("nan"))
    skipped = 1 - np.mean([r["predicted_fraction"] for r in section["report"]])
    print(
        f"{opts.model}: predictor {section['kind']} made in {section['seconds']:.1f} s "
        f"(this run {trained_s:.1f} s), skips {skipped:.1%} on calibration tokens; "
        f"promise: worst domain {promise:+.1%} ({measured.get('worst')}); "
        f"{opts.measure}, {opts.backend}, {platform.processor() or platform.machine()}"
    )
    configs = ["layers"] if opts.measure == "layers" else opts.config
    print("| domain | tokens | dense | " + " | ".join(configs) + " |")
    print("|---|---|---|" + "---|" * len(configs))
    for name, row in rows.items():
        dense = row["dense"]["perplexity"]
        cells = [
            f"{row[c]['perplexity']:.3f} ({row[c]['perplexity'] / dense - 1:+.1%}, "
            f"{row[c]['skipped']:.1%} skipped)"
            for c in configs
        ]
        print(
            f"| {name} | {row['dense']['tokens']} | {dense:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    if opts.out:
        Path(opts.out).write_text(
            json.dumps(
                {
                    "options": vars(opts),
                    "train_seconds": trained_s,
                    "rows": rows,
                    "predictor": section,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
