"""Train a layout's low-rank predictor: collect activations, fit, store, report.

The model runs from its layout in flash mode (memory bounded by a budget; the model
never has to fit). Each calibration sequence runs as a prompt, which streams every
layer's FFN; on the way we record per layer the FFN input h (the normed attention
output, paper section 3.1) and the true active set: activation non-zero for ReLU-family
models, above a per-layer threshold calibrated to a target sparsity for SiLU models
(CATS). Samples go to temporary memory-mapped files, then each layer is fitted
(`lowrank.train_layer`).

The predictor file is written under a new name and the manifest is switched to it last,
atomically: an interrupted run leaves the layout as it was.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .layout import Layout
from .lowrank import save_predictor, train_layer
from .predictors import activation_mask, silu_magnitude
from .staging import clear_dead_temp

TEMP_PREFIX = "flashinfer-train"  # activations while training: TMPDIR/PREFIX-PID-*

GENERIC_PROMPTS = [
    "Once upon a time",
    "The history of science shows that",
    "Here is a simple recipe for dinner:",
    "In today's news,",
    "def main():",
    "Dear friend, I am writing to tell you",
    "The most important thing to know about the ocean is",
    "Q: Why is the sky blue?\nA:",
]
MIN_TOKENS = 128  # below this no layer can be fitted and checked on a held-out split


class ActivationRecorder:
    """Collects (h, true active set) per layer from the flash FFN's prefill stream.

    FlashFFN calls it with each streamed chunk of a layer's neurons; the chunk's gate
    (OPT: fc1) pre-activations decide which neurons fire. Rows of h are stored as
    float16 and masks as packed bits, in memory-mapped files under `folder`.
    """

    def __init__(
        self,
        backend,
        args,
        fc1_bias: list,
        folder: Path,
        capacity: int,
        silu_sparsity: float,
    ):
        self.backend, self.args = backend, args
        self.fc1_bias = fc1_bias
        self.silu_sparsity = silu_sparsity
        self.silu_thresholds: list[float | None] = [None] * args.num_hidden_layers
        n, d = args.intermediate_size, args.hidden_size
        layers = range(args.num_hidden_layers)
        self.inputs = [
            np.lib.format.open_memmap(
                folder / f"h{i}.npy", "w+", np.float16, (capacity, d)
            )
            for i in layers
        ]
        self.masks = [
            np.lib.format.open_memmap(
                folder / f"m{i}.npy", "w+", np.uint8, (capacity, (n + 7) // 8)
            )
            for i in layers
        ]
        self.count = [0] * args.num_hidden_layers
        self._gate: dict[int, list] = {}
        self._up: dict[int, list] = {}

    def __call__(self, layer: int, h, ids: np.ndarray, rows: list) -> None:
        B, args = self.backend, self.args
        bias = self.fc1_bias[layer]
        bias = None if bias is None else B.take_rows(bias, ids)
        gate = B.to_numpy(B.linear(h, B.rows_weight(rows[0]), bias))
        self._gate.setdefault(layer, []).append(gate)
        if args.hidden_act in ("drelu", "silu"):
            self._up.setdefault(layer, []).append(
                B.to_numpy(B.linear(h, B.rows_weight(rows[1])))
            )
        if ids[-1] == args.intermediate_size - 1:  # the layer's last chunk
            self._finish(layer, B.to_numpy(h))

    def _finish(self, layer: int, h: np.ndarray) -> None:
        gate = np.concatenate(self._gate.pop(layer), axis=1)
        up = np.concatenate(self._up.pop(layer), axis=1) if layer in self._up else None
        if self.args.hidden_act == "silu" and self.silu_thresholds[layer] is None:
            self.silu_thresholds[layer] = float(
                np.quantile(silu_magnitude(gate), self.silu_sparsity)
            )
        if self.args.hidden_act == "silu":
            mask = contribution_mask(gate, up, self.silu_sparsity)
        else:
            mask = activation_mask(self.args, gate, up, self.silu_thresholds, layer)
        start = self.count[layer]
        stop = min(start + len(h), len(self.inputs[layer]))
        self.inputs[layer][start:stop] = h[: stop - start]
        self.masks[layer][start:stop] = np.packbits(mask[: stop - start], axis=1)
        self.count[layer] = stop

    def layer_data(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        n = self.count[layer]
        X = np.asarray(self.inputs[layer][:n], dtype=np.float32)
        Y = np.unpackbits(
            self.masks[layer][:n], axis=1, count=self.args.intermediate_size
        ).astype(bool)
        return X, Y


def contribution_mask(gate: np.ndarray, up: np.ndarray, sparsity: float):
    """SiLU models: per token, the neurons outside the `sparsity` fraction with the
    smallest |silu(gate) x up|, the size of what each adds to the FFN output. The
    training target of the low-rank predictor: keeping the largest |silu(gate)|
    instead (CATS) loses far more (issue "Sparse SiLU models": +30.9% perplexity at
    50% against +3.1% for this set, on the default model)."""
    score = silu_magnitude(gate) * np.abs(up)
    cut = np.quantile(score, sparsity, axis=1, keepdims=True)
    return score > cut


def calibration_sequences(
    model,
    tokenizer,
    texts: list[str] | None,
    tokens: int,
    seq_len: int,
    seed: int,
    progress: bool,
) -> list[list[int]]:
    """Token sequences to calibrate on: the given texts, else text sampled from the
    model itself from a few generic prompts (works for any model without a dataset).

    Raises:
        ValueError: the texts give fewer than MIN_TOKENS tokens.
    """
    from .generate import stream_generate

    if texts:
        ids = tokenizer.encode("\n\n".join(texts))[:tokens]
        if len(ids) < MIN_TOKENS:
            raise ValueError(
                f"the text is too short to train on: {len(ids)} tokens, need at least "
                f"{MIN_TOKENS}"
            )
        return [
            ids[s : s + seq_len]
            for s in range(0, len(ids), seq_len)
            if len(ids[s : s + seq_len]) > 1
        ]
    sequences, total = [], 0
    bar = tqdm(total=tokens, desc="sampling calibration text", disable=not progress)
    per_prompt = max(MIN_TOKENS // 4, min(seq_len, -(-tokens // len(GENERIC_PROMPTS))))
    for i in range(len(GENERIC_PROMPTS) * 8):
        if total >= tokens:
            break
        prompt = tokenizer.encode(GENERIC_PROMPTS[i % len(GENERIC_PROMPTS)])
        out = [
            r.token
            for r in stream_generate(
                model,
                tokenizer,
                prompt,
                max_tokens=per_prompt,
                temp=0.8,
                top_p=0.95,
                seed=seed + i,
            )
        ]
        sequences.append(prompt + out)
        total += len(prompt) + len(out)
        bar.update(len(prompt) + len(out))
    bar.close()
    return sequences


def layer_ranks(layers: int, rank: int, last_rank: int | None) -> list[int]:
    """`rank` for every layer, `last_rank` for the last eighth (paper: OPT 6.7B uses 128
    for the first 28 layers and 1024 for the last 4, which are the most active)."""
    last = max(1, layers // 8) if last_rank else 0
    return [rank] * (layers - last) + [last_rank] * last


def train_predictor(
    path: str | Path,
    texts: list[str] | None = None,
    tokens: int = 4096,
    rank: int = 64,
    last_rank: int | None = None,
    threshold: float = 0.5,
    silu_sparsity: float = 0.5,
    backend: str | None = None,
    memory_budget: str | int = "100%",
    seq_len: int = 256,
    epochs: int = 100,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train and store the low-rank predictor of the layout at `path`.

    Args:
        path: layout directory.
        texts: calibration texts; None samples text from the model itself.
        tokens: calibration tokens to collect.
        rank, last_rank: predictor rank per layer; the last eighth of the layers gets
            `last_rank` when given.
        threshold: probability above which a neuron is predicted active.
        silu_sparsity: SiLU models only: fraction of neurons counted inactive per
            token: the predictor learns the others by |silu(gate) x up|
            (`contribution_mask`); the gate predictor's threshold on |silu(gate)|
            (it cannot see up) is calibrated to the same fraction.
        backend, memory_budget: how the model runs while collecting (flash mode).
        seq_len: tokens per calibration sequence.
        epochs: most epochs per layer (training stops earlier once held-out recall
            reaches 0.99 and the predicted set stops shrinking).

    Returns:
        The manifest's new "predictor" section (report per layer, settings, timing).

    Raises:
        ValueError: a rank out of range, too little text, or a bad option.
    """
    from .loader import load

    started = time.perf_counter()
    layout = Layout.open(path)
    args = layout.args
    ranks = layer_ranks(args.num_hidden_layers, rank, last_rank)
    if not all(1 <= r <= args.hidden_size for r in ranks):
        raise ValueError(
            f"rank {max(ranks)} out of range: 1..{args.hidden_size} (d_model)"
        )
    model, tokenizer = load(
        path, backend=backend, memory_budget=memory_budget, predictor="all", window=1
    )
    seq_len = min(seq_len, model.max_context)
    try:
        sequences = calibration_sequences(
            model, tokenizer, texts, tokens, seq_len, seed, progress
        )
        # activations (100+ MB) of runs killed before cleaning up go first
        clear_dead_temp(Path(tempfile.gettempdir()), TEMP_PREFIX)
        prefix = f"{TEMP_PREFIX}-{os.getpid()}-"
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            total = sum(len(s) for s in sequences)
            recorder = ActivationRecorder(
                model.backend, args, model.ffn.fc1_bias, Path(tmp), total, silu_sparsity
            )
            model.ffn.observer = recorder
            for seq in tqdm(
                sequences, desc="collecting activations", disable=not progress
            ):
                model.logits(seq if len(seq) > 1 else seq * 2)
            model.ffn.observer = None
            A_list, B_list, reports = [], [], []
            for layer in tqdm(
                range(args.num_hidden_layers),
                desc="training layers",
                disable=not progress,
            ):
                X, Y = recorder.layer_data(layer)
                A, B, report = train_layer(
                    X,
                    Y,
                    ranks[layer],
                    epochs=epochs,
                    threshold=threshold,
                    seed=seed + layer,
                )
                A_list.append(A)
                B_list.append(B)
                reports.append(report)
            silu_thresholds = recorder.silu_thresholds
    finally:
        model.ffn.close()
    return store_predictor(
        layout,
        A_list,
        B_list,
        reports,
        {
            "threshold": threshold,
            "ranks": ranks,
            "tokens": total,
            "epochs": epochs,
            "source": "texts" if texts else "sampled from the model",
            "silu_sparsity": silu_sparsity if args.hidden_act == "silu" else None,
            "silu_thresholds": silu_thresholds if args.hidden_act == "silu" else None,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )


def store_predictor(layout: Layout, A_list, B_list, reports, settings: dict) -> dict:
    """Write the predictor under a fresh name, then switch the manifest to it."""
    tmp = layout.path / ".predictor.new"
    save_predictor(tmp, A_list, B_list)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    name = f"predictor-{digest[:12]}.safetensors"
    old = (layout.manifest.get("predictor") or {}).get("file")
    try:
        tmp.rename(layout.path / name)
        files = dict(layout.manifest["files"])
        files.pop(old, None)
        files[name] = {"size": (layout.path / name).stat().st_size, "sha256": digest}
        section = {
            "kind": "lowrank",
            "file": name,
            "nbytes": sum(
                4 * (a.size + b.size) for a, b in zip(A_list, B_list, strict=True)
            ),
            **settings,
            "report": [
                {
                    k: r[k]
                    for k in (
                        "recall",
                        "precision",
                        "predicted_fraction",
                        "true_fraction",
                        "rank",
                        "epochs",
                    )
                }
                for r in reports
            ],
        }
        layout.update_manifest({"predictor": section, "files": files})
    except BaseException:
        if name != old:  # never delete the file the manifest still names
            (layout.path / name).unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
        raise
    # older predictors, and those of runs killed before the manifest named them
    for file in layout.path.glob("predictor-*.safetensors"):
        if file.name != name:
            file.unlink(missing_ok=True)
    return section
