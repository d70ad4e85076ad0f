"""Fitting the low-rank predictor (`lowrank.py`) to one layer, and choosing its cut.

Trained on the layer's FFN inputs and true active sets with a balanced binary
cross-entropy and AdamW until held-out recall reaches 0.99 (the Deja Vu recipe the
paper follows, section 3.1) and further epochs stop shrinking the predicted set.

- `train_layer`: fit one layer (NumPy with hand-written gradients, or MLX).
- `cut_for_recall`, `cut_report`: a layer's cut for a recall target, and what it
  keeps.
"""

from __future__ import annotations

import importlib.util
import math
import time

import numpy as np

from .lowrank import check_probability, logit

TARGET_RECALL = 0.99  # Deja Vu: held-out recall to reach before stopping
MIN_SHRINK = 0.02  # an epoch that shrinks the predicted set less made no progress
MIN_GAIN = 0.005  # ... nor one that raises recall (below the target) less
PATIENCE = 5  # epochs without progress before training stops (slow steady gains count)
MAX_POS_WEIGHT = 100.0  # a layer with almost no positives must not blow up the loss
WEIGHT_DECAY = 1e-4
MIN_SPLIT_TOKENS = 16  # fewest tokens in either split
BETAS = (0.9, 0.999)
EPS = 1e-8
# use_mlx=None picks MLX only on a GPU and for steps of at least this many
# multiply-adds (batch * rank * (d_model + n_ffn)). Measured on Linux with mlx[cpu],
# 2 cores: MLX trains 8x slower than NumPy on the test layer (d=32, n=96, rank 8) and
# 20x slower at d=576, n=1536, rank 64 (3.1 s against 0.16 s per epoch of 16,000
# tokens); its CPU exp/log over the (batch, n_ffn) logits take 10 ms a step, NumPy's
# 0.3 ms. On Metal small steps pay kernel launches; this cut is unmeasured there.
MLX_MIN_STEP_WORK = 10_000_000


def _pick_mlx(batch: int, d: int, n: int, rank: int) -> bool:
    if importlib.util.find_spec("mlx") is None:
        return False
    import mlx.core as mx

    return mx.metal.is_available() and batch * rank * (d + n) >= MLX_MIN_STEP_WORK


def _adamw(param, grad, m, v, step: int, lr: float) -> None:
    """One AdamW step in place, the same arithmetic as mlx.optimizers.AdamW with
    bias correction (decay first, then the Adam update)."""
    b1, b2 = BETAS
    param *= 1.0 - lr * WEIGHT_DECAY
    m *= b1
    m += (1.0 - b1) * grad
    v *= b2
    v += (1.0 - b2) * grad * grad
    denom = np.sqrt(v) / math.sqrt(1.0 - b2**step) + EPS
    param -= (lr / (1.0 - b1**step)) * m / denom


def _numpy_epoch(A, B, state, X, Y, order, batch, lr, pos_weight) -> None:
    """One pass over X[order] in minibatches; A, B and the AdamW state change in place.

    Loss per element: -(w y log p + (1 - y) log(1 - p)), mean over the batch; its
    gradient in the logits z is (p (w y + 1 - y) - w y) / size.
    """
    mA, vA, mB, vB = state["m_A"], state["v_A"], state["m_B"], state["v_B"]
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        x, y = X[rows], Y[rows].astype(np.float32)
        h = x @ A.T  # (b, rank)
        z = h @ B.T  # (b, n)
        p = 0.5 + 0.5 * np.tanh(0.5 * z)  # sigmoid without exp overflow
        wy = pos_weight * y
        g = (p * (wy + 1.0 - y) - wy) / np.float32(z.size)
        grad_B = g.T @ h
        grad_A = (g @ B).T @ x
        state["step"] += 1
        _adamw(A, grad_A, mA, vA, state["step"], lr)
        _adamw(B, grad_B, mB, vB, state["step"], lr)


def _make_mlx_epoch(A, B, lr, pos_weight):
    """An epoch function over MLX parameters held transposed (A.T, B.T): MLX's CPU
    matmul is faster on x @ w than on x @ w.T, and AdamW is elementwise, so the
    result is the same. Returns (run_epoch, current (A, B) as NumPy)."""
    from functools import partial

    import mlx.core as mx
    import mlx.optimizers as optim

    params = {"At": mx.array(A.T.copy()), "Bt": mx.array(B.T.copy())}
    opt = optim.AdamW(
        learning_rate=lr,
        betas=list(BETAS),
        eps=EPS,
        weight_decay=WEIGHT_DECAY,
        bias_correction=True,
    )
    opt.init(params)

    def loss_fn(params, x, y):
        z = (x @ params["At"]) @ params["Bt"]
        softplus = mx.logaddexp(z, 0.0)  # -log(1 - p); -log p = softplus - z
        return mx.mean(pos_weight * y * (softplus - z) + (1.0 - y) * softplus)

    loss_and_grad = mx.value_and_grad(loss_fn)
    state = [params, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y):
        _, grads = loss_and_grad(params, x, y)
        params.update(opt.apply_gradients(grads, params))

    def run_epoch(X, Y, order, batch):
        for start in range(0, len(order), batch):
            rows = order[start : start + batch]
            step(mx.array(X[rows]), mx.array(Y[rows].astype(np.float32)))
            mx.eval(state)

    def current():
        return np.array(params["At"]).T.copy(), np.array(params["Bt"]).T.copy()

    return run_epoch, current


def _evaluate(A, B, X, Y, threshold: float, chunk: int = 4096) -> dict:
    """Recall, precision and active fractions of `logits > logit(threshold)` on X."""
    return cut_report(predictor_logits(A, B, X, chunk), Y, logit(threshold))


def predictor_logits(A, B, X, chunk: int = 4096) -> np.ndarray:
    """B (A h) for each row h of X: (N, n_ffn) float32."""
    return np.concatenate(
        [(X[s : s + chunk] @ A.T) @ B.T for s in range(0, max(len(X), 1), chunk)]
    )


def cut_report(z: np.ndarray, Y: np.ndarray, cut: float | None) -> dict:
    """Recall, precision and active fractions of the set `z > cut` (None: every
    neuron) against the true set Y, both (N, n_ffn)."""
    pred = np.ones_like(Y) if cut is None else z > cut
    hits = int(np.count_nonzero(pred & Y))
    predicted, true = int(np.count_nonzero(pred)), int(np.count_nonzero(Y))
    size = max(Y.size, 1)
    return {
        "recall": hits / true if true else 1.0,
        "precision": hits / predicted if predicted else 1.0,
        "predicted_fraction": predicted / size,
        "true_fraction": true / size,
    }


def cut_for_recall(z: np.ndarray, Y: np.ndarray, recall: float) -> float | None:
    """The highest logit cut whose set `z > cut` holds at least `recall` of the true
    set Y (both (N, n_ffn)): the fewest neurons read for that recall on these
    tokens. None (every neuron) when Y is empty.

    Raises:
        ValueError: a recall outside (0, 1].
    """
    if not 0.0 < recall <= 1.0:
        raise ValueError(f"recall must be in (0, 1], got {recall}")
    positives = z[Y]
    if positives.size == 0:
        return None
    # the k smallest positive logits may fall below the cut
    k = int(math.floor((1.0 - recall) * positives.size + 1e-9))
    kth = np.partition(positives, k)[k]
    return float(np.nextafter(np.float32(kth), np.float32(-np.inf)))


def train_layer(
    X: np.ndarray,
    Y: np.ndarray,
    rank: int,
    epochs: int = 20,
    lr: float = 1e-2,
    batch: int = 256,
    holdout: float = 0.2,
    threshold: float = 0.5,
    seed: int = 0,
    use_mlx: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Train one layer's predictor p = sigmoid(B (A h)) on FFN inputs and active sets.

    Balanced binary cross-entropy (positives weighted by #neg / #pos of the training
    split, at most MAX_POS_WEIGHT), AdamW, shuffled minibatches, evaluated on the
    held-out split after each epoch. An epoch makes progress when, against the model
    kept so far, it reaches recall 0.99 at `threshold` (Deja Vu) or raises recall by
    0.005 or shrinks the predicted set by 2% (at the target: keeps it and shrinks the
    set); the last such epoch is kept, and training stops after PATIENCE epochs
    without progress. Why not stop at the first epoch with recall 0.99: Deja Vu's
    epochs are 380,000 tokens, ours a few thousand, and on the synthetic rank-4 layer
    of the tests that epoch predicts 2.1x the active neurons (4.4x with per-neuron
    biases), against 1.5x eight epochs later; the predicted set is what is read from
    flash. Deterministic given `seed`.

    Args:
        X: (N, d_model) float32 FFN inputs of the layer.
        Y: (N, n_ffn) bool, the neurons that really fired.
        rank: inner size r of A (r, d_model) and B (n_ffn, r).
        epochs: most passes over the training split.
        lr: AdamW learning rate.
        batch: tokens per minibatch.
        holdout: fraction of the tokens held out for recall/precision.
        threshold: probability above which a neuron is predicted active.
        seed: initialisation, split and shuffling.
        use_mlx: train with MLX (True), NumPy (False) or None: MLX when installed,
            on a GPU, and the step big enough for it to be faster (see
            MLX_MIN_STEP_WORK); the two give the same result to float rounding.

    Returns:
        A (r, d_model) and B (n_ffn, r) as float32 NumPy, and a report on the held-out
        split: recall, precision, predicted_fraction, true_fraction (of all
        token-neuron pairs), rank, threshold, epochs (run), kept_epoch (the one
        returned), seconds, backend ("numpy" or "mlx").

    Raises:
        ValueError: shapes that do not match, a rank outside 1..d_model, too few tokens
            to split, a holdout or threshold outside (0, 1).
    """
    X = np.asarray(X, dtype=np.float32)
    Y = np.asarray(Y, dtype=bool)
    if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y):
        raise ValueError(
            f"X must be (N, d_model) and Y (N, n_ffn), got {X.shape} and {Y.shape}"
        )
    n_tokens, d = X.shape
    n = Y.shape[1]
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if rank > d:
        raise ValueError(f"rank {rank} larger than d_model {d}")
    check_probability("holdout", holdout)
    check_probability("threshold", threshold)
    n_hold = int(round(n_tokens * holdout))
    if min(n_hold, n_tokens - n_hold) < MIN_SPLIT_TOKENS:
        needed = math.ceil(MIN_SPLIT_TOKENS / min(holdout, 1.0 - holdout))
        raise ValueError(
            f"{n_tokens} tokens are too few to hold out {holdout:.0%}: need at least "
            f"{needed} ({MIN_SPLIT_TOKENS} in each split)"
        )
    if use_mlx is None:
        use_mlx = _pick_mlx(batch, d, n, rank)

    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_tokens)
    train, held = perm[n_hold:], perm[:n_hold]
    positives = int(np.count_nonzero(Y[train]))
    negatives = Y[train].size - positives
    pos_weight = float(min(negatives / max(positives, 1), MAX_POS_WEIGHT))
    # Scaled so that A h and B (A h) start with unit-order entries for unit-order h.
    A = (rng.standard_normal((rank, d)) / math.sqrt(d)).astype(np.float32)
    B = (rng.standard_normal((n, rank)) / math.sqrt(rank)).astype(np.float32)
    X_hold, Y_hold = X[held], Y[held]

    started = time.perf_counter()
    if use_mlx:
        run_epoch, current = _make_mlx_epoch(A, B, lr, pos_weight)
    else:
        state = {"step": 0, "m_A": np.zeros_like(A), "v_A": np.zeros_like(A)}
        state.update(m_B=np.zeros_like(B), v_B=np.zeros_like(B))

        def run_epoch(X, Y, order, batch):
            _numpy_epoch(A, B, state, X, Y, order, batch, lr, np.float32(pos_weight))

        def current():
            return A, B

    kept = None  # (A, B, report) of the last epoch that made progress
    stale = 0  # epochs since then
    for epoch in range(1, epochs + 1):
        run_epoch(X, Y, rng.permutation(train), batch)
        A_now, B_now = current()
        report = _evaluate(A_now, B_now, X_hold, Y_hold, threshold)
        report["kept_epoch"] = epoch
        if kept is None or _progress(report, kept[2]):
            kept, stale = (A_now.copy(), B_now.copy(), report), 0
        else:
            stale += 1
            if stale >= PATIENCE:
                break
    A, B, report = kept
    report.update(
        rank=rank,
        threshold=threshold,
        epochs=epoch,
        seconds=time.perf_counter() - started,
        backend="mlx" if use_mlx else "numpy",
    )
    return A, B, report


def _progress(new: dict, old: dict) -> bool:
    """Whether an epoch was worth it: below the recall target, it reached it, raised
    recall or shrank the predicted set; at the target, it stayed there and shrank the
    predicted set (the neurons read from flash)."""
    old_fraction = old["predicted_fraction"]
    shrink = 1.0 - new["predicted_fraction"] / old_fraction if old_fraction else 0.0
    new_met = new["recall"] >= TARGET_RECALL
    if old["recall"] >= TARGET_RECALL:
        return new_met and shrink >= MIN_SHRINK
    gain = new["recall"] - old["recall"]
    return new_met or gain >= MIN_GAIN or shrink >= MIN_SHRINK
