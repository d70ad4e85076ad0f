"""What skipping neurons costs in quality, measured on calibration text, and per-layer
sparsity chosen for a loss target (`train-predictor --max-loss`).

The loss is the relative increase of perplexity on a few calibration sequences the
predictor did not train on, with each layer's FFN computed over only the neurons its
predictor keeps (densely, layer by layer: `calibrate.LayerByLayer`). That is what
the flash path computes when its cache holds little; a roomier cache keeps more
neurons (those of the last k tokens) and loses less.

Per-layer sparsity for a target, after TEAL (Liu et al. 2024, a greedy allocation
that raises sparsity where it disturbs least, since layers differ in what they
tolerate):
  1. per layer, on the tune tokens, for each sparsity of GRID: the predictor's logit
     cut that skips that share, and the error it leaves in the residual stream:
     per token, sum over skipped neurons i of (a_i |down_i|)^2 (activation times
     the down column's length), over the squared norm of the layer's output;
     averaged per domain, the worst domain's (a layer that other languages need
     is raised late even when English tolerates it);
  2. the greedy path: from every layer dense, repeatedly raise by one GRID step the
     layer whose error grows least;
  3. the longest prefix of that path whose measured loss (every layer sparse at
     once; the worst domain's) stays within the target, by bisection: each step
     one pass of the model over the calibration sequences.
Measuring each layer's loss alone (a pass through the rest of the model per layer)
instead of step 1's error cost more time than the whole training here, and step 3
measures the loss that counts anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..flash.window import cache_loads, window_reuse
from .lowrank_fit import cut_report

GRID = np.round(np.arange(0.0, 0.91, 0.1), 2)  # sparsities a layer may take
MAX_PASSES = 10  # model passes the bisection may take


def sequence_nll(logits: np.ndarray, ids: list[int]) -> float:
    """Summed negative log-likelihood (nats) of ids[1:] given float32 logits
    (T, vocab) of ids."""
    z = logits[:-1] - logits[:-1].max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=-1, dtype=np.float64))
    targets = np.asarray(ids[1:])
    return float((log_norm - z[np.arange(len(targets)), targets]).sum())


@dataclass
class LayerGrid:
    """One layer's options, measured on the tune tokens: for each sparsity of GRID,
    the logit cut (None: every neuron), what it keeps (`lowrank_fit.cut_report`:
    recall of the target set, precision, predicted_fraction, true_fraction) and
    the residual error it leaves (see the module docstring)."""

    cuts: list[float | None]
    kept: list[dict]
    error: list[float]


def layer_grid(z, target, act, down_norms, out_norms, groups=None) -> LayerGrid:
    """The `LayerGrid` of one layer from the tune tokens' predictor logits z, target
    sets and activations (each (T, n)), its down columns' lengths (n,) and the
    norms of the layer's output (T,); with `groups` (row indices of each domain's
    tokens), a cut's error is the worst domain's mean, not all tokens'."""
    weight = (act * down_norms) ** 2 / np.maximum(out_norms**2, 1e-12)[:, None]
    groups = groups or [np.arange(len(z))]
    cuts = [None] + [float(c) for c in np.quantile(z, GRID[1:])]
    kept, error = [], []
    for cut in cuts:
        kept.append({**cut_report(z, target, cut), "window": predicted_window(z, cut)})
        if cut is None:
            error.append(0.0)
            continue
        per_token = np.where(z <= cut, weight, 0.0).sum(axis=1)
        error.append(max(float(per_token[g].mean()) for g in groups))
    return LayerGrid(cuts, kept, error)


def predicted_window(z: np.ndarray, cut: float | None, caches: bool = False) -> dict:
    """What windows of the tune tokens' predicted sets (z > cut; None: every neuron)
    load and hold (`window.window_reuse`): the cost model's statistics; with
    `caches`, also what caches smaller than a window's union load
    (`window.cache_loads`: the chosen cut's report, not every cut of the grid)."""
    masks = z > cut if cut is not None else np.ones(z.shape, bool)
    window = window_reuse(masks)
    return {**window, **cache_loads(masks)} if caches else window


def greedy_path(grids: list[LayerGrid]) -> list[int]:
    """The layers raised one GRID step at a time, least added error first."""
    steps = [0] * len(grids)
    path = []
    while True:
        options = [
            (grid.error[g + 1] - grid.error[g], layer)
            for layer, (grid, g) in enumerate(zip(grids, steps, strict=True))
            if g + 1 < len(GRID)
        ]
        if not options:
            return path
        _, layer = min(options)
        steps[layer] += 1
        path.append(layer)


def steps_after(path: list[int], k: int, layers: int) -> list[int]:
    """Each layer's GRID index after the first k steps of the path."""
    steps = [0] * layers
    for layer in path[:k]:
        steps[layer] += 1
    return steps


@dataclass
class Allocation:
    """The result of `allocate`: each layer's GRID index, the measured loss
    (relative perplexity increase) there, whether it meets the target, and the
    path prefixes measured with their loss."""

    steps: list[int]
    loss: float
    met: bool
    tried: dict[int, float]


def allocate(
    path: list[int],
    layers: int,
    max_loss: float,
    measure: Callable[[list[int]], float],
) -> Allocation:
    """The longest prefix of `path` whose measured loss is within `max_loss`,
    assuming loss grows along the path; by bisection, at most MAX_PASSES
    measurements, stopping within 1/64 of the path.

    Args:
        path: from `greedy_path`.
        layers: how many layers.
        max_loss: the target, a relative perplexity increase (0.03 = 3%).
        measure: per-layer GRID indices -> measured loss.

    Returns:
        An `Allocation`. When even the first step exceeds the target, the
        allocation is that step's (the least loss reached with anything skipped)
        and `met` is False.
    """
    tried: dict[int, float] = {}

    def loss_at(k: int) -> float:
        if k not in tried:
            tried[k] = measure(steps_after(path, k, layers))
        return tried[k]

    lo, hi = 0, len(path) + 1  # lo: within the target (dense is); hi: beyond it
    close = max(1, len(path) // 64)
    while hi - lo > close and len(tried) < MAX_PASSES:
        k = (lo + hi) // 2
        if loss_at(k) <= max_loss:
            lo = k
        else:
            hi = k
    if lo == 0 and path:  # the first step decides: within the target or not
        if loss_at(1) > max_loss:
            return Allocation(steps_after(path, 1, layers), tried[1], False, tried)
        lo = 1
    return Allocation(steps_after(path, lo, layers), tried.get(lo, 0.0), True, tried)
