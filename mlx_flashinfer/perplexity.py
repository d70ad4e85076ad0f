"""Perplexity of a text, scored in chunks of a fixed context (as users compare
models)."""

from __future__ import annotations

import math

import numpy as np
from tqdm import tqdm

from .model.nonfinite import check_logits


def perplexity(
    model,
    token_ids: list[int],
    context: int,
    *,
    prefill: int | None = None,
    progress: bool = False,
) -> dict:
    """Perplexity of `token_ids` split into non-overlapping chunks of `context` tokens.

    Every token of a chunk but its first is scored given the tokens before it in the
    chunk, so each chunk starts from an empty cache (as llama.cpp's perplexity tool
    does). With `prefill` only the first `prefill` tokens of a chunk run as a prompt
    and the others as decode steps: the sparse path of a flash model is what gets
    scored.

    Args:
        model: from `load`.
        token_ids: the text's tokens.
        context: tokens per chunk, 2..the model's context.
        prefill: tokens of each chunk run as a prompt, >= 1 (None: the whole chunk).
        progress: show a progress bar.

    Returns:
        {"perplexity", "nll" (mean, nats), "tokens" (scored), "chunks"}

    Raises:
        ValueError: fewer than 2 tokens, a context or prefill out of range;
            NonFiniteError (a ValueError) for inf or nan logits, naming the layer.
    """
    if len(token_ids) < 2:
        raise ValueError("the text is too short: it needs at least 2 tokens")
    if not 2 <= context <= model.max_context:
        raise ValueError(f"context {context} out of range: 2..{model.max_context}")
    if prefill is not None and prefill < 1:
        raise ValueError(f"prefill must be >= 1 (or None: whole chunks), got {prefill}")
    total, scored = 0.0, 0
    chunks = [token_ids[s : s + context] for s in range(0, len(token_ids) - 1, context)]
    chunks = [c for c in chunks if len(c) > 1]
    for chunk in tqdm(chunks, desc="perplexity", disable=not progress):
        steps = min(prefill, len(chunk)) if prefill else None
        logits = model.logits(chunk, prefill=steps)
        check_logits(model, logits, chunk, steps or len(chunk))
        logits = logits.astype(np.float64)[:-1]
        logits -= logits.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(logits).sum(axis=-1))
        targets = np.asarray(chunk[1:])
        total += float((log_norm - logits[np.arange(len(targets)), targets]).sum())
        scored += len(targets)
    nll = total / scored
    return {
        "perplexity": math.exp(nll) if nll < 709.0 else math.inf,  # a random model
        "nll": nll,
        "tokens": scored,
        "chunks": len(chunks),
    }
