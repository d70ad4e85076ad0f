"""The model's statistics the cost model reads (`costs.py`): per layer, the share of
neurons a predictor names a token and what a window of k tokens loads and holds of
them, from the predictor's report in the layout's manifest (`train-predictor`
records them on its calibration tokens; `tools/synth.py` on decode steps of its
synthetic model), with what caches smaller than a window's union load
(`flash/window.cache_loads`).
"""

from __future__ import annotations

import numpy as np

from ..flash.window import WINDOW_GRID
from ..formats.layout import Layout

# Without window statistics (a predictor trained before they were kept): a window of
# k >= 1 tokens loads a quarter of the predicted neurons (paper: OPT 10% -> 2.4%) and
# holds twice them; said in the prediction's note.
PRIOR_LOADED = 0.25
PRIOR_CACHED = 2.0


def window_stats(
    layout: Layout, predictor: str, k: int, capacity: list | None = None
) -> tuple[list, str]:
    """Per layer (predicted, loaded, held) fractions of the neurons for a window of
    k, from the predictor's report in `layout`, and where they came from. With the
    plan's `capacity` (rows a layer's cache holds): where the window's union
    overflows it, the loads the report simulated for caches of that size
    (`window.cache_loads`), else (an older report) interpolated over the rows each
    window holds, from a token's whole set where nothing is held."""
    args = layout.args
    section = layout.manifest.get("predictor") or {}
    report = section.get("report") or []
    layers = args.num_hidden_layers
    if predictor == "all":
        return [(1.0, 1.0 if k == 0 else 0.0, 1.0)] * layers, "every neuron"
    key = "true_fraction" if predictor in ("gate", "oracle") else "predicted_fraction"
    if len(report) != layers or not all(key in r for r in report):
        return [(1.0, 1.0, 1.0)] * layers, "no predictor report: every neuron"
    stats, measured = [], True
    for i, entry in enumerate(report):
        p = float(entry[key])
        window = entry.get("window")
        if window and predictor not in ("gate", "oracle"):
            loaded = float(np.interp(k, window["k"], window["loaded"]))
            held = float(np.interp(k, window["k"], window["cached"]))
            room = capacity[i] / args.intermediate_size if capacity else held
            if held > room and "share" in window:  # simulated at cache sizes
                loaded = _cache_loaded(window, k, room)
                held = room
            elif held > room:  # loads by rows held: none held, then each window's
                rows = [0.0] + window["cached"][1:]  # union (k >= 1) as measured
                loads = [window["cached"][0]] + window["loaded"][1:]
                loaded, held = float(np.interp(room, rows, loads)), room
        else:
            measured = False
            loaded = p if k == 0 else p * PRIOR_LOADED
            held = p if k == 0 else min(1.0, p * PRIOR_CACHED)
        stats.append((p, loaded, held))
    source = (
        f"the predictor's report (windows of {', '.join(map(str, WINDOW_GRID))})"
        if measured
        else "the predictor's report, window reuse assumed (paper: a window loads a "
        "quarter of the predicted neurons)"
    )
    return stats, source


def _cache_loaded(window: dict, k: float, room: float) -> float:
    """A window of k's loads with a cache of `room` (a share of the neurons), from
    the report's simulated caches: per simulated window, over the shares up to its
    union (where its own loads hold; nothing cached: a token's whole set), then
    across windows."""
    per_k = []
    for i, union in enumerate(window["cached"]):
        shares = [0.0] + [s for s in window["share"] if s < union] + [union]
        loads = window["loaded_at"][i]
        kept = [window["cached"][0]] + loads[: len(shares) - 2] + [window["loaded"][i]]
        per_k.append(float(np.interp(room, shares, kept)))
    return float(np.interp(k, window["k"], per_k))
