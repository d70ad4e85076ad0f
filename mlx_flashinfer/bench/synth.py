"""Synthetic sparse models written straight to a layout, with a constructed
predictor: the models of the paper's shapes the benchmarks run on (no real OPT-6.7B
is downloaded here). OPT: synth_opt.py (which also says exactly how the activation
structure is built); Llama with FATReLU: synth_llama.py.

    python tools/synth.py DST --shape opt-6.7b [--arrangement separate]
"""

from __future__ import annotations

import gc
import math
import time
from pathlib import Path

import numpy as np

from ..flash.window import cache_loads, window_reuse
from ..formats.convert import _check_destination, write_layout
from ..formats.layout import Layout
from ..predictors.lowrank import held_bytes, predictor_tensors
from ..predictors.store import store_predictor
from .synth_llama import LLAMA_SHAPES, SyntheticLlama
from .synth_opt import SHAPES, Structure, SyntheticOPT

__all__ = ["LLAMA_SHAPES", "SHAPES", "Structure", "measure_quality", "write_synthetic"]

QUALITY_TOKENS = 64  # scored by measure_quality (16 as a prompt, 48 decode steps)
QUALITY_SEED = 1  # not the benchmarks' sequence (seed 0)
QUALITY_BUDGET = "100%"  # flash's budget while scoring (overflow rows are computed
# all the same, so the loss does not depend on it); dense is freed first


def write_synthetic(
    dst: str | Path,
    shape: str | dict = "opt-1.3b",
    dtype: str = "float16",
    arrangement: str = "bundled",
    seed: int = 0,
    structure: Structure | None = None,
    force: bool = False,
    progress: bool = True,
    group_size: int | None = None,
    down_bits: int | None = None,
    quality_tokens: int = QUALITY_TOKENS,
) -> Path:
    """Write a synthetic sparse model (OPT or Llama-FATReLU) as a layout, with its
    predictor.

    Args:
        dst: layout directory to create.
        shape: "opt-tiny", "opt-125m", "opt-1.3b", "opt-6.7b", "llama-tiny",
            "llama2-7b-relu" (synth_llama.py), or a dict of custom sizes
            (hidden_size, ffn_dim (OPT) or intermediate_size (Llama),
            num_hidden_layers, num_attention_heads, vocab_size,
            max_position_embeddings).
        dtype, arrangement, force, progress, group_size, down_bits: as for
            `convert`.
        seed: every weight follows from it (same seed, same model).
        structure: the activation structure (module docstring); default `Structure()`.
        quality_tokens: tokens `measure_quality` scores for the predictor's loss
            (0: not measured; the planner then allows only exact plans).

    Returns:
        The layout directory.

    Raises:
        ValueError: an unknown shape or bad structure; FileExistsError: `dst` exists.
    """
    started = time.perf_counter()
    _check_destination(dst, dtype, arrangement, force)
    if isinstance(shape, dict):
        llama = "intermediate_size" in shape
        heads = shape.get("num_attention_heads", 1)
        if shape.get("hidden_size", 0) % heads:
            raise ValueError(
                f"hidden size {shape.get('hidden_size')} is not a multiple of the "
                f"{heads} attention heads"
            )
    else:
        llama = shape in LLAMA_SHAPES
    if llama:
        source = SyntheticLlama(shape, structure, seed)
    else:
        source = SyntheticOPT(shape, structure or Structure(), seed)
    write_layout(
        source, dst, dtype, progress, arrangement, force, group_size, down_bits
    )
    A_list, B_list, reports = source.predictor()
    layout = Layout.open(dst)
    store_predictor(
        layout,
        predictor_tensors(A_list, B_list),
        reports,
        {
            "kind": "lowrank",
            "nbytes": held_bytes(A_list, B_list, layout.float_dtype),
            "threshold": source.predictor_threshold,
            "ranks": [source.j0 + 1] * source.args.num_hidden_layers,
            "tokens": 0,
            "source": "constructed by synth.py from the model's structure (untrained)",
            "silu_sparsity": None,
            "silu_thresholds": None,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    if quality_tokens:
        measure_quality(dst, tokens=quality_tokens)
    return Path(dst)


def measure_quality(
    dst: str | Path, *, tokens: int = QUALITY_TOKENS, backend: str = "numpy"
) -> dict:
    """The constructed predictor's perplexity loss, recorded in the manifest as a
    trained predictor's calibrated loss is: the planner allows a predictor's sparse
    plans only within a measured loss, and without one a synthetic model's plan row
    could only choose exact plans.

    Dense, then flash with the predictor, score the same `tokens` random token ids
    (`sequence_tokens`, seed QUALITY_SEED): the first PERPLEXITY_PREFILL as a
    prompt, every later one a decode step through the sparse path. The loss is
    flash's perplexity over dense's, minus one (a random model's text is random
    tokens; the loss is how far the predictor moves what the model says), from
    the mean NLLs, as a random model's perplexity can overflow a float.

    Returns:
        The manifest's new predictor "quality" section.
    """
    from ..loader import load
    from ..perplexity import perplexity
    from ..verify import PERPLEXITY_PREFILL
    from .configs import sequence_tokens

    layout = Layout.open(dst)
    ids = sequence_tokens(layout, None, tokens, QUALITY_SEED)
    score = {"context": len(ids), "prefill": PERPLEXITY_PREFILL}
    found, masks = {}, {}
    for name, how in (
        ("dense", {"dense": True}),
        ("flash", {"memory_budget": QUALITY_BUDGET, "predictor": "lowrank"}),
    ):
        model, _ = load(dst, backend=backend, lookahead=False, **how)
        if name == "flash":
            _record_decode_masks(model.ffn.predictor, masks)
        found[name] = perplexity(model, ids, **score)
        del model  # never both in memory: a 7B float16 model is half of DRAM here
        gc.collect()
    quality = {
        "loss": math.exp(found["flash"]["nll"] - found["dense"]["nll"]) - 1.0,
        "dense_nll": found["dense"]["nll"],
        "flash_nll": found["flash"]["nll"],
        "tokens": found["dense"]["tokens"],
        "text": f"random token ids (seed {QUALITY_SEED}), decode steps after "
        f"{PERPLEXITY_PREFILL}",
        "backend": backend,
    }
    section = dict(layout.manifest["predictor"], quality=quality)
    section["report"] = [  # the window statistics as decoded, not as simulated
        dict(entry, **measured_window(masks[layer], quality["text"]))
        for layer, entry in enumerate(section["report"])
    ]
    layout.update_manifest({"predictor": section})
    return quality


def _record_decode_masks(predictor, masks: dict) -> None:
    """Keep every decode step's predicted set, per layer, as the flash model runs
    (the predictor's `predict` wrapped on this instance only)."""
    predict = predictor.predict

    def recording(layer, h):
        mask = predict(layer, h)
        if mask.shape[0] == 1:  # a decode step (prompts predict many rows at once)
            masks.setdefault(layer, []).append(np.asarray(mask[0], dtype=bool))
        return mask

    predictor.predict = recording


def measured_window(masks: list, text: str) -> dict:
    """A layer's predicted fraction and window statistics (`window_reuse`) from the
    sets its decode steps predicted: what the cost model reads of a trained
    predictor's report, measured here instead of simulated (the simulation
    foresaw 336 MB read a token on the OPT-6.7B shape where runs read 190-202)."""
    stacked = np.stack(masks)
    return {
        "predicted_fraction": float(stacked.mean()),
        "window": {**window_reuse(stacked), **cache_loads(stacked)},
        "window_source": f"{len(masks)} decode steps of {text}",
    }
