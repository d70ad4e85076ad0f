"""Mixtures of experts: dense == transformers, flash == dense at any budget,
held == plan, and what a token reads."""

import itertools
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from cli_checks import assert_refused, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import TOKENS, has_mlx, write_hf_checkpoint
from tiny_moe import moe_config, moe_weights, tiny_moe_configs

from mlx_flashinfer import Layout, convert, load
from mlx_flashinfer.flash.expert_plan import experts_floor
from mlx_flashinfer.formats.args import ModelArgs
from mlx_flashinfer.formats.layout import MANIFEST, write_manifest

BACKENDS = ["numpy"] + (["mlx"] if has_mlx() else [])
GOLDEN = Path(__file__).parent / "golden" / "moe"
_LAYOUTS: dict = {}


def moe_layout(name: str, config: dict, dtype: str = "float32", seed: int = 5):
    """A layout of a tiny MoE checkpoint, converted once per session."""
    key = (json.dumps(config, sort_keys=True), dtype, seed)
    if key not in _LAYOUTS:
        tmp = Path(tempfile.mkdtemp(prefix="moe-"))
        src = write_hf_checkpoint(tmp / "src", config, moe_weights(config, seed))
        group = {"group_size": 32} if dtype in ("q4", "q8") else {}
        _LAYOUTS[key] = convert(src, tmp / name, dtype=dtype, progress=False, **group)
    return _LAYOUTS[key]


def budgets(layout: Path, lookahead: bool = False) -> dict[str, int]:
    """Bytes of a budget that caches every expert, of one in between, and of the
    smallest the experts placement accepts (one token's experts per layer)."""
    lay = Layout.open(layout)
    a, row = lay.args, lay.bundle_bytes + 8
    smallest = experts_floor(lay, lookahead)
    smallest += a.num_hidden_layers * a.experts_per_token * row
    spare = a.num_hidden_layers * (a.num_experts - a.experts_per_token) * row
    return {"all": smallest + spare, "half": smallest + spare // 2, "least": smallest}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(tiny_moe_configs()))
def test_dense_moe_equals_transformers(name, backend):
    """Logits of transformers (float32, CPU torch) on the same checkpoints, made by
    tools/make_moe_golden.py: routing, renormalisation, shared expert and the
    attention of each family as transformers defines them."""
    golden = np.load(GOLDEN / f"{name}.npz")
    layout = moe_layout(name, tiny_moe_configs()[name])
    model, _ = load(layout, backend=backend)
    got = model.logits(golden["tokens"].tolist())
    assert np.abs(got - golden["logits"]).max() <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe", "olmoe", "granitemoe"])
@pytest.mark.parametrize("budget", ["all", "half", "least"])
def test_flash_equals_dense_and_holds_its_plan(name, backend, budget):
    layout = moe_layout(name, tiny_moe_configs()[name])
    dense, _ = load(layout, backend=backend)
    expected = dense.logits(TOKENS, prefill=4)
    for window, ahead in itertools.product((0, 1, 4), (False, True)):
        flash, _ = load(
            layout,
            backend=backend,
            memory_budget=budgets(layout, ahead)[budget],
            window=window,
            lookahead=ahead,
        )
        got = flash.logits(TOKENS, prefill=4)
        assert np.abs(got - expected).max() <= 1e-5, (budget, window, ahead)
        assert flash.plan.lookahead == ahead
        assert sum(flash.held_bytes().values()) == flash.plan.weights
        assert flash.plan.weights <= flash.plan.budget


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family=st.sampled_from(["mixtral", "qwen3_moe", "qwen2_moe"]),
    experts=st.integers(2, 9),
    top_k=st.integers(1, 4),
    normed=st.booleans(),
    share=st.floats(0, 1),
    window=st.sampled_from([0, 1, 2, 8]),
    dtype=st.sampled_from(["float32", "float16"]),
    ahead=st.booleans(),
)
def test_flash_equals_dense_over_shapes(
    family, experts, top_k, normed, share, window, dtype, ahead
):
    """Any expert count, top-k, renormalisation, shared expert or not, budget down to
    the smallest, window: flash gives dense's logits (the router is exact)."""
    top_k = min(top_k, experts)
    extra = {} if family == "mixtral" else {"norm_topk_prob": normed}
    config = moe_config(family, experts=experts, top_k=top_k, **extra)
    layout = moe_layout(f"{family}-{experts}-{top_k}", config, dtype)
    dense, _ = load(layout, backend="numpy")
    expected = dense.logits(TOKENS[:8], prefill=3)
    least, spare = budgets(layout, ahead)["least"], budgets(layout, ahead)["all"]
    budget = least + int(share * (spare - least))
    flash, _ = load(
        layout, backend="numpy", memory_budget=budget, window=window, lookahead=ahead
    )
    got = flash.logits(TOKENS[:8], prefill=3)
    tolerance = 1e-5 if dtype == "float32" else 1e-3
    assert np.abs(got - expected).max() <= tolerance
    assert sum(flash.held_bytes().values()) == flash.plan.weights


@pytest.mark.parametrize("dtype", ["q8", "q4"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "granitemoe"])
def test_quantized_experts_flash_equals_dense(family, dtype):
    """Quantized bundles (each expert's rows packed with their scales; routers kept
    in float16): flash gives dense's logits at the smallest budget, both backends
    agree, and the bytes held are the plan's."""
    config = moe_config(family, hidden_size=64)
    layout = moe_layout(f"{family}-{dtype}", config, dtype)
    lay = Layout.open(layout)
    assert lay.quantization["part_bits"] == [int(dtype[1]), int(dtype[1]), 8]
    assert "layers.0.mlp.gate.weight" not in lay.quantization["tensors"]
    logits = {}
    for backend in BACKENDS:
        dense, _ = load(layout, backend=backend)
        expected = dense.logits(TOKENS, prefill=4)
        flash, _ = load(
            layout, backend=backend, memory_budget=budgets(layout)["least"], window=2
        )
        got = flash.logits(TOKENS, prefill=4)
        assert np.abs(got - expected).max() <= 1e-5
        assert sum(flash.held_bytes().values()) == flash.plan.weights
        logits[backend] = expected
    if "mlx" in logits:
        assert np.abs(logits["mlx"] - logits["numpy"]).max() <= 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_token_reads_at_most_its_routed_experts(backend):
    layout = moe_layout("olmoe", tiny_moe_configs()["olmoe"])
    args = Layout.open(layout).args
    per_token = args.experts_per_token * args.num_hidden_layers
    for window in (0, 4):
        flash, _ = load(
            layout,
            backend=backend,
            memory_budget=budgets(layout)["least"],
            window=window,
        )
        flash.logits(TOKENS, prefill=4)
        decoded = flash.io_stats()["decode"]
        tokens = len(TOKENS) - 4
        assert decoded["tokens"] == tokens
        assert decoded["neurons_predicted"] == per_token * tokens
        assert decoded["neurons_loaded"] <= per_token * tokens
        if window == 0:  # nothing kept: every routed expert read every token
            assert decoded["neurons_loaded"] == per_token * tokens
        assert (
            decoded["bytes_useful"]
            == decoded["neurons_loaded"] * Layout.open(layout).bundle_bytes
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_same_token_again_reads_nothing_new(backend):
    """With a window, the experts a token was routed to are cached for the next:
    the same FFN input routed again reads nothing; without one, all again."""
    layout = moe_layout("qwen2-moe", tiny_moe_configs()["qwen2-moe"])
    for window, reads_again in ((1, 0), (0, 2)):
        flash, _ = load(
            layout,
            backend=backend,
            memory_budget=budgets(layout)["least"],
            window=window,
        )
        ffn, B = flash.ffn, flash.backend
        h = B.array(np.random.default_rng(0).standard_normal((1, 16)))
        ffn.begin_token()
        first = ffn(0, h)
        assert ffn._token.neurons_loaded == 2
        ffn.begin_token()
        again = ffn(0, h)
        assert ffn._token.neurons_loaded == reads_again
        assert np.array_equal(B.to_numpy(first), B.to_numpy(again))


def test_cached_experts_stay_in_their_slots_and_hold_their_bundles():
    """An expert's rows stay in the slot they landed in while it is cached (no row
    ever moves), every cached slot holds its expert's bundle, and loads land in the
    slots evictions freed."""
    layout = moe_layout("olmoe", tiny_moe_configs()["olmoe"])
    flash, _ = load(
        layout, backend="numpy", memory_budget=budgets(layout)["least"], window=2
    )
    ffn, cache = flash.ffn, flash.make_cache()
    flash.prefill(TOKENS[:4], cache)
    before = [dict() for _ in ffn.windows]
    reused = 0
    for token in TOKENS[4:]:
        flash([token], cache)
        for layer, window in enumerate(ffn.windows):
            slots = {int(e): int(window.slot_of[e]) for e in window.cached}
            assert max(slots.values()) < ffn.plan.capacity[layer]
            for e, slot in slots.items():
                if e in before[layer]:
                    assert before[layer][e] == slot
                rows = [np.zeros_like(m[:1]) for m in ffn.caches[layer]]
                ffn.reader.read(layer, np.array([e]), rows)
                for m, row in zip(ffn.caches[layer], rows, strict=True):
                    np.testing.assert_array_equal(m[slot], row[0])
            freed = {s for e, s in before[layer].items() if e not in slots}
            landed = {s for e, s in slots.items() if e not in before[layer]}
            reused += len(freed & landed)
            before[layer] = slots
    assert reused > 0  # the smallest budget: loads must take freed slots


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float16", "q4"])
def test_aligned_experts_land_straight_in_their_rows(dtype, backend, monkeypatch):
    """Experts whose parts are multiples of 4 KiB (every published model's) are
    read straight into their cache rows, no copy from the staging buffer, and
    flash still gives dense's logits."""
    import mlx_flashinfer.flash.reader as reader_module

    # both backends page-align arrays from 64 KiB: a q4 expert's scales
    # (2 bytes a group of 32) need caches of 4 experts of 512 x 512
    size = 256 if dtype == "float16" else 512
    config = moe_config("mixtral", experts=4, hidden_size=size, intermediate_size=size)
    layout = moe_layout(f"aligned-{dtype}", config, dtype)
    dense, _ = load(layout, backend=backend)
    expected = dense.logits(TOKENS, prefill=4)
    budget = budgets(layout)["least" if dtype == "float16" else "all"]
    flash, _ = load(layout, backend=backend, memory_budget=budget, window=1)
    copies = []
    real_gather = reader_module.gather
    monkeypatch.setattr(
        reader_module, "gather", lambda *a: copies.append(1) or real_gather(*a)
    )
    got = flash.logits(TOKENS, prefill=4)
    assert flash.io_stats()["decode"]["neurons_loaded"] > 0 and not copies
    tolerance = 1e-3 if dtype == "float16" else 1e-5
    assert np.abs(got - expected).max() <= tolerance


@pytest.mark.parametrize("window", [0, 2])
def test_misses_read_while_cached_experts_compute_give_dense_bit_for_bit(window):
    """A decoded token's cached experts compute while its missing ones are read in
    the background (groups of BACKGROUND_READ bytes), and the sum stays dense's
    to the bit: the same products, summed in id order."""
    import mlx_flashinfer.flash.experts as experts_module

    layout = moe_layout("olmoe", tiny_moe_configs()["olmoe"])
    dense, _ = load(layout, backend="numpy")
    expected = dense.logits(TOKENS, prefill=2)
    for group in (1, 1 << 30):  # one expert a read, and all at once
        old = experts_module.BACKGROUND_READ
        experts_module.BACKGROUND_READ = group
        try:
            flash, _ = load(
                layout,
                backend="numpy",
                memory_budget=budgets(layout)["half"],
                window=window,
            )
            got = flash.logits(TOKENS, prefill=2)
        finally:
            experts_module.BACKGROUND_READ = old
        decoded = flash.io_stats()["decode"]
        assert decoded["neurons_loaded"] > 0 and decoded["io_ahead_s"] > 0
        assert np.array_equal(got, expected)


@pytest.mark.parametrize("dtype", ["float32", "q4"])
def test_experts_side_by_side_give_one_after_another_bit_for_bit(dtype, monkeypatch):
    """A decoded token's and a short prompt's experts run side by side on the
    compute threads (`backend.each`); the logits are those of one expert after
    another, to the bit (each expert's products on one thread, summed in id order)."""
    from fallback_numpy import kernels
    from mlx_flashinfer.model import moe

    # four experts a token: their sum's order shows; q4 groups of 32 need width 64
    config = moe_config("qwen3_moe", experts=8, top_k=4, hidden_size=64)
    layout = moe_layout(f"qwen3-moe-{dtype}", config, dtype)
    threads, default = kernels.get_threads(), moe.SIDE_BY_SIDE_TOKENS
    kernels.set_threads(2)
    try:
        got = {}
        for side_by_side in (default, 0):
            monkeypatch.setattr(moe, "SIDE_BY_SIDE_TOKENS", side_by_side)
            runs = []
            for budget in (None, "half"):
                options = {} if budget is None else {"window": 1}
                if budget:
                    options["memory_budget"] = budgets(layout)[budget]
                model, _ = load(layout, backend="numpy", **options)
                runs.append(model.logits(TOKENS, prefill=4))  # a prompt of 4
            got[side_by_side] = runs
    finally:
        kernels.set_threads(threads)
    for a, b in zip(got[default], got[0], strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reads_ahead_land_and_change_nothing(backend):
    """The next layer's router on this layer's FFN input guesses its experts; what
    it fetched ahead lands from the prefetch buffer, the rest is read: the same
    logits, the prefetch buffer in the plan."""
    layout = moe_layout("olmoe", tiny_moe_configs()["olmoe"])
    dense, _ = load(layout, backend=backend)
    expected = dense.logits(TOKENS, prefill=2)
    for window in (0, 2):
        flash, _ = load(
            layout,
            backend=backend,
            memory_budget=budgets(layout, True)["half"],
            window=window,
            lookahead=True,
        )
        assert flash.ffn.ahead is not None
        got = flash.logits(TOKENS, prefill=2)
        assert np.abs(got - expected).max() <= 1e-5
        decoded = flash.io_stats()["decode"]
        assert decoded["ahead_neurons"] > 0
        assert 0 < decoded["ahead_used"] <= decoded["neurons_loaded"]
        held = flash.held_bytes()
        assert held["read buffer"] == flash.plan.io_buffer
        assert sum(held.values()) == flash.plan.weights


class WrongGuess:
    """A router that guesses experts the real one does not pick."""

    def __init__(self, router):
        self.router = router

    def route(self, layer, h):
        ids, weights = self.router.route(layer, h)
        experts = self.router.args.num_experts
        last = np.setdiff1d(np.arange(experts), ids[0])[: ids.shape[1]]
        return last[None, :], weights


def test_a_wrong_guess_costs_reads_never_the_answer():
    from mlx_flashinfer.flash.experts import ExpertFFN

    layout = moe_layout("olmoe", tiny_moe_configs()["olmoe"])
    dense, _ = load(layout, backend="numpy")
    expected = dense.logits(TOKENS, prefill=2)
    flash, _ = load(
        layout,
        backend="numpy",
        memory_budget=budgets(layout, True)["least"],
        window=1,
        lookahead=True,
    )
    old = flash.ffn
    flash.ffn = ExpertFFN(
        flash.backend,
        Layout.open(layout),
        old.weights,
        old.plan,
        old.router,
        1,
        guess=WrongGuess(old.router),
    )
    old.close()
    got = flash.logits(TOKENS, prefill=2)
    assert np.abs(got - expected).max() <= 1e-5
    decoded = flash.io_stats()["decode"]
    # the guess names experts the router ranks last for this layer's input; the
    # next layer's own input may still pick a few
    assert decoded["ahead_used"] < decoded["ahead_neurons"] / 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_copied_in_where_memory_is_not_shared(backend, monkeypatch):
    """Where the backend will not share an array's memory, reads are copied into
    the cache rows (`write_rows`): the same logits, the same bytes held."""
    from mlx_flashinfer.model.backends import get_backend

    monkeypatch.setattr(get_backend(backend), "host_view", lambda a: None)
    layout = moe_layout("qwen2-moe", tiny_moe_configs()["qwen2-moe"])
    dense, _ = load(layout, backend=backend)
    expected = dense.logits(TOKENS, prefill=4)
    for budget in ("half", "least"):
        flash, _ = load(
            layout, backend=backend, memory_budget=budgets(layout)[budget], window=2
        )
        assert flash.io_stats()["landing"] == "copy"
        got = flash.logits(TOKENS, prefill=4)
        assert np.abs(got - expected).max() <= 1e-5
        assert sum(flash.held_bytes().values()) == flash.plan.weights


def test_one_host_sync_per_layer(monkeypatch):
    """A decoded token reads each layer's routing back to the host once (the one
    sync a layer costs on MLX; a shared expert's gate stays on the device), and
    its logits once."""
    from fallback_numpy import backend

    layout = moe_layout("qwen2-moe", tiny_moe_configs()["qwen2-moe"])
    layers = Layout.open(layout).args.num_hidden_layers
    original, calls = backend.to_numpy, []

    def counted(x):
        calls.append(1)
        return original(x)

    for dense in (True, False):
        budget = None if dense else budgets(layout)["half"]
        model, _ = load(layout, backend="numpy", memory_budget=budget)
        cache = model.make_cache()
        model.prefill(TOKENS[:3], cache)
        calls.clear()
        monkeypatch.setattr(backend, "to_numpy", counted)
        model.backend.to_numpy(model([TOKENS[3]], cache))
        monkeypatch.setattr(backend, "to_numpy", original)
        assert len(calls) == layers + 1


def test_layout_has_an_expert_index_and_inspect_says_it(capsys):
    config = tiny_moe_configs()["mixtral"]
    layout = Layout.open(moe_layout("mixtral", config))
    section = layout.manifest["experts"]
    assert layout.manifest["version"] == 3
    assert section["num_experts"] == 6 and section["experts_per_token"] == 2
    assert section["expert_bytes"] == layout.bundle_bytes == 3 * 24 * 16 * 4
    assert section["offsets"] == [e.offset for e in layout.layers]
    assert all(e.offset % 4096 == 0 and e.neurons == 6 for e in layout.layers)
    # expert 3 of layer 1: its w1 rows, w3 rows, w2 columns, as the checkpoint has them
    weights = moe_weights(config, seed=5)
    gate, up, down = layout.read_parts(1)
    p = "model.layers.1.block_sparse_moe.experts.3."
    assert np.array_equal(gate[3].reshape(24, 16), weights[p + "w1.weight"])
    assert np.array_equal(up[3].reshape(24, 16), weights[p + "w3.weight"])
    assert np.array_equal(down[3].reshape(24, 16), weights[p + "w2.weight"].T)
    status, out, _ = run(["inspect", layout.path, "--budget", "100KB"], capsys)
    assert status == 0
    assert "6 per layer, 2 per token" in out and "4.6 KB" in out
    assert "expert cache" in out and "placement      experts" in out


def test_refusals_are_one_line(tmp_path, capsys):
    layout = moe_layout("mixtral", tiny_moe_configs()["mixtral"])
    assert_refused(["inspect", layout, "--budget", "10KB"], "too small", capsys)
    argv = ["generate", "--model", layout, "-p", "the", "--memory-budget", "100KB"]
    assert_refused([*argv, "--predictor", "gate"], "predicted by its router", capsys)
    assert_refused([*argv, "--placement", "streamed"], "one placement", capsys)
    # variants this runtime does not compute, named
    for model_type, refusal in (
        ("gpt_oss", "unsupported architecture 'gpt_oss'"),
        ("deepseek_v2", "unsupported architecture 'deepseek_v2'"),
    ):
        bad = tmp_path / model_type
        bad.mkdir()
        (bad / "config.json").write_text(
            json.dumps(moe_config("qwen3_moe") | {"model_type": model_type})
        )
        assert_refused(["convert", bad, tmp_path / "out"], refusal, capsys)
    with pytest.raises(ValueError, match="mlp_only_layers"):
        ModelArgs.from_hf_config(moe_config("qwen3_moe", mlp_only_layers=[1]))
    with pytest.raises(ValueError, match="experts_per_token 7 exceeds"):
        ModelArgs.from_hf_config(moe_config("mixtral", experts=4, top_k=7))


def test_a_moe_manifest_must_say_version_3(tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(moe_layout("mixtral", tiny_moe_configs()["mixtral"]), copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["version"] = 2
    write_manifest(copy, manifest)
    with pytest.raises(ValueError, match="version 2 does not match"):
        Layout.open(copy)


def test_commands_on_a_mixture_of_experts(tmp_path, capsys):
    layout = moe_layout("qwen2-moe", tiny_moe_configs()["qwen2-moe"])
    budget = str(budgets(layout)["half"])
    status, out, err = run(
        [
            "verify",
            "--model",
            layout,
            "-p",
            "the",
            "--memory-budget",
            budget,
            "-m",
            "4",
        ],
        capsys,
    )
    assert status == 0, err
    assert "predictor router" in out and "tokens agree: 4/4" in out
    assert "a mixture of experts: every routed expert is read" in out
    status, out, err = run(
        ["generate", "--model", layout, "-p", "the", "--memory-budget", budget]
        + ["--stats", "-m", "4"],
        capsys,
    )
    assert status == 0, err
    refusal = "not for a mixture of experts"  # it records the routing instead
    assert_refused(["train-predictor", layout, "--kind", "lowbit"], refusal, capsys)
    from test_plan import fake_machine

    from mlx_flashinfer.plan.machine import save_machine

    save_machine(fake_machine(), tmp_path / "machine.json")
    probe = ["--probe", str(tmp_path / "machine.json")]
    least = str(budgets(layout)["least"])  # every weight fits even there: dense
    status, out, err = run(["plan", layout, "--budget", least] + probe, capsys)
    assert status == 0, err
    assert "chosen   dense" in out and "experts (window 4)" in out
    assert "OS paging (estimate)" in out
    assert_refused(["bench", layout, "--budget", budget], "moe_speed.py", capsys)
