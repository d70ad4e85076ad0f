"""Non-finite logits (inf, nan): one cheap check per token, and only when it fails a
slow re-run that names the first layer where non-finite values appear.

Weights corrupted in place (an ffn.bin of 0xff bytes, NaN norms) keep their sizes and
pass `Layout.open`; without this check such a model decodes a stream of end tokens
and exits as if all went well. The token path itself carries no per-layer checks.
"""

from __future__ import annotations

import numpy as np


class NonFiniteError(ValueError):
    """Generation met non-finite logits; the message names where they start."""


def check_logits(model, logits: np.ndarray, tokens: list[int], prefill: int) -> None:
    """Raise NonFiniteError when `logits` (NumPy, of the last of `tokens`, or of all)
    hold inf or nan. `prefill`: how many of `tokens` ran as the prompt (the re-run
    takes the same path, sparse decode steps included).

    Raises:
        NonFiniteError: naming the first layer whose values are non-finite.
    """
    if np.isfinite(logits).all():  # tens of microseconds for a 50k vocabulary
        return
    raise NonFiniteError(
        f"non-finite logits (inf or nan) after {len(tokens)} "
        f"token{'s' * (len(tokens) > 1)}: "
        f"{locate(model, tokens, prefill)}; "
        "the weights may be corrupted: check them with flashinfer inspect MODEL "
        "--verify, or re-convert the model"
    )


def check_weights(values: np.ndarray, where: str) -> None:
    """Raise NonFiniteError when predictor weights hold inf or nan: a predictor's
    comparisons turn nan into "no neuron fires", which no logits check would see.

    Raises:
        NonFiniteError: naming `where`.
    """
    if hasattr(values, "scales"):  # quantized: its integers are always finite
        check_weights(values.scales, where)
        check_weights(values.biases, where)
        return
    flat = values.reshape(-1)
    # in blocks: a whole-tensor mask is a transient of half its size (206 MB for
    # OPT-6.7B's embedding), above the memory plan at load
    step = 1 << 22
    if values.dtype == np.uint16:  # bfloat16 held as its bits: exponent all ones
        finite = not any(
            ((flat[i : i + step] & 0x7F80) == 0x7F80).any()
            for i in range(0, len(flat), step)
        )
    else:
        finite = all(
            np.isfinite(flat[i : i + step]).all() for i in range(0, len(flat), step)
        )
    if not finite:
        raise NonFiniteError(
            f"{where}: non-finite values (inf or nan); the weights may be corrupted: "
            "check them with flashinfer inspect MODEL --verify, or re-convert the model"
        )


def locate(model, tokens: list[int], prefill: int) -> str:
    """Where non-finite values first appear when `tokens` run from a fresh cache, with
    a check on every layer's FFN input and output (slow; for the failure path only)."""
    fast = model.ffn
    model.ffn = _CheckedFFN(fast, model.backend)
    try:
        model.logits(tokens, prefill=max(1, min(prefill, len(tokens))))
    except _Found as found:
        return str(found)
    finally:
        model.ffn = fast
    return "every layer's output is finite: first in the final norm or lm_head"


class _Found(Exception):
    pass


class _CheckedFFN:
    """The model's FFN with a finiteness check around each call; everything else
    (token hooks, counters) passes through."""

    def __init__(self, ffn, backend):
        self._ffn = ffn
        self._backend = backend

    def __getattr__(self, name):
        return getattr(self._ffn, name)

    def _finite(self, x) -> bool:
        return bool(np.isfinite(self._backend.to_numpy(x)).all())

    def __call__(self, layer: int, h):
        if not self._finite(h):
            before = (
                "embeddings, attention or norms" if layer == 0 else "attention or norms"
            )
            raise _Found(f"first in layer {layer}, before its FFN ({before})")
        out = self._ffn(layer, h)
        if not self._finite(out):
            raise _Found(f"first in layer {layer}'s FFN output")
        return out
