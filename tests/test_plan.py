"""The cost model and the planner: predictions from a machine's curves, the choice
within a budget and an allowed loss, and the commands that show them."""

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
from test_flash import tiny_layout

from mlx_flashinfer import Layout
from mlx_flashinfer.cli import main
from mlx_flashinfer.flash.memory import (
    io_buffer_bytes,
    model_bytes,
    parse_budget,
    plan_streamed,
    slot_bytes,
)
from mlx_flashinfer.flash.window import LayerWindow, window_reuse
from mlx_flashinfer.plan import compute_probe
from mlx_flashinfer.plan import machine as machine_module
from mlx_flashinfer.plan.costs import (
    dense_cost,
    paging_cost,
    resident_products,
    sparse_cost,
    streamed_cost,
)
from mlx_flashinfer.plan.machine import Machine, load_machine, save_machine
from mlx_flashinfer.plan.planner import budget_for, choose


def fake_machine(disk_rate: float = 1e9, gemv: float = 4e9) -> Machine:
    """Curves of a made-up machine: every read size and thread count reads at
    `disk_rate`, every product at `gemv` bytes/s."""
    cells = [
        {"read_size": s, "threads": t, "bytes_per_s": disk_rate}
        for s in (4096, 1 << 20)
        for t in (1, 16)
    ]
    rates = {"1": gemv, "all": 2 * gemv, "1 cached": gemv, "all cached": 2 * gemv}
    return Machine(
        backend="numpy",
        cpu="test",
        cores=2,
        disk={"mode": "direct", "cells": cells, "sequential": cells},
        memory_bytes_per_s=10e9,
        gemv={k: dict(rates) for k in ("float16", "float32", "bfloat16", "q4", "q8")},
        gemm={},
        layer_s=1e-5,
    )


def test_a_window_of_k_tokens_loads_what_the_last_k_did_not_use():
    masks = np.zeros((6, 4), bool)
    masks[:, 0] = True  # always on: loaded once, never again
    masks[::2, 1] = True  # every other token
    masks[5, 3] = True  # once, at the end
    stats = window_reuse(masks, ks=(0, 1, 2))
    # from token 2 on (a full window of 2): tokens 2..5 use {0,1}, {0}, {0,1}, {0,3}
    assert stats["loaded"][0] == pytest.approx((2 + 1 + 2 + 2) / 4 / 4)
    assert stats["loaded"][1] == pytest.approx((1 + 0 + 1 + 1) / 4 / 4)
    assert stats["loaded"][2] == pytest.approx((0 + 0 + 0 + 1) / 4 / 4)
    assert stats["cached"][2] == pytest.approx((2 + 2 + 2 + 3) / 4 / 4)
    # the window manager with room for all loads the same
    window = LayerWindow(4, 4, 1)
    loads = [len(window.step(np.flatnonzero(m)).load_ids) for m in masks]
    assert sum(loads[2:]) / 4 / 4 == pytest.approx(stats["loaded"][1])


def test_a_small_cache_keeps_what_is_used_again_and_the_costs_read_its_loads():
    # a hot tenth of the neurons fires every token, a random fifth beside it: a
    # cache holding a fifth of the neurons (less than a window of 4's union) keeps
    # the hot ones (never the least recent) and loads about the random part only,
    # where interpolating over the rows held would foresee more
    from mlx_flashinfer.flash.window import cache_loads
    from mlx_flashinfer.plan.statistics import window_stats

    rng = np.random.default_rng(0)
    n, tokens = 1000, 64
    masks = rng.random((tokens, n)) < 0.2
    masks[:, :100] = True
    reuse, caches = window_reuse(masks), cache_loads(masks)
    k4 = reuse["k"].index(4)
    fifth = caches["share"].index(0.2)
    assert 0.2 * 0.9 < 0.2 < reuse["cached"][k4]  # the union overflows the cache
    assert caches["loaded_at"][k4][fifth] <= 0.2 * 0.9 + 0.02
    interpolated = np.interp(0.2, [0, reuse["cached"][1]], [reuse["loaded"][0], 1])
    assert caches["loaded_at"][k4][fifth] < min(interpolated, reuse["loaded"][0])
    # with room for a window's union a cache loads what the window does (why
    # cache_loads takes the window's loads there instead of simulating): the window
    # manager itself, its cache the union's mean size
    for i, k in enumerate(reuse["k"]):
        window = LayerWindow(n, math.ceil(reuse["cached"][i] * n), k)
        steps = [window.step(np.flatnonzero(m)) for m in masks]
        read = sum(len(s.load_ids) + len(s.scratch_ids) for s in steps[8:])
        assert read / ((tokens - 8) * n) == pytest.approx(reuse["loaded"][i])
    # the cost model reads those loads for a cache of that size
    args = Layout.open(tiny_layout("llama", "relu", 2, n, 2)).args
    entry = {"predicted_fraction": float(masks.mean()), "window": {**reuse, **caches}}
    section = {"kind": "lowrank", "report": [entry, entry]}
    layout = SimpleNamespace(args=args, manifest={"predictor": section})
    stats, _ = window_stats(layout, "lowrank", 4, [200, 200])
    assert stats[0][1] == pytest.approx(caches["loaded_at"][k4][fifth])
    assert stats[0][2] == pytest.approx(0.2)


def test_the_three_terms_follow_the_curves():
    layout = Layout.open(tiny_layout("llama", "silu", 2, 400, 12))
    resident, ffn = model_bytes(layout)
    machine = fake_machine(disk_rate=1e9, gemv=4e9)
    dense = dense_cost(layout, machine)
    products = sum(resident_products(layout).values()) + ffn
    assert dense.io_s == 0
    assert dense.compute_s == pytest.approx(products / 8e9 + 12 * 1e-5)
    # streamed: the slower of reading the rows not held and computing them all
    ring = 6 * slot_bytes(400, layout.bundle_bytes)  # a span a layer, 12 / 2 slots
    floor = resident + io_buffer_bytes(layout) + ring
    plan = plan_streamed(layout, floor + ffn // 4, 0, 64)
    assert plan.ring_slots == 6 and 0 < plan.capacity[0] < 400
    streamed = streamed_cost(layout, plan, machine)
    held = sum(plan.capacity) * layout.bundle_bytes
    assert streamed.bytes_read == ffn - held
    assert streamed.total_s == pytest.approx(
        max(streamed.bytes_read / 1e9, dense.compute_s)
    )
    slow_disk = streamed_cost(layout, plan, fake_machine(disk_rate=1e6))
    assert slow_disk.io_s > 0 and slow_disk.total_s > streamed.total_s
    # OS paging re-reads the whole FFN when it does not fit beside the resident part
    assert paging_cost(layout, resident + ffn // 2, machine).bytes_read == ffn
    assert paging_cost(layout, resident + ffn, machine).bytes_read == 0


@pytest.mark.parametrize("placement", ["streamed", "sparse", "sparse ahead", "paging"])
def test_a_cost_at_another_disk_rate_is_the_cost_on_that_disk(placement):
    # TokenCost.at_disk_rate (the validation's prediction at a row's own disk rate)
    # keeps each placement's overlap: the same as predicting on a machine whose
    # disk reads at that rate
    layout = Layout.open(tiny_layout("llama", "relu", 2, 400, 4))
    resident, ffn = model_bytes(layout)
    from mlx_flashinfer.flash.memory import plan_floor
    from mlx_flashinfer.loader import make_plan
    from mlx_flashinfer.predictors.kinds import predictor_nbytes

    def cost(machine):
        if placement == "streamed":
            ring = 2 * slot_bytes(400, layout.bundle_bytes)
            floor = resident + io_buffer_bytes(layout) + ring
            plan = plan_streamed(layout, floor + ffn // 4, 0, 64)
            return streamed_cost(layout, plan, machine)
        if placement == "paging":
            return paging_cost(layout, resident + ffn // 2, machine)
        floor = plan_floor(layout, predictor_nbytes("gate", layout))
        ahead = placement == "sparse ahead"
        budget = floor + io_buffer_bytes(layout) + ffn // 4
        plan = make_plan(layout, budget, "gate", 64, lookahead=ahead)
        assert plan.lookahead == ahead
        return sparse_cost(layout, plan, machine, "gate", 4)

    base = cost(fake_machine(disk_rate=1e9))
    assert base.bytes_read > 0
    for rate in (1e6, 3e8, 1e9, 1e11):
        other = cost(fake_machine(disk_rate=rate))
        # the rate the reads get at their size (small reads: below the curve's),
        # over all their time (the reader's own work included, as a run's rate)
        reads = other.io_s + other.hidden_io_s
        moved = base.at_disk_rate(other.bytes_read / reads)
        assert moved.total_s == pytest.approx(other.total_s, rel=1e-9)
        assert moved.hidden_io_s == pytest.approx(other.hidden_io_s, rel=1e-9)


def test_a_prompt_costs_its_products_at_their_length_and_its_reads():
    from mlx_flashinfer.flash.memory import plan_floor
    from mlx_flashinfer.loader import make_plan
    from mlx_flashinfer.plan.costs import (
        _add,
        ffn_kinds,
        head_products,
        resident_products,
    )
    from mlx_flashinfer.plan.prompt_costs import prompt_cost, prompt_product_seconds
    from mlx_flashinfer.predictors.kinds import predictor_nbytes

    machine = fake_machine(gemv=4e9)
    machine.gemm = {"float32": {"8": 2e9, "64": 1e9}}
    # one token at the decode rate, the probe's lengths at theirs, between them in
    # log length, past the longest linear in length; one thread slower
    seconds = [
        prompt_product_seconds(machine, "float32", 1e9, t) for t in range(1, 200)
    ]
    assert seconds == sorted(seconds)
    assert seconds[0] == pytest.approx(1e9 / 8e9)  # fake_machine's "all": 2 x gemv
    assert seconds[7] == pytest.approx(0.5) and seconds[63] == pytest.approx(1.0)
    assert seconds[127] == pytest.approx(2.0)
    one = prompt_product_seconds(machine, "float32", 1e9, 8, threads="1")
    assert one == pytest.approx(2 * seconds[7])
    # measured on one thread at 64 tokens: prompts slow down by that, not by a
    # decode step's share
    machine.gemm["float32"]["64 on 1"] = 0.6e9
    one = prompt_product_seconds(machine, "float32", 1e9, 8, threads="1")
    assert one == pytest.approx(seconds[7] / 0.6)
    step = prompt_product_seconds(machine, "float32", 1e9, 1, threads="1")
    assert step == pytest.approx(2 * seconds[0])
    assert prompt_product_seconds(machine, "float32", 1e9, 8) == seconds[7]
    del machine.gemm["float32"]["64 on 1"]
    # placements: dense reads nothing; paging the FFN; the streamed placement hides
    # its reads behind compute up to it; a SiLU model's sparse prompt streams
    # every layer, a ReLU one's (the gate: every fired neuron) reads at most that
    for act in ("silu", "relu"):
        layout = Layout.open(tiny_layout("llama", act, 2, 400, 12))
        resident, ffn = model_bytes(layout)
        dense = prompt_cost(layout, "dense", machine, 16)
        assert dense.io_s == 0 and dense.compute_s > 0
        # the head multiplies the last token alone (Model.prefill), the rest all 16
        args = layout.args
        head = head_products(layout)
        weights = _add(
            resident_products(layout),
            ffn_kinds(layout),
            args.num_hidden_layers * args.intermediate_size,
        )
        assert set(head) == {"float32"} and 0 < head["float32"] < weights["float32"]
        body = _add(weights, head, -1.0)
        small = 16 * args.num_hidden_layers * machine.layer_s
        assert dense.compute_s - small == pytest.approx(
            sum(prompt_product_seconds(machine, k, b, 16) for k, b in body.items())
            + prompt_product_seconds(machine, "float32", head["float32"], 1)
        )
        paging = prompt_cost(layout, "paging", machine, 16, budget=resident + ffn // 2)
        assert paging.bytes_read == ffn
        ring = 6 * slot_bytes(400, layout.bundle_bytes)
        room = resident + io_buffer_bytes(layout) + ring + ffn // 4
        streamed = prompt_cost(
            layout, "streamed", machine, 16, plan=plan_streamed(layout, room, 0, 64)
        )
        assert streamed.io_s + streamed.hidden_io_s > 0
        assert streamed.hidden_io_s <= streamed.compute_s
        name = "gate" if act == "relu" else "all"
        floor = plan_floor(layout, predictor_nbytes(name, layout))
        plan = make_plan(layout, floor + ffn // 4, name, 64, lookahead=False)
        sparse = prompt_cost(layout, "sparse", machine, 16, plan=plan, predictor=name)
        # (no report here: every neuron, so each layer streams whole, a read call
        # a scratch-full, each call's range one aligned block longer)
        calls = math.ceil(400 / plan.scratch_rows)
        assert sparse.bytes_read == pytest.approx(ffn + 12 * calls * 512)
        longer = prompt_cost(layout, "sparse", machine, 64, plan=plan, predictor=name)
        assert longer.compute_s > sparse.compute_s
        assert prompt_cost(layout, "experts", machine, 16) is None


def test_a_short_prompt_reads_its_tokens_union(tmp_path):
    # a ReLU-family model with a predictor report: a prompt of few tokens reads
    # only their union's neurons (scattered reads), fewer bytes than streaming the
    # layers, and computes fewer rows than dense; a long one streams every layer
    from mlx_flashinfer.bench.synth import write_synthetic
    from mlx_flashinfer.loader import make_plan
    from mlx_flashinfer.plan.prompt_costs import prompt_cost, union_share

    layout = Layout.open(write_synthetic(tmp_path / "s", "opt-tiny", progress=False))
    resident, ffn = model_bytes(layout)
    plan = make_plan(layout, resident + ffn, "lowrank", 64, lookahead=False)
    machine = fake_machine()
    assert max(union_share(layout, "lowrank", 2)) < 0.4  # under the reader's prior
    short = prompt_cost(layout, "sparse", machine, 2, plan=plan, predictor="lowrank")
    whole = prompt_cost(layout, "sparse", machine, 2, plan=plan, predictor="all")
    dense = prompt_cost(layout, "dense", machine, 2)
    assert 0 < short.bytes_read < whole.bytes_read
    assert short.compute_s < dense.compute_s
    assert min(union_share(layout, "lowrank", 4096)) == pytest.approx(1.0)
    long = prompt_cost(layout, "sparse", machine, 4096, plan=plan, predictor="lowrank")
    assert long.bytes_read == pytest.approx(whole.bytes_read)


def test_the_down_product_runs_at_the_columns_rate():
    # down (fc2) multiplies neuron columns, at the probe's "<dtype> columns" rate
    # where it has one (MLX's CPU float16: a third of the rows' rate), else the rows'
    layout = Layout.open(tiny_layout("llama", "silu", 2, 400, 3))
    ffn = 3 * 400 * layout.part_bytes[-1]  # every layer's down columns
    rows = fake_machine(gemv=4e9)
    slow = fake_machine(gemv=4e9)
    kind = layout.dtype  # float32 here
    slow.gemv[f"{kind} columns"] = {k: v / 3 for k, v in slow.gemv[kind].items()}
    extra = dense_cost(layout, slow).compute_s - dense_cost(layout, rows).compute_s
    assert extra == pytest.approx(ffn / (8e9 / 3) - ffn / 8e9)


def disk_machine(rate) -> Machine:
    """fake_machine with a disk reading `rate(read_size)` bytes/s."""
    cells = [
        {"read_size": s, "threads": t, "bytes_per_s": rate(s)}
        for s in (512, 4096, 1 << 20)
        for t in (1, 16)
    ]
    disk = {"mode": "direct", "cells": cells}
    return Machine.from_dict({**fake_machine().to_dict(), "disk": disk})


def planned_lowrank(path, budget, cache_dir, **given):
    """The model `load` plans with the low-rank predictor on the machine probe kept
    in `cache_dir`, `given` options winning."""
    from mlx_flashinfer import load

    model, _ = load(
        path,
        backend="numpy",
        memory_budget=budget,
        placement="auto",
        predictor="lowrank",
        cache_dir=cache_dir,
        max_context=64,
        **given,
    )
    return model


def test_a_read_gap_trades_reads_for_bytes_and_is_planned_where_reads_cost(
    tmp_path,
):
    from mlx_flashinfer import load
    from mlx_flashinfer.bench.synth import write_synthetic
    from mlx_flashinfer.flash.reader import DEFAULT_MAX_GAP
    from mlx_flashinfer.loader import make_plan
    from mlx_flashinfer.plan.machine import machine_path
    from mlx_flashinfer.plan.planner import GAP_MARGIN, READ_GAPS
    from mlx_flashinfer.predictors.kinds import predictor_nbytes

    path = write_synthetic(tmp_path / "s", "opt-tiny", progress=False)
    layout = Layout.open(path)
    resident, ffn = model_bytes(layout)
    budget = resident + ffn  # all but dense's room: the predictor takes some
    plan = make_plan(layout, budget, "lowrank", 64, lookahead=False)
    # reading through longer gaps: never more reads, never fewer bytes
    costs = [
        sparse_cost(layout, plan, fake_machine(), "lowrank", 4, read_gap=gap)
        for gap in sorted(READ_GAPS)
    ]
    reads = [c.bytes_read / c.read_size for c in costs]
    assert reads == sorted(reads, reverse=True) and reads[0] > reads[-1]
    assert [c.bytes_read for c in costs] == sorted(c.bytes_read for c in costs)
    # where a read costs its wait (a millisecond, whatever its size), the planner
    # reads through gaps; where only bytes cost, it reads only what it needs
    waits, bytes_cost = disk_machine(lambda s: s / 1e-3), disk_machine(lambda s: 1e7)
    slow = choose(layout, budget, waits, predictor="lowrank").best
    assert slow.read_gap > 0
    narrow = choose(layout, budget, bytes_cost, predictor="lowrank").best
    assert narrow.read_gap == 0
    # another gap than the reader's default only for a clear gain
    nbytes = predictor_nbytes("lowrank", layout)
    for best, machine in ((slow, waits), (narrow, bytes_cost)):
        if best.read_gap != DEFAULT_MAX_GAP:
            args = (layout, best.plan, machine, "lowrank", best.window, nbytes)
            default = sparse_cost(*args)
            assert best.cost.total_s < (1 - GAP_MARGIN) * default.total_s
    # load runs the planned gap (and a given one wins); the gap changes how rows
    # are read, never which: the same logits
    save_machine(waits, machine_path(path, "numpy", tmp_path))
    tokens, found = [1, 2, 3, 4, 5], []
    for given in (None, 0):
        model = planned_lowrank(path, budget, tmp_path, read_gap=given)
        want = slow.read_gap if given is None else given
        assert model.ffn.reader.max_gap_bytes == want
        found.append(model.logits(tokens, prefill=3))
        model.ffn.close()
    assert np.array_equal(found[0], found[1])
    with pytest.raises(ValueError, match="read gap"):
        load(path, backend="numpy", memory_budget=budget, read_gap=-1)
    # a size as the CLI passes it
    model, _ = load(path, backend="numpy", memory_budget=budget, read_gap="4KiB")
    assert model.ffn.reader.max_gap_bytes == 4096
    model.ffn.close()
    with pytest.raises(ValueError, match="bad size"):
        load(path, backend="numpy", memory_budget=budget, read_gap="4 pages")


def test_without_io_uring_the_planner_chooses_the_readers_threads(tmp_path):
    """A thread pool reads where no io_uring does: 16 threads (the default) on a
    disk whose reads overlap, fewer where more in flight gain nothing and each
    thread's hand-off costs the cores; load runs the choice, a given count wins."""
    from mlx_flashinfer.bench.synth import write_synthetic
    from mlx_flashinfer.flash.reader import DEFAULT_THREADS
    from mlx_flashinfer.plan.machine import machine_path

    path = write_synthetic(tmp_path / "s", "opt-tiny", progress=False)
    layout = Layout.open(path)
    budget = sum(model_bytes(layout)) - 1

    def pool_machine(rate, reader) -> Machine:
        cells = [
            {"read_size": s, "threads": t, "bytes_per_s": rate(s, t)}
            for s in (512, 4096, 1 << 20)
            for t in (1, 4, 16)
        ]
        machine = disk_machine(lambda s: 1e9)
        machine.disk = {"mode": "nocache", "cells": cells}
        machine.reader = reader
        return machine

    def window_4(machine):  # the plan of window 4 without reads ahead: it reads
        choice = choose(layout, budget, machine, predictor="lowrank")
        found = [c for c in [choice.best, *choice.others] if c.window == 4]
        return next(c for c in found if not c.lookahead)

    cheap = {"call_s": 1e-5, "read_s": 1e-6, "byte_s": 0.0}
    dear = {"call_s": 2e-3, "read_s": 1e-6, "byte_s": 0.0}  # a pool's hand-off
    # reads of 100 us each, overlapping: throughput grows with those in flight
    overlapping = pool_machine(lambda s, t: t * s / 1e-4, {"1": cheap, "16": dear})
    assert window_4(overlapping).threads == DEFAULT_THREADS
    # a disk whose bytes cost (so no gap is read through: many reads a call), as
    # fast with one read in flight as with 16: more only cost their hand-off
    serial = pool_machine(lambda s, t: 1e7, {"1": cheap, "16": dear})
    fewer = window_4(serial)
    assert fewer.cost.bytes_read > 0 and fewer.threads < DEFAULT_THREADS
    assert f"{fewer.threads} reader threads" in fewer.name
    assert fewer.options()["threads"] == fewer.threads
    best = choose(layout, budget, serial, predictor="lowrank").best
    # an io_uring reads: no thread count to choose
    ring = pool_machine(lambda s, t: s / 1e-4, {"1": cheap, "16": dear})
    ring.disk["cells"].append(
        {"read_size": 4096, "threads": 256, "bytes_per_s": 1e9, "ring": True}
    )
    assert choose(layout, budget, ring, predictor="lowrank").best.threads is None
    save_machine(serial, machine_path(path, "numpy", tmp_path))
    for given in (None, 16):
        model = planned_lowrank(path, budget, tmp_path, threads=given)
        assert model.ffn.reader.threads == (given or best.threads or 16)
        model.ffn.close()


def test_a_smaller_cache_loads_more_and_a_faster_disk_reads_faster():
    layout = Layout.open(tiny_layout("llama", "relu", 2, 400, 3))
    resident, ffn = model_bytes(layout)
    machine = fake_machine()
    from mlx_flashinfer.flash.memory import plan_floor
    from mlx_flashinfer.loader import make_plan
    from mlx_flashinfer.predictors.kinds import predictor_nbytes

    floor = plan_floor(layout, predictor_nbytes("gate", layout))
    roomy = make_plan(layout, floor + 2 * ffn, "gate", 64, lookahead=False)
    tight = make_plan(layout, floor + ffn // 8, "gate", 64, lookahead=False)
    a = sparse_cost(layout, roomy, machine, "gate", 4)
    b = sparse_cost(layout, tight, machine, "gate", 4)
    assert b.bytes_read >= a.bytes_read
    fast = sparse_cost(layout, tight, fake_machine(disk_rate=1e10), "gate", 4)
    assert fast.io_s < b.io_s


def test_reads_ahead_are_planned_for_the_relu_family_only():
    # on SiLU models the guesses read more than they hide (loader's default):
    # the planner offers them only where the loader would turn them on
    from mlx_flashinfer.plan.planner import candidates

    for act, offered in (("relu", True), ("silu", False)):
        layout = Layout.open(tiny_layout("llama", act, 2, 400, 3))
        found = candidates(layout, 10**9, fake_machine(), 64, "all")
        assert found and any(c.lookahead for c in found) == offered


def test_the_planner_picks_dense_when_all_fits_and_exact_plans_by_default():
    layout = Layout.open(tiny_layout("llama", "silu", 2, 400, 3))
    resident, ffn = model_bytes(layout)
    machine = fake_machine()
    assert choose(layout, resident + ffn, machine).best.placement == "dense"
    # a SiLU model with no trained predictor: only exact plans are allowed
    choice = choose(layout, resident + ffn // 2, machine)
    assert choice.best.loss == 0 and choice.allowed_loss == 0
    assert choice.best.placement in ("streamed", "sparse")
    assert all(c.loss == 0 for c in choice.others)
    times = [choice.best.cost.total_s] + [c.cost.total_s for c in choice.others]
    assert times == sorted(times)
    # a budget for a speed: the smallest that reaches it, and faster ones need more
    slow = budget_for(layout, 1 / (2 * choice.best.cost.total_s), machine)
    fast = budget_for(layout, 1 / dense_cost(layout, machine).total_s, machine)
    assert slow is not None and fast is not None and slow[0] <= fast[0]


def test_a_synthetic_predictor_has_a_measured_loss_and_its_plans_are_allowed(
    tmp_path,
):
    from mlx_flashinfer import load
    from mlx_flashinfer.bench.configs import sequence_tokens
    from mlx_flashinfer.bench.synth import QUALITY_SEED, QUALITY_TOKENS, write_synthetic
    from mlx_flashinfer.perplexity import perplexity
    from mlx_flashinfer.plan.statistics import window_stats
    from mlx_flashinfer.verify import PERPLEXITY_PREFILL

    layout = Layout.open(write_synthetic(tmp_path / "s", "opt-tiny", progress=False))
    quality = layout.manifest["predictor"]["quality"]
    # measured: dense's NLL is the one its model gives those tokens, and the loss
    # is flash's perplexity over dense's
    ids = sequence_tokens(layout, None, quality["tokens"] + 1, QUALITY_SEED)
    dense, _ = load(layout.path, dense=True)
    score = perplexity(dense, ids, context=len(ids), prefill=PERPLEXITY_PREFILL)
    assert score["nll"] == pytest.approx(quality["dense_nll"], rel=1e-9)
    ratio = np.exp(quality["flash_nll"] - quality["dense_nll"])
    assert quality["loss"] == pytest.approx(ratio - 1)
    # the window statistics the cost model reads are those of its decode steps:
    # window 0 loads every predicted neuron, longer windows load fewer
    for entry in layout.manifest["predictor"]["report"]:
        steps = QUALITY_TOKENS - PERPLEXITY_PREFILL
        assert entry["window_source"].startswith(f"{steps} decode steps")
        window = entry["window"]
        assert window["k"][0] == 0
        assert window["loaded"][0] == pytest.approx(entry["predicted_fraction"], 0.2)
        assert window["loaded"] == sorted(window["loaded"], reverse=True)
    # a cache smaller than the window's union loads more, the less it holds: from
    # the window's own loads (room for its union) to a token's whole set (none)
    n = layout.args.intermediate_size
    layers = layout.args.num_hidden_layers
    for k in (1, 4):
        full, _ = window_stats(layout, "lowrank", k)
        loads = []
        for share in (1.0, 0.5, 0.2, 0.05, 0.0):
            room = [int(share * n)] * layers
            stats, _ = window_stats(layout, "lowrank", k, room)
            loads.append([loaded for _, loaded, _ in stats])
            assert all(
                h <= max(r / n, f[2])
                for (_, _, h), r, f in zip(stats, room, full, strict=True)
            )
        assert [s[1] for s in full] == pytest.approx(loads[0])
        assert all(
            a <= b + 1e-12
            for x, y in zip(loads, loads[1:], strict=False)
            for a, b in zip(x, y, strict=True)
        )
        whole = [
            e["window"]["cached"][0] for e in layout.manifest["predictor"]["report"]
        ]
        assert loads[-1] == pytest.approx(whole)
    # by default the planner allows the predictor's own loss: its sparse plans
    # compete, and exact plans stay allowed whatever the loss's sign
    budget = sum(model_bytes(layout)) - 1  # everything but dense
    choice = choose(layout, budget, fake_machine())
    allowed = [choice.best, *choice.others]
    assert any(c.predictor == "lowrank" for c in allowed)
    assert any(c.loss == 0 for c in allowed)
    assert choice.allowed_loss == max(quality["loss"], 0.0)
    # unmeasured: exact plans only, as before
    predictor = dict(layout.manifest["predictor"])
    del predictor["quality"]
    layout.update_manifest({"predictor": predictor})
    choice = choose(Layout.open(layout.path), budget, fake_machine())
    assert all(c.predictor != "lowrank" for c in [choice.best, *choice.others])


def test_probe_and_plan_commands(tmp_path, monkeypatch, capsys):
    layout = tiny_layout("llama", "silu", 2, 400, 3)
    probe = save_machine(fake_machine(), tmp_path / "probe.json")
    assert load_machine(probe).cpu == "test"
    assert main(["plan", str(layout), "--budget", "60%", "--probe", str(probe)]) == 0
    out = capsys.readouterr().out
    assert "chosen" in out and "ms/token" in out and "OS paging" in out
    run = [line for line in out.splitlines() if "run it:" in line]
    assert run and "--memory-budget 60% " in run[0]
    # a prompt's wait for its first token, under the choice and under OS paging,
    # as prompt_costs predicts it
    from mlx_flashinfer.cli.plan import prompt_line
    from mlx_flashinfer.plan.prompt_costs import prompt_cost

    lay, machine = Layout.open(layout), load_machine(probe)
    amount = parse_budget("60%", sum(model_bytes(lay)))
    best = choose(lay, amount, machine).best
    tokens = min(128, lay.args.max_position_embeddings)
    prompts = [line.strip() for line in out.splitlines() if "a prompt of" in line]
    assert prompts == [
        f"a prompt of {tokens} tokens: {prompt_line(cost)}"
        for cost in (
            best.prompt_cost(lay, machine, tokens),
            prompt_cost(lay, "paging", machine, tokens, budget=amount),
        )
    ]
    assert "s to the first token" in prompts[0]
    plan = ["plan", str(layout), "--budget", "60%", "--probe", str(probe)]
    assert main([*plan, "--prompt-tokens", "0"]) == 0
    assert "a prompt of" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit:
        main([*plan, "--prompt-tokens", "-1"])
    assert exit.value.code == 2 and "--prompt-tokens" in capsys.readouterr().err
    assert main(["plan", str(layout), "--for", "1tok/s", "--probe", str(probe)]) == 0
    out = capsys.readouterr().out
    assert "needs a budget of" in out
    # the budget it prints, planned again, gives the same choice
    given = next(line for line in out.splitlines() if "run it:" in line).split()
    budget = given[given.index("--memory-budget") + 1]
    assert budget.endswith("KB")  # 245.2 KB model
    chosen = next(line for line in out.splitlines() if "chosen" in line)
    assert main(["plan", str(layout), "--budget", budget, "--probe", str(probe)]) == 0
    assert chosen.split(":")[0] in capsys.readouterr().out
    # a predictor named: its sparse plans only (the gate of a SiLU model: its loss
    # never calibrated, the user's to allow)
    gate = ["plan", str(layout), "--predictor", "gate", "--probe", str(probe)]
    assert main(gate) == 2  # at 50% the gate's rows leave no room
    assert "no sparse plan with the gate predictor" in capsys.readouterr().err
    assert main([*gate, "--budget", "90%"]) == 0
    out = capsys.readouterr().out
    chosen = next(line for line in out.splitlines() if "chosen" in line)
    assert "sparse (gate" in chosen and "loss not measured" in chosen
    assert "streamed" not in out.split("OS paging")[0]
    assert main(["plan", str(layout), "--for", "fast", "--probe", str(probe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "10tok/s" in err[0]
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    assert main(["plan", str(layout), "--probe", str(tmp_path / "bad.json")]) == 2
    assert "not a machine probe" in capsys.readouterr().err
    # a real probe, made small: its result plans too
    monkeypatch.setattr(compute_probe, "DTYPES", ("float32",))
    monkeypatch.setattr(compute_probe, "MEMORY_BYTES", 1 << 24)
    monkeypatch.setattr(
        machine_module,
        "short_probe",
        lambda path, progress, keep: fake_machine().disk,
    )
    monkeypatch.setenv("MLX_FLASHINFER_CACHE", str(tmp_path / "cache"))
    from fallback_numpy import kernels

    before = (kernels.DOT_ROWS_MAX_T, kernels.QDOT_ROWS_MAX_T)
    assert main(["probe", "--backend", "numpy", "--quiet"]) == 0
    # it measured with the path limits it found, and put the process's back
    assert before == (kernels.DOT_ROWS_MAX_T, kernels.QDOT_ROWS_MAX_T)
    out = capsys.readouterr().out
    assert "kept in" in out and "float32" in out
    kept = list((tmp_path / "cache" / "machines").glob("*-numpy-dev*.json"))
    assert len(kept) == 1 and load_machine(kept[0]).gemv["float32"]["1"] > 0
    assert load_machine(kept[0]).gemv["float32 columns"]["all"] > 0
    assert set(load_machine(kept[0]).product_limits) == {
        "DOT_ROWS_MAX_T",
        "QDOT_ROWS_MAX_T",
    }
    assert main(["plan", str(layout), "--budget", "60%", "--backend", "numpy"]) == 0
    assert "chosen" in capsys.readouterr().out


def test_load_auto_runs_the_planners_choice_and_explicit_options_win(tmp_path):
    from mlx_flashinfer import load
    from mlx_flashinfer.plan.machine import machine_path

    layout = tiny_layout("llama", "silu", 2, 400, 12)
    lay = Layout.open(layout)
    resident, ffn = model_bytes(lay)
    ring = 6 * slot_bytes(400, lay.bundle_bytes)
    budget = resident + io_buffer_bytes(lay) + ring + ffn // 4
    machine = fake_machine()
    save_machine(machine, machine_path(layout, "numpy", tmp_path))
    best = choose(lay, budget, machine, max_context=64).best
    model, _ = load(
        layout,
        backend="numpy",
        memory_budget=budget,
        placement="auto",
        cache_dir=tmp_path,
        max_context=64,
    )
    assert model.plan.placement == best.placement
    dense, _ = load(layout, backend="numpy")
    tokens = [1, 2, 3, 4, 5]
    got, expected = model.logits(tokens, prefill=3), dense.logits(tokens, prefill=3)
    assert np.abs(got - expected).max() <= 1e-5  # the choice is exact: no loss allowed
    model.ffn.close()
    # with room for every weight the planner runs it dense
    roomy, _ = load(
        layout,
        backend="numpy",
        memory_budget="200%",
        placement="auto",
        cache_dir=tmp_path,
    )
    assert roomy.plan is None
    # a predictor named: the planner's fastest sparse plan of that predictor
    named, _ = load(
        layout,
        backend="numpy",
        memory_budget="90%",
        placement="auto",
        predictor="all",
        cache_dir=tmp_path,
        max_context=64,
    )
    assert named.plan.placement == "sparse"
    assert named.ffn.predictor.__class__.__name__ == "AllPredictor"
    named.ffn.close()


def test_a_probed_machine_plans_by_default_and_a_sparse_option_asks_for_sparse(
    tmp_path,
):
    from mlx_flashinfer import load
    from mlx_flashinfer.plan.machine import machine_path

    layout = tiny_layout("llama", "silu", 2, 400, 12)
    lay = Layout.open(layout)
    resident, ffn = model_bytes(lay)
    ring = 6 * slot_bytes(400, lay.bundle_bytes)
    budget = resident + io_buffer_bytes(lay) + ring + ffn // 4
    options = dict(backend="numpy", memory_budget=budget, max_context=64)
    # not probed: sparse, as always
    unprobed, _ = load(layout, cache_dir=tmp_path, **options)
    assert unprobed.plan.placement == "sparse"
    unprobed.ffn.close()
    # probed: the planner's choice (here streamed: a slow disk, fast products)
    machine = fake_machine(disk_rate=1e8, gemv=1e11)
    save_machine(machine, machine_path(layout, "numpy", tmp_path))
    best = choose(lay, budget, machine, max_context=64).best
    assert best.placement == "streamed"
    planned, _ = load(layout, cache_dir=tmp_path, **options)
    assert planned.plan.placement == "streamed"
    planned.ffn.close()
    # a sparse option given: sparse, whatever the planner would choose
    windowed, _ = load(layout, cache_dir=tmp_path, window=2, **options)
    assert windowed.plan.placement == "sparse"
    windowed.ffn.close()


def test_a_trained_predictor_reports_what_windows_load_and_the_costs_use_it(tmp_path):
    import shutil

    from mlx_flashinfer.plan.statistics import window_stats
    from mlx_flashinfer.predictors.train import train_predictor

    path = shutil.copytree(tiny_layout("llama", "relu", 2, 48, 2), tmp_path / "l")
    train_predictor(path, tokens=600, kind="lowrank", rank=4, progress=False)
    layout = Layout.open(path)
    for entry in layout.manifest["predictor"]["report"]:
        window = entry["window"]
        assert window["k"][0] == 0
        assert window["loaded"] == sorted(window["loaded"], reverse=True)
        assert window["cached"] == sorted(window["cached"])
        assert window["loaded"][0] == pytest.approx(window["cached"][0])
        assert 0 < window["cached"][-1] <= 1
    stats, source = window_stats(layout, "lowrank", 4)
    assert "the predictor's report" in source and "assumed" not in source
    assert all(loaded <= held for _, loaded, held in stats)


def test_the_disk_is_measured_beside_compute(tmp_path):
    from mlx_flashinfer.plan.disk import stream_beside

    file = tmp_path / "f.bin"
    file.write_bytes(np.random.default_rng(0).bytes(8 << 20))
    calls = []
    rate = stream_beside(file, lambda: calls.append(1), seconds=0.2, size=1 << 20)
    assert rate > 0 and calls


@pytest.mark.parametrize("q", [0.02, 0.1, 0.3, 0.6, 0.9])
def test_the_reads_of_a_call_are_those_the_reader_makes(tmp_path, q):
    # costs._call_reads (runs and bytes of a set at density q, gaps read through)
    # against the reader's own runs of random sets of that density
    from mlx_flashinfer.flash.reader import DEFAULT_CHUNK, FlashReader
    from mlx_flashinfer.formats.layout import LayerExtent
    from mlx_flashinfer.plan.costs import _call_reads

    row, n, gap = 3456, 4096, 16 * 1024  # the default model's bundle
    file = tmp_path / "ffn.bin"
    file.write_bytes(bytes(n * row))
    rng = np.random.default_rng(0)
    runs = nbytes = reads = 0
    trials = 20
    with FlashReader(file, [LayerExtent(0, n)], row, max_gap_bytes=gap) as reader:
        for _ in range(trials):
            ids = np.flatnonzero(rng.random(n) < q)
            _, first, _, lo, hi = reader._runs(reader.layers[0], ids)
            runs += len(first)
            nbytes += int((hi - lo).sum())
            reads += int(np.ceil((hi - lo) / DEFAULT_CHUNK).sum())
        align = reader.align
    predicted_reads, predicted_bytes = _call_reads(q * n, q, row, gap // row, align)
    assert predicted_bytes == pytest.approx(nbytes / trials, rel=0.1)
    assert predicted_reads == pytest.approx(reads / trials, rel=0.25, abs=1)


def test_a_read_call_costs_the_readers_work_by_threads_used():
    from mlx_flashinfer.plan.reader_cost import call_seconds

    one = {"call_s": 1e-4, "read_s": 2e-6, "byte_s": 1e-10}
    many = {"call_s": 8e-4, "read_s": 1e-6, "byte_s": 1e-10}
    reader = {"1": one, "16": many}

    def cost(c, reads, nbytes):
        return c["call_s"] + reads * c["read_s"] + nbytes * c["byte_s"]

    # one read needs no pool; every thread busy: the pool's cost; between: by log
    assert call_seconds(reader, 16, 1, 1e5, ()) == pytest.approx(cost(one, 1, 1e5))
    assert call_seconds(reader, 16, 64, 1e6, ()) == pytest.approx(cost(many, 64, 1e6))
    four = call_seconds(reader, 16, 4, 1e6, ())
    assert four == pytest.approx((cost(one, 4, 1e6) + cost(many, 4, 1e6)) / 2)
    assert call_seconds(reader, 1, 64, 1e6, ()) == pytest.approx(cost(one, 64, 1e6))
    # a probe without the reader's costs: the constants given
    assert call_seconds({}, 16, 10, 1e6, (1e-4, 1e-5, 1e-9)) == pytest.approx(
        1e-4 + 10 * 1e-5 + 1e6 * 1e-9
    )
    assert call_seconds(reader, 16, 0, 0, ()) == 0


def test_reads_from_disk_cost_the_cpu_their_call_and_copies_only():
    # the disk's cells time each read end to end (through the same ring or
    # threads): from a disk a call adds its own cost and the bytes it copies;
    # from memory (the compute-only row) each read's work and every byte's copy
    from dataclasses import replace

    from mlx_flashinfer.flash.reader import DEFAULT_THREADS
    from mlx_flashinfer.plan.costs import read_cpu_seconds

    one = {"call_s": 1e-4, "read_s": 2e-6, "byte_s": 1e-10}
    many = {"call_s": 8e-4, "read_s": 1e-6, "byte_s": 3e-10}
    machine = replace(fake_machine(), reader={"1": one, str(DEFAULT_THREADS): many})
    disk = read_cpu_seconds(machine, DEFAULT_THREADS, 64, 1e6)
    assert disk == pytest.approx(8e-4 + 1e6 * 3e-10)
    memory = read_cpu_seconds(machine, DEFAULT_THREADS, 64, 1e6, from_disk=False)
    copy = 1e6 / machine.memory_bytes_per_s
    assert memory == pytest.approx(8e-4 + 64 * 1e-6 + 1e6 * 3e-10 + copy)
    # bundles whose pieces are on the alignment land in their rows by DMA: their
    # reads cost the CPU their calls only, whatever each read and byte would cost
    # from memory; others land in staging and pay the copy of every byte
    from mlx_flashinfer.flash.landing import lands_direct
    from mlx_flashinfer.flash.memory import plan_floor
    from mlx_flashinfer.loader import make_plan
    from mlx_flashinfer.predictors.kinds import predictor_nbytes

    dearer = {
        n: dict(c, read_s=100 * c["read_s"], byte_s=100 * c["byte_s"])
        for n, c in machine.reader.items()
    }
    for d_heads, direct in ((16, True), (2, False)):  # rows of 512 and 64 bytes
        layout = Layout.open(tiny_layout("llama", "relu", d_heads, 400, 3))
        assert lands_direct(layout, 512) == direct
        floor = plan_floor(layout, predictor_nbytes("gate", layout))
        budget = floor + model_bytes(layout)[1] // 8
        plan = make_plan(layout, budget, "gate", 64, False)
        cost = sparse_cost(layout, plan, machine, "gate", 4)
        again = sparse_cost(layout, plan, replace(machine, reader=dearer), "gate", 4)
        assert cost.bytes_read > 0 and cost.io_fixed_s > 0
        if direct:
            assert again.io_fixed_s == pytest.approx(cost.io_fixed_s)
        else:
            assert again.io_fixed_s > cost.io_fixed_s


def test_the_readers_costs_are_measured_in_memory(monkeypatch):
    from mlx_flashinfer.plan import reader_cost

    measured = reader_cost.measure_reader(seconds=0.02)
    if not measured:  # no tmpfs here
        pytest.skip("no /dev/shm")
    for threads in ("1", "16"):
        c = measured[threads]
        assert set(c) == {"call_s", "read_s", "byte_s"}
        assert all(v >= 0 for v in c.values()) and c["call_s"] + c["byte_s"] > 0
    monkeypatch.setattr(reader_cost, "TMPFS", "/nonexistent")
    assert reader_cost.measure_reader() == {}


def test_scratch_fulls_cost_read_calls_and_ffn_calls():
    # what the cache cannot hold goes through scratch, a read call and an FFN call
    # per scratch-full: a smaller scratch costs more calls of both
    from dataclasses import replace

    from mlx_flashinfer.flash.memory import plan_floor
    from mlx_flashinfer.loader import make_plan
    from mlx_flashinfer.predictors.kinds import predictor_nbytes

    layout = Layout.open(tiny_layout("llama", "relu", 2, 400, 3))
    floor = plan_floor(layout, predictor_nbytes("all", layout))
    plan = make_plan(layout, floor + io_buffer_bytes(layout), "all", 64)
    assert max(plan.capacity) < 400 and plan.scratch_rows >= 8
    machine = replace(fake_machine(), ffn_call_s=1e-4)
    wide = sparse_cost(layout, plan, machine, "all", 0)
    narrow = sparse_cost(layout, replace(plan, scratch_rows=8), machine, "all", 0)
    over = 400 - np.array(plan.capacity)  # every neuron, per layer
    extra = (np.ceil(over / 8) - np.ceil(over / plan.scratch_rows)).sum() * 1e-4
    assert narrow.compute_s - wide.compute_s == pytest.approx(extra)
    assert narrow.io_fixed_s > wide.io_fixed_s
    assert narrow.bytes_read >= wide.bytes_read


def test_the_ffn_calls_fixed_cost_is_measured_and_counted():
    from dataclasses import replace

    assert compute_probe.ffn_call_overhead("numpy", calls=20) > 0
    layout = Layout.open(tiny_layout("llama", "silu", 2, 400, 3))
    base = fake_machine()
    more = dense_cost(layout, replace(base, ffn_call_s=1e-3)).compute_s
    assert more - dense_cost(layout, base).compute_s == pytest.approx(3 * 1e-3)


@pytest.mark.parametrize("skew", [0.0, 1.0, 2.0])
def test_the_expert_caches_hit_rate_is_that_of_the_window_manager(skew):
    # expert_costs.lru_hit_rate (Che's approximation) against the window manager the
    # experts placement runs (least recently routed out first), on routings drawn
    # from a Zipf popularity
    from mlx_flashinfer.flash.experts import KEEP_PAST_WINDOW
    from mlx_flashinfer.plan.expert_costs import lru_hit_rate

    experts, k, capacity, tokens = 32, 4, 10, 3000
    rng = np.random.default_rng(0)
    p = 1 / np.arange(1, experts + 1) ** skew
    p /= p.sum()
    window = LayerWindow(experts, capacity, KEEP_PAST_WINDOW)
    hits = routed = 0
    for t in range(tokens):
        ids = np.sort(rng.choice(experts, k, replace=False, p=p))
        step = window.step(ids)
        if t >= 200:  # past the cache's filling
            hits += step.hits
            routed += k
    # top-k without replacement: each expert's routings per token
    rates = np.zeros(experts)
    for _ in range(4000):
        rates[rng.choice(experts, k, replace=False, p=p)] += 1 / 4000
    predicted = lru_hit_rate(rates, capacity)
    assert predicted == pytest.approx(hits / routed, abs=0.04)
    if skew == 0:
        assert predicted == pytest.approx(capacity / experts, abs=0.01)
    assert lru_hit_rate(rates, experts) == 1.0 and lru_hit_rate(rates, 0) == 0.0


def test_the_planner_plans_a_mixture_of_experts(tmp_path):
    from test_moe import budgets, moe_layout
    from tiny_moe import moe_config

    from mlx_flashinfer.flash.expert_plan import plan_experts
    from mlx_flashinfer.plan.expert_costs import experts_cost, experts_paging_cost

    # experts enough that the budgets below hold less than every weight
    config = moe_config("qwen2_moe", experts=64, moe_intermediate_size=96)
    path = moe_layout("qwen2-moe-64", config)
    layout = Layout.open(path)
    sizes = budgets(path)
    machine = fake_machine(disk_rate=1e8)
    least = plan_experts(layout, sizes["least"], 0, 64)
    half = plan_experts(layout, sizes["half"], 0, 64)
    # window 0 reads every routed expert; a bigger cache reads fewer
    naive = experts_cost(layout, half, machine, 0)
    k = layout.args.experts_per_token * layout.args.num_hidden_layers
    # bundles on the 512-byte alignment are read whole, straight into their rows;
    # others with the aligned bytes around them
    slack = 0 if layout.bundle_bytes % 512 == 0 else 512
    assert naive.bytes_read == pytest.approx(k * (layout.bundle_bytes + slack))
    assert experts_cost(layout, half, machine, 4).bytes_read < naive.bytes_read
    assert (
        experts_cost(layout, least, machine, 4).bytes_read
        > experts_cost(layout, half, machine, 4).bytes_read
    )
    # every expert cached: nothing read
    every = plan_experts(layout, sizes["all"], 0, 64)
    assert experts_cost(layout, every, machine, 4).bytes_read == 0
    assert sizes["least"] < sum(model_bytes(layout))  # dense does not fit
    choice = choose(layout, sizes["least"], machine, max_context=64)
    assert choice.best.placement == "experts" and choice.best.window > 0
    assert choice.best.options()["placement"] == "experts"
    paging = experts_paging_cost(layout, sizes["least"], machine)
    assert choice.paging.bytes_read == paging.bytes_read > 0
    with pytest.raises(ValueError, match="routed by its router"):
        choose(layout, sizes["least"], machine, max_context=64, predictor="lowbit")
    # load(placement="auto") runs the choice
    from mlx_flashinfer import load
    from mlx_flashinfer.plan.machine import machine_path

    save_machine(machine, machine_path(path, "numpy", tmp_path))
    model, _ = load(
        path,
        backend="numpy",
        memory_budget=sizes["least"],
        placement="auto",
        cache_dir=tmp_path,
        max_context=64,
    )
    assert model.ffn.plan.placement == "experts"
    assert model.ffn.windows[0].k > 0
    model.ffn.close()


def test_a_mixture_of_experts_prompt_reads_the_union_of_its_tokens_experts():
    from test_moe import budgets, moe_layout
    from tiny_moe import moe_config

    from mlx_flashinfer.flash.expert_plan import plan_experts
    from mlx_flashinfer.plan.prompt_costs import prompt_cost

    config = moe_config("qwen2_moe", experts=64, moe_intermediate_size=96)
    layout = Layout.open(moe_layout("qwen2-moe-64", config))
    args = layout.args
    e, k, layers = args.num_experts, args.experts_per_token, args.num_hidden_layers
    machine = fake_machine(disk_rate=1e8)
    half = plan_experts(layout, budgets(layout.path)["half"], 0, 64)
    slack = 0 if layout.bundle_bytes % 512 == 0 else 512
    for tokens in (1, 4, 32):
        # every expert equally popular (no routing recorded): the union of T
        # tokens' experts is E (1 - (1 - k/E)^T) a layer, each read once
        union = e * (1 - (1 - k / e) ** tokens)
        cost = prompt_cost(layout, "experts", machine, tokens, plan=half)
        expected = layers * union * (layout.bundle_bytes + slack)
        assert cost.bytes_read == pytest.approx(expected)
        dense = prompt_cost(layout, "dense", machine, tokens)
        assert dense.bytes_read == 0 and dense.io_s == 0
        assert cost.compute_s == pytest.approx(dense.compute_s)
        assert cost.io_s > 0
    assert prompt_cost(layout, "paging", machine, 4, budget=1) is None  # not modelled
    # past a chunk (PREFILL_CHUNK tokens) each chunk reads its own union
    from mlx_flashinfer.model.transformer import PREFILL_CHUNK

    chunk = prompt_cost(layout, "experts", machine, PREFILL_CHUNK, plan=half)
    two = prompt_cost(layout, "experts", machine, 2 * PREFILL_CHUNK, plan=half)
    assert two.bytes_read == pytest.approx(2 * chunk.bytes_read)
    assert two.total_s == pytest.approx(2 * chunk.total_s)
    longer = prompt_cost(layout, "dense", machine, 64)
    assert longer.compute_s > prompt_cost(layout, "dense", machine, 4).compute_s


def test_the_disk_probe_measures_the_readers_io_uring_and_the_model_reads_with_it(
    tmp_path,
):
    from mlx_flashinfer.flash.uring import RING_ENTRIES, open_ring
    from mlx_flashinfer.plan.costs import disk_seconds
    from mlx_flashinfer.plan.disk import _ring_cell, table

    # a call of many small reads: waves of 16 on threads, of RING_ENTRIES on a ring
    machine = fake_machine(disk_rate=1e9)
    pool = disk_seconds(machine, 1024, 1024 * 4096)
    machine.disk["cells"] += [
        {"read_size": s, "threads": RING_ENTRIES, "ring": True, "bytes_per_s": 4e9}
        for s in (4096, 1 << 20)
    ]
    assert disk_seconds(machine, 1024, 1024 * 4096) == pytest.approx(pool / 4)
    result = {"sizes": [4096, 1 << 20], "threads": [1, 16], **machine.disk}
    assert "io_uring 256" in table(result)
    # the probe's ring cell: random blocks read through a ring, counted
    ring = open_ring()
    if ring is None:
        pytest.skip("io_uring is unavailable here")
    path = tmp_path / "disk"
    path.write_bytes(np.random.default_rng(0).bytes(1 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        cell = _ring_cell(ring, fd, 1 << 20, 4096, 0.02)
    finally:
        os.close(fd)
        ring.close()
    assert cell["ring"] and cell["threads"] == ring.entries == RING_ENTRIES
    assert cell["reads"] >= RING_ENTRIES and cell["bytes"] == cell["reads"] * 4096
    assert cell["bytes_per_s"] == pytest.approx(cell["bytes"] / cell["seconds"])


def test_narrow_and_wide_matrices_multiply_at_the_probes_rates_for_them():
    from mlx_flashinfer.plan.compute_probe import NARROW, SIDE, WIDE, width_rate
    from mlx_flashinfer.plan.costs import gemv_rate

    assert width_rate("numpy", NARROW, 8, nbytes=4 << 20, seconds=0.01) > 0
    machine = fake_machine(gemv=4e9)
    side = gemv_rate(machine, "float16", "1", 1 << 30, SIDE)
    assert gemv_rate(machine, "float16", "1", 1 << 30, NARROW) == side  # unprobed
    assert gemv_rate(machine, "float16", "1", 1 << 30, WIDE) == side
    machine.gemv["float16"]["1 narrow"] = 2e9  # half the SIDE-wide rate
    machine.gemv["float16"]["1 wide"] = 8e9  # twice it
    assert gemv_rate(machine, "float16", "1", 1 << 30, SIDE) == side
    assert gemv_rate(machine, "q4", "1", 1 << 30, NARROW) == pytest.approx(side / 2)
    between = gemv_rate(machine, "float16", "1", 1 << 30, 2 * NARROW)
    assert between == pytest.approx(side / 2**0.5)
    assert gemv_rate(machine, "float16", "1", 1 << 30, 64) == pytest.approx(side / 2)
    # wider: toward the wide rate in log width, and no further past it
    halfway = int((SIDE * WIDE) ** 0.5)
    assert gemv_rate(machine, "float16", "1", 1 << 30, halfway) == pytest.approx(
        side * 2**0.5
    )
    assert gemv_rate(machine, "q4", "1", 1 << 30, 4 * WIDE) == pytest.approx(2 * side)


def test_each_probe_cell_goes_on_with_the_matrices_touched_longest_ago():
    """A cell over a set larger than the caches reads from memory only if it starts
    where the last cell stopped (the matrices after it were touched longest ago)."""
    from mlx_flashinfer.model.backends import get_backend
    from mlx_flashinfer.plan.compute_probe import _rate

    B = get_backend("numpy")
    weights = [B.weight(np.full((4, 8), i, np.float16)) for i in range(5)]
    touched = []

    class Counting:
        def __getattr__(self, name):
            return getattr(B, name)

        def linear(self, x, w):
            touched.append(int(w[0, 0]))
            return B.linear(x, w)

    x = B.array(np.ones((1, 8), np.float32))
    B.linear(x, weights[0])  # the kernel compiled (a first call's)
    rate, cursor = _rate(Counting(), x, weights, 0.05, 3)
    assert touched[:3] == [3, 4, 0] and cursor == (3 + len(touched)) % 5
    assert rate > 0
    went_on = cursor
    touched.clear()
    # a product as long as the cell is measure enough, without a warm-up
    rate, cursor = _rate(Counting(), x, weights, 0.0, cursor)
    assert touched == [went_on] and cursor == (went_on + 1) % 5


def test_the_probe_measures_the_kernels_path_limits_and_load_sets_them(
    tmp_path, monkeypatch
):
    """Where the NumPy kernels' loops and BLAS cross depends on the CPU: the probe
    measures it, and loading on a probed machine runs with it."""
    from fallback_numpy import kernels
    from mlx_flashinfer import load
    from mlx_flashinfer.plan.compute_probe import LIMIT_TOKENS, product_limits
    from mlx_flashinfer.plan.machine import machine_path

    shipped = {n: getattr(kernels, n) for n in ("DOT_ROWS_MAX_T", "QDOT_ROWS_MAX_T")}
    for name, value in shipped.items():  # put back after the test, whatever it sets
        monkeypatch.setattr(kernels, name, value)
    limits = product_limits("numpy", seconds=0.01)
    assert set(limits) == set(shipped) and set(limits.values()) <= set(LIMIT_TOKENS)
    assert {n: getattr(kernels, n) for n in shipped} == shipped  # measured, not set
    assert product_limits("mlx") == {}
    layout = tiny_layout("llama", "silu", 2, 400, 3)
    machine = fake_machine()
    machine.product_limits = {"DOT_ROWS_MAX_T": 12, "QDOT_ROWS_MAX_T": 24}
    save_machine(machine, machine_path(layout, "numpy", tmp_path))
    load(layout, backend="numpy", cache_dir=tmp_path)
    assert kernels.DOT_ROWS_MAX_T == 12 and kernels.QDOT_ROWS_MAX_T == 24
    # (either path gives the same products: test_kernels runs both at every T)


def test_a_prompts_predictor_runs_on_the_tokens_whose_sets_it_uses():
    """The predictor's product over a prompt: every token for a ReLU-family model
    (its prompt may read their union), the last k for others (they seed the
    window): flash/ffn.py `_prefill`."""
    from mlx_flashinfer.flash.memory import plan_floor
    from mlx_flashinfer.loader import make_plan
    from mlx_flashinfer.plan.prompt_costs import prompt_cost, prompt_product_seconds
    from mlx_flashinfer.predictors.kinds import predictor_nbytes

    machine = fake_machine(gemv=4e9)
    machine.gemm = {"float32": {"8": 2e9, "64": 1e9}}
    for act in ("silu", "relu"):
        layout = Layout.open(tiny_layout("llama", act, 2, 400, 12))
        _, ffn = model_bytes(layout)
        held = predictor_nbytes("gate", layout)
        plan = make_plan(layout, plan_floor(layout, held) + ffn // 4, "gate", 64)

        def compute(window: int, layout=layout, plan=plan) -> float:
            cost = prompt_cost(
                layout,
                "sparse",
                machine,
                32,
                plan=plan,
                predictor="gate",
                window=window,
            )
            return cost.compute_s

        if act == "relu":
            assert compute(2) == compute(8)  # every token, whatever k
        else:
            gap = prompt_product_seconds(machine, "float32", held, 8)
            gap -= prompt_product_seconds(machine, "float32", held, 2)
            assert compute(8) - compute(2) == pytest.approx(gap)
