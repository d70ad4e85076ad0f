"""Flash against dense, token by token: the check to run before trusting a sparse
setup.

The dense model decodes greedily; then both models are teacher-forced on those tokens,
so every position is compared at the same context and one early difference does not
shift all later ones. Each compared step runs through the flash path as a decode step.
Beside it, both score a short passage that calibration never sees (`perplexities`):
agreeing tokens can hide a loss that perplexity shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .flash.memory import format_bytes
from .generate import generate_step
from .perplexity import perplexity

PERPLEXITY_PREFILL = 16  # tokens of the passage run as a prompt; the rest decode


@dataclass
class Comparison:
    """The result of `compare`.

    tokens: the sequence both models read (prompt, then the dense model's tokens);
    prompt_tokens: how many of them are the prompt; flash_top / dense_top: each decode
    step's greedy pick (steps, ); max_diff: max |flash - dense| over the steps' logits;
    dense_span: (min, max) of the dense logits; io: the flash model's decode counters
    (`FlashStats.summary`).
    """

    tokens: list[int]
    prompt_tokens: int
    flash_top: np.ndarray
    dense_top: np.ndarray
    max_diff: float
    dense_span: tuple[float, float]
    io: dict

    @property
    def steps(self) -> int:
        return len(self.dense_top)

    @property
    def agreeing(self) -> int:
        return int((self.flash_top == self.dense_top).sum())

    @property
    def first_divergence(self) -> int | None:
        """Index of the first step whose picks differ, or None."""
        differ = np.flatnonzero(self.flash_top != self.dense_top)
        return int(differ[0]) if len(differ) else None


def compare(
    flash, dense, prompt_ids: list[int], max_tokens: int, eos_ids=()
) -> Comparison:
    """Decode up to `max_tokens` greedy tokens with `dense`, then score the sequence
    with both models (prompt as a prefill, every later token a decode step).

    Args:
        flash: a model loaded from flash (`load(..., memory_budget=...)`), freshly
            loaded so its decode counters cover this run only.
        dense: the same model loaded dense.
        prompt_ids: the prompt's token ids.
        max_tokens: decode steps to compare (fewer when the dense model ends or the
            context fills).
        eos_ids: token ids that end the dense model's text.

    Returns:
        A `Comparison`.

    Raises:
        ValueError: an empty or too long prompt, or max_tokens < 1.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    ids = dense.check_tokens(prompt_ids)
    tokens = []
    for token in generate_step(dense, ids, max_tokens=max_tokens):
        tokens.append(token)
        if token in eos_ids:
            break
    n, seq = len(ids), (ids + tokens)[: dense.max_context]
    if len(seq) == n:
        raise ValueError("the prompt fills the context: no room to decode")
    want = dense.logits(seq, prefill=n)[n:]
    got = flash.logits(seq, prefill=n)[n:]
    return Comparison(
        tokens=seq,
        prompt_tokens=n,
        flash_top=np.argmax(got, axis=1),
        dense_top=np.argmax(want, axis=1),
        max_diff=float(np.abs(got - want).max()),
        dense_span=(float(want.min()), float(want.max())),
        io=flash.io_stats()["decode"],
    )


def report_lines(result: Comparison, tokenizer, args, ffn_bytes: int) -> list[str]:
    """The verdict in a few lines.

    Args:
        result: from `compare`.
        tokenizer: to show the tokens where the models part.
        args: the model's `ModelArgs` (its activation decides how exact flash is).
        ffn_bytes: the whole FFN on disk, what a dense step would read from flash.

    Returns:
        Lines without newlines.
    """
    io, steps = result.io, result.steps
    lines = [f"tokens agree: {result.agreeing}/{steps}"]
    j = result.first_divergence
    if j is None:
        lines.append("first divergence: none")
    else:
        n = result.prompt_tokens
        context = tokenizer.decode(result.tokens[max(n, n + j - 4) : n + j + 1])
        lines.append(
            f"first divergence: step {j + 1}, after {context!r}: flash picks "
            f"{tokenizer.decode([int(result.flash_top[j])])!r}, dense "
            f"{tokenizer.decode([int(result.dense_top[j])])!r}"
        )
    low, high = result.dense_span
    lines.append(
        f"max |logit difference|: {result.max_diff:.3g} "
        f"(dense logits span {low:.1f} .. {high:.1f})"
    )
    lines.append(
        f"flash reads per token: {format_bytes(io['bytes_per_token'])} "
        f"(the whole FFN is {format_bytes(ffn_bytes)}), "
        f"{io['reads'] / max(io['tokens'], 1):.1f} reads, "
        f"cache hit rate {io['hit_rate']:.1%}"
    )
    if args.is_moe:
        lines.append(
            "a mixture of experts: every routed expert is read (the router is "
            "exact), so flash equals dense up to float rounding"
        )
    elif args.is_relu_family:
        lines.append(
            f"{args.hidden_act}: ReLU family, so flash equals dense wherever the "
            "predictor misses no firing neuron"
        )
    else:
        lines.append(
            f"{args.hidden_act}: not ReLU family, so the sparsity is approximate: the "
            "neurons left out are small, not zero, so logits differ and tokens may too"
        )
    return lines


def perplexities(flash, dense, ids: list[int]) -> tuple[dict, dict]:
    """Perplexity of `ids` (one chunk, its first PERPLEXITY_PREFILL tokens as a
    prompt, every later token a decode step) by the flash and the dense model.

    Raises:
        ValueError: fewer than PERPLEXITY_PREFILL + 2 tokens.
    """
    ids = ids[: min(flash.max_context, dense.max_context)]
    if len(ids) < PERPLEXITY_PREFILL + 2:
        raise ValueError(
            f"{len(ids)} tokens are too few to score: need {PERPLEXITY_PREFILL + 2}"
        )
    score = {"context": len(ids), "prefill": PERPLEXITY_PREFILL}
    return perplexity(flash, ids, **score), perplexity(dense, ids, **score)


def perplexity_line(flash: dict, dense: dict, what: str) -> str:
    """The perplexities of `perplexities` in one line."""
    change = flash["perplexity"] / dense["perplexity"] - 1
    return (
        f"perplexity of {what} ({dense['tokens']} tokens scored, decode steps after "
        f"{PERPLEXITY_PREFILL}): dense {dense['perplexity']:.3f}, flash "
        f"{flash['perplexity']:.3f} ({change:+.1%})"
    )
