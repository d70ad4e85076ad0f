"""`load`: a layout directory -> (Model, Tokenizer) on the chosen backend."""

from __future__ import annotations

from pathlib import Path

from .backends import get_backend
from .layout import Layout
from .model import DenseFFN, Model, prepare_weights
from .tokenizer import Tokenizer

DEFAULT_MAX_CONTEXT = 4096


def load(
    path: str | Path,
    backend: str | None = None,
    dense: bool = True,
    max_context: int | None = None,
):
    """Load a converted model.

    Args:
        path: layout directory (see `convert`).
        backend: "mlx", "numpy" or None (MLX on Apple silicon when installed, else
            NumPy).
        dense: read every FFN weight into memory. The flash runtime (dense=False) is the
            next step of this project and not available yet.
        max_context: tokens the KV cache may hold (default: the model's limit or 4096,
            whichever is smaller).

    Returns:
        (model, tokenizer)

    Raises:
        FileNotFoundError, ValueError: bad path or layout; ImportError: MLX missing.
    """
    B = get_backend(backend)
    layout = Layout.open(path)
    if not dense:
        raise ValueError("the flash runtime (dense=False) is not available yet")
    args = layout.args
    limit = min(args.max_position_embeddings, DEFAULT_MAX_CONTEXT)
    max_context = max_context or limit
    if not 0 < max_context <= args.max_position_embeddings:
        raise ValueError(
            f"max_context {max_context} out of range: 1..{args.max_position_embeddings}"
        )
    weights = prepare_weights(B, layout.resident_tensors())
    ffn = DenseFFN(B, layout, weights)
    model = Model(args, B, weights, ffn, max_context)
    tokenizer = Tokenizer(layout.path, layout.manifest["tokenizer"])
    return model, tokenizer
