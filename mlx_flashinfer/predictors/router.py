"""The router of a mixture of experts as a predictor: exact, holding nothing.

It says which experts a token uses (`predict`: a mask over the experts, the
predictor interface) and with what weights (`route`, what the experts placement
calls), as the family defines routing (`model/moe.py`). The router matrices are
resident weights, counted there, so the predictor itself holds no bytes.
"""

from __future__ import annotations

import numpy as np

from ..model.moe import route, router_logits


class RouterPredictor:
    """The routers of every MoE layer (resident weights) as an exact predictor."""

    name = "router"
    exact = True
    nbytes = 0

    def __init__(self, backend, args, weights: dict):
        if not args.is_moe:
            raise ValueError(
                "the router predictor is for mixtures of experts; this model is dense"
            )
        self.backend, self.args, self.weights = backend, args, weights

    def route(self, layer: int, h) -> tuple[np.ndarray, np.ndarray]:
        """Each token's experts (T, k) and weights (T, k), on the host."""
        logits = router_logits(self.backend, self.args, self.weights, layer, h)
        return route(self.args, logits)

    def predict(self, layer: int, h) -> np.ndarray:
        ids, _ = self.route(layer, h)
        mask = np.zeros((len(ids), self.args.num_experts), dtype=bool)
        np.put_along_axis(mask, ids, True, axis=-1)
        return mask
