"""`flashinfer bench`: the rows read what the method says, baselines compute the dense
FFN, the result carries its machine, --compare renders, bad input is one line."""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from tiny_models import random_weights, tiny_config, write_hf_checkpoint

from mlx_flashinfer import Layout, convert
from mlx_flashinfer.bench.ablation import prepare, run_bench
from mlx_flashinfer.bench.baselines import MmapFFN, StreamFFN
from mlx_flashinfer.bench.cgroup import find_memory_cgroup
from mlx_flashinfer.bench.configs import RunSpec
from mlx_flashinfer.bench.layouts import unbundled_layout
from mlx_flashinfer.bench.predicted import repredict
from mlx_flashinfer.bench.report import compare, markdown
from mlx_flashinfer.bench.runner import run_inline, run_isolated
from mlx_flashinfer.cli import main
from mlx_flashinfer.model.backends import get_backend
from mlx_flashinfer.model.transformer import DenseFFN, Model, prepare_weights

BACKENDS = ["numpy"]
try:
    get_backend("mlx")
    BACKENDS.append("mlx")
except ImportError:
    pass

# A disk probe of two read sizes: enough for the rows' disk-limit columns.
PROBE = {
    "mode": "direct",
    "sizes": [4096, 1 << 20],
    "threads": [1, 16],
    "cells": [
        {"read_size": s, "threads": t, "bytes_per_s": s * 1e4 * t**0.5}
        for s in (4096, 1 << 20)
        for t in (1, 16)
    ],
}


def tiny_opt(
    path: Path,
    seed: int = 0,
    arrangement: str = "bundled",
    ffn: int = 96,
    live: tuple[int, ...] = (),
) -> Path:
    """A float32 tiny OPT layout; with `live`, only those neurons can fire (the
    others' fc1 bias is -10), each about every other token."""
    config = tiny_config(
        "opt", hidden_size=32, ffn_dim=ffn, num_hidden_layers=2, word_embed_proj_dim=32
    )
    weights = random_weights(config, seed)
    if live:
        for name in [n for n in weights if n.endswith("fc1.bias")]:
            weights[name][:] = -10.0
            weights[name][list(live)] = 0.0
    src = write_hf_checkpoint(path / "src", config, weights)
    return convert(
        src,
        path / arrangement,
        dtype="float32",
        progress=False,
        arrangement=arrangement,
    )


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    # Two live neurons per layer, 200 apart: 25 KiB apart in each part's region of
    # the unbundled layout, farther than the reader reads through (16 KiB), so a
    # neuron costs two reads there and one when bundled. Window 1: some loads every
    # token.
    layout = tiny_opt(tmp, ffn=384, live=(0, 200))
    prepared = prepare(
        str(layout),
        budget="200%",  # holds the two read buffers of +lookahead (tiny layers)
        backends=tuple(BACKENDS),
        prompt_tokens=8,
        tokens=8,
        window=1,
        predictor="oracle",
        threads=1,
        cache_dir=tmp / "cache",
    )
    result = run_bench(prepared, run_inline, PROBE, "in process", progress=False)
    return Layout.open(layout), result


def rows_of(result: dict, backend: str) -> dict:
    return {r["row"]: r for r in result["rows"] if r["backend"] == backend}


def per_token(row: dict, key: str) -> float:
    return row["decode"][key] / row["decode"]["tokens"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_read_what_the_method_says(bench_result, backend):
    layout, result = bench_result
    rows = rows_of(result, backend)
    assert not [r["error"] for r in rows.values() if "error" in r]
    n, bundle = layout.args.intermediate_size, layout.bundle_bytes
    layers = layout.args.num_hidden_layers
    useful = {
        name: per_token(r, "bytes_useful") for name, r in rows.items() if r["decode"]
    }
    assert useful["naive"] == layout.ffn_bytes  # every neuron, every token
    assert useful["hybrid"] == layers * (n - (n + 1) // 2) * bundle  # the other half
    assert rows["hybrid"]["setup"]["capacity"] == (n + 1) // 2
    assert useful["+predictor"] <= useful["naive"]
    assert useful["+windowing"] <= useful["+predictor"]
    # bundling: the same neurons, in fewer reads
    assert useful["all"] == useful["+windowing"]
    assert useful["all"] > 0
    reads = per_token(rows["+windowing"], "reads"), per_token(rows["all"], "reads")
    assert reads[0] == 2 * reads[1]
    assert rows["+windowing"]["setup"]["arrangement"] == "separate"
    assert useful["stream"] == layout.ffn_bytes
    # reads ahead and reads from memory: the same neurons land in the cache
    for name in ("+lookahead", "compute-only"):
        loaded = rows[name]["decode"]["neurons_loaded"]
        assert loaded == rows["all"]["decode"]["neurons_loaded"], name
    assert rows["+lookahead"]["decode"]["ahead_used"] > 0
    assert rows["compute-only"]["setup"]["reader_mode"] == "in memory"
    # an exact predictor (oracle, ReLU) and the baselines decode as dense does
    for name in (
        "naive",
        "hybrid",
        "all",
        "+lookahead",
        "compute-only",
        "mmap",
        "stream",
    ):
        assert rows[name]["argmax"] == rows["dense"]["argmax"], name


def test_result_records_the_machine_and_renders(bench_result, tmp_path):
    _, result = bench_result
    machine = result["machine"]
    for key in ("platform", "cpu", "cores", "ram_bytes", "gpu", "versions"):
        assert key in machine
    assert {"python", "numpy", "mlx", "mlx-flashinfer"} <= set(machine["versions"])
    assert result["probe"] == PROBE
    assert all(r["backend"] in BACKENDS for r in result["rows"])
    metrics = rows_of(result, "numpy")["naive"]["metrics"]
    assert metrics["disk_limit_ms"] > 0 and metrics["total_ms"] > 0
    json.dumps(result)  # JSON-able as is
    text = markdown(result)
    assert "| naive (every FFN weight read) |" in text
    assert "layer streaming (AirLLM)" in text


def test_compare_renders_two_results(bench_result, tmp_path, capsys):
    _, result = bench_result
    other = json.loads(json.dumps(result))
    other["machine"]["cpu"] = "Apple M1 Max"
    for row in other["rows"]:
        if "metrics" in row:
            row["metrics"]["total_ms"] /= 2
    a, b = tmp_path / "linux.json", tmp_path / "mac.json"
    a.write_text(json.dumps(result))
    b.write_text(json.dumps(other))
    assert "linux/numpy" in compare({str(a): result, str(b): other})
    code = main(["bench", "--compare", str(a), str(b), "--out", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert code == 0
    assert "speedup over the machine's own naive row" in out
    assert "mac/numpy" in out and "Apple M1 Max" in out
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "c.png").stat().st_size > 0


@pytest.mark.parametrize("dtype", ["float32", "q4"])
def test_unbundled_copy_holds_the_same_weights(tmp_path, dtype):
    # q4: fc1 rows at 4 bits, fc2 columns at 8: parts of unequal bytes
    layout = Layout.open(tiny_opt(tmp_path))
    if dtype == "q4":
        src = tmp_path / "src"  # the checkpoint tiny_opt wrote
        q4 = convert(src, tmp_path / "q4", dtype="q4", group_size=32, progress=False)
        layout = Layout.open(q4)
        assert len(set(layout.part_bytes)) == 2
    copy = unbundled_layout(layout, tmp_path / "cache")
    assert copy.arrangement == "separate"
    copy.verify()

    def fields(part) -> list:  # a float part, or a quantized one's arrays
        return [part] if isinstance(part, np.ndarray) else list(vars(part).values())

    for i in range(layout.args.num_hidden_layers):
        for got, want in zip(copy.read_parts(i), layout.read_parts(i), strict=True):
            for a, b in zip(fields(got), fields(want), strict=True):
                np.testing.assert_array_equal(a, b)
    assert unbundled_layout(layout, tmp_path / "cache").path == copy.path  # reused


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["mmap", "stream"])
def test_baselines_compute_the_dense_ffn(tmp_path, backend, kind):
    B = get_backend(backend)
    layout = Layout.open(tiny_opt(tmp_path))
    weights = prepare_weights(B, layout.resident_tensors().items())
    ffn_class = MmapFFN if kind == "mmap" else StreamFFN
    # chunks of 10 neurons: several per layer
    ffn = ffn_class(B, layout, weights, chunk_bytes=10 * layout.bundle_bytes)
    tokens = [1, 5, 9, 3, 22, 17]
    args = layout.args
    dense = Model(args, B, weights, DenseFFN(B, layout, weights), 64).logits(tokens, 3)
    paged = Model(args, B, weights, ffn, 64).logits(tokens, 3)
    np.testing.assert_allclose(paged, dense, atol=1e-4)
    stats = ffn.io_stats()["decode"]
    assert stats["tokens"] == 3
    if kind == "stream":
        assert stats["bytes_read"] == 3 * layout.ffn_bytes
        assert stats["reads"] == 3 * args.num_hidden_layers * 10  # 96 neurons / 10
    ffn.close()


def bench_error(argv, capsys) -> str:
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_bad_input_is_one_line(tmp_path, capsys):
    layout = tiny_opt(tmp_path / "a")
    other = tiny_opt(tmp_path / "b", seed=1, arrangement="separate")
    quick = ["--tokens", "2", "--prompt-tokens", "2", "--probe", "none.json"]
    assert "no such model" in bench_error([str(tmp_path / "missing"), *quick], capsys)
    err = bench_error([str(layout), "--unbundled", str(other), *quick], capsys)
    assert "not the same model" in err
    err = bench_error([str(layout), "--unbundled", str(layout), *quick], capsys)
    assert "arrangement 'separate'" in err
    assert "bad memory budget" in bench_error([str(layout), "--budget", "lots"], capsys)
    assert "too small" in bench_error([str(layout), "--budget", "1KB"], capsys)
    assert "--limit" in bench_error([str(layout), "--limit", "50%"], capsys)
    (tmp_path / "x.json").write_text("{}")
    assert "not a flashinfer bench" in bench_error(
        ["--compare", str(tmp_path / "x.json")], capsys
    )


CGROUP = find_memory_cgroup()


@pytest.mark.skipif(
    isinstance(CGROUP, str) or os.geteuid() != 0,
    reason=f"needs root and a cgroup memory controller ({CGROUP})",
)
def test_a_run_in_a_real_cgroup(tmp_path):
    layout = Layout.open(tiny_opt(tmp_path))
    spec = RunSpec(
        row="all",
        kind="flash",
        backend="numpy",
        layout=str(layout.path),
        prompt=[1, 5, 9],
        targets=[3, 22],
        budget=int(1e9),
        predictor="oracle",
        window=2,
        max_context=8,
        limit=1 << 30,
    )
    files = [layout.path / name for name in layout.manifest["files"]]
    result = run_isolated(spec, CGROUP, files, drop_all=False)
    assert "error" not in result, result.get("error")
    memory = result["memory"]
    assert memory["limited"] and memory["limit"] == 1 << 30
    assert 0 < memory["peak"] <= 1 << 30
    assert len(result["token_s"]) == 2
    spec.limit = 8 << 20  # too small for the interpreter: killed, and said so
    failed = run_isolated(spec, CGROUP, files, drop_all=False)
    assert "OOM" in failed["error"]
    # this process's groups are removed (another bench may be running beside)
    assert not list(CGROUP.parent.glob(f"flashinfer-bench-{os.getpid()}-*"))


def test_compare_takes_results_with_different_rows(bench_result, tmp_path, capsys):
    """A run of a few rows (no naive row to compare with) beside a full one: the
    missing cells are gaps, in the tables and the plot."""
    _, result = bench_result
    few = json.loads(json.dumps(result))
    few["rows"] = [r for r in few["rows"] if r["row"] in ("all", "+lookahead")]
    a, b = tmp_path / "full.json", tmp_path / "few.json"
    a.write_text(json.dumps(result))
    b.write_text(json.dumps(few))
    code = main(["bench", "--compare", str(a), str(b), "--out", str(tmp_path / "c")])
    assert code == 0
    assert "few/numpy" in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "c.png").stat().st_size > 0


def test_streamed_and_planned_rows_carry_the_cost_models_prediction(tmp_path):
    from test_flash import tiny_layout
    from test_plan import fake_machine

    from mlx_flashinfer.flash.memory import io_buffer_bytes, model_bytes, slot_bytes

    # a SiLU model streamed: exact all the same (12 layers: a ring of 6 one-layer
    # spans, and a quarter of the FFN held)
    layout = tiny_layout("llama", "silu", 2, 400, 12)
    lay = Layout.open(layout)
    resident, ffn = model_bytes(lay)
    ring = 6 * slot_bytes(400, lay.bundle_bytes)
    budget = resident + io_buffer_bytes(lay) + ring + ffn // 4
    machines = {}
    for backend in BACKENDS:
        machines[backend] = fake_machine()
        machines[backend].backend = backend
    prepared = prepare(
        str(layout),
        budget=budget,
        backends=tuple(BACKENDS),
        rows=("dense", "streamed", "plan"),
        prompt_tokens=4,
        tokens=4,
        window=1,
        threads=1,
        cache_dir=tmp_path / "cache",
        machines=machines,
    )
    result = run_bench(
        prepared, run_inline, PROBE, "in process", progress=False, machines=machines
    )
    for backend in BACKENDS:
        rows = rows_of(result, backend)
        assert not [r["error"] for r in rows.values() if "error" in r]
        assert rows["streamed"]["argmax"] == rows["dense"]["argmax"]
        streamed = rows["streamed"]["decode"]["bytes_useful"] / 4
        assert streamed >= ffn // 2  # most of the FFN read every token
        for row in rows.values():
            m = row["metrics"]
            assert m["predicted_ms"] > 0 and m["measured_ms"] == m["total_ms"]
            # its prompt's too (plan/prompt_costs.py)
            assert m["predicted_prefill_ms"] > 0
            assert m["measured_prefill_ms"] == 1e3 * row["prefill_s"]
        assert rows["streamed"]["metrics"]["predicted_mb_per_token"] * 1e6 == (
            pytest.approx(streamed)
        )
        assert rows["plan"]["spec"]["notes"][0].startswith("the planner chose")
        # the prediction at the rate the streamed row's reads got
        m = rows["streamed"]["metrics"]
        assert m["gb_per_s"] > 0
        assert m["at_disk_over_measured"] == pytest.approx(
            m["predicted_at_disk_ms"] / m["measured_ms"]
        )
    assert set(result["machines"]) == set(BACKENDS)
    # predicted again from what the result kept (JSON round trip): the same
    kept = json.loads(json.dumps(result))
    for row in kept["rows"]:
        row["metrics"] = {
            k: v for k, v in row["metrics"].items() if not k.startswith("predicted")
        }
    repredict(kept)
    for row, again in zip(result["rows"], kept["rows"], strict=True):
        keys = ("predicted_ms", "predicted_at_disk_ms", "predicted_io_ms")
        for key in (*keys, "predicted_prefill_ms"):
            assert again["metrics"][key] == pytest.approx(row["metrics"][key])
    # with a faster machine's compute rates (the run's disk kept): less compute
    faster = {}
    for backend in BACKENDS:
        faster[backend] = fake_machine(gemv=8e9)
        faster[backend].backend = backend
    repredict(kept, faster)
    for row, again in zip(result["rows"], kept["rows"], strict=True):
        m, n = row["metrics"], again["metrics"]
        assert n["predicted_compute_ms"] < m["predicted_compute_ms"]
        assert n["predicted_mb_per_token"] == pytest.approx(m["predicted_mb_per_token"])
