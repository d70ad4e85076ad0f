"""Faults: kill -9 at random points of `flashinfer convert`, `train-predictor` and the
cache's first use; truncated checkpoints, layouts and manifests.

After a kill the destination is absent or complete (it opens and verifies), the
source is untouched, and the next run succeeds and leaves nothing behind. A cut file
is always a clean error (ValueError or FileNotFoundError with a message).

The kill points are random (seeded; the seed is in every assertion message): half
anywhere in the run, half inside the write itself, found by watching the staging
directory appear.
"""

import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import (
    WORDS,
    random_weights,
    tiny_config,
    write_gguf,
    write_hf_checkpoint,
)

from mlx_flashinfer import Layout, convert
from mlx_flashinfer.formats.layout import MANIFEST

SEED = int(os.environ.get("FAULTS_SEED", time.time_ns() % 100_000))
KILLS = 3  # per operation: each costs two subprocesses


@pytest.fixture(scope="module")
def rng() -> random.Random:
    return random.Random(SEED)


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> dict:
    """A checkpoint big enough (about 40 MB) that its conversion takes a while to
    write, its layout, and calibration text."""
    tmp = tmp_path_factory.mktemp("faults")
    config = tiny_config(
        "llama",
        "relu",
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=4,
        vocab_size=100,
    )
    src = write_hf_checkpoint(tmp / "src", config, random_weights(config))
    layout = convert(src, tmp / "layout", progress=False)
    text = tmp / "text.txt"
    text.write_text(" ".join(random.Random(0).choices(WORDS, k=600)))
    return {"src": src, "layout": layout, "text": text}


def fingerprint(path: Path) -> dict:
    """sha256 of every file under `path` (or of `path` itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*"))
    return {
        str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in files
        if p.is_file()
    }


def flashinfer(*argv) -> list:
    return [sys.executable, "-m", "mlx_flashinfer", *map(str, argv)]


def run(*argv, env=None) -> subprocess.CompletedProcess:
    done = subprocess.run(
        flashinfer(*argv), env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"seed {SEED}: {argv}: {done.stderr}"
    return done


def kill_at_random(argv, rng, staging: Path | None, window: float, env=None) -> str:
    """Start `flashinfer ARGV` and SIGKILL it: at a random time, or (when `staging`,
    a folder, is given and a coin says so) at a random time of the `window` seconds
    after a staging directory appears in it. Returns where it was killed."""
    proc = subprocess.Popen(
        flashinfer(*argv), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    started = time.monotonic()
    watch = staging is not None and rng.random() < 0.5
    while watch and proc.poll() is None and time.monotonic() - started < 60:
        if any(".converting-" in p.name for p in staging.iterdir()):
            break
        time.sleep(0.001)
    delay = rng.uniform(0, window if watch else 1.5)
    time.sleep(delay)
    proc.kill()
    status = proc.wait(timeout=60)
    return f"seed {SEED}, {'write' if watch else 'run'} + {delay:.3f} s, exit {status}"


# -- kill -9 ---------------------------------------------------------------------------


def test_a_killed_convert_leaves_nothing_that_loads(medium, rng, tmp_path):
    src = medium["src"]
    before = fingerprint(src)
    out = tmp_path / "out"
    out.mkdir()
    for _ in range(KILLS):
        dst = out / "layout"
        shutil.rmtree(dst, ignore_errors=True)
        where = kill_at_random(["convert", src, dst, "--quiet"], rng, out, 0.4)
        if dst.exists():
            Layout.open(dst).verify()
        assert fingerprint(src) == before, where
        run("convert", src, dst, "--quiet", "--force")
        Layout.open(dst).verify()
        assert os.listdir(out) == ["layout"], where  # the kill's leftovers are gone


def test_sigterm_cleans_up_at_once(medium, tmp_path):
    # SIGTERM unwinds like Ctrl-C: the staging directory goes with the process
    proc = subprocess.Popen(
        flashinfer("convert", medium["src"], tmp_path / "layout", "--quiet"),
        stderr=subprocess.DEVNULL,
    )
    while proc.poll() is None and not os.listdir(tmp_path):
        time.sleep(0.001)
    proc.terminate()
    status = proc.wait(timeout=60)
    if status != 0:  # caught in time
        assert status == 143 and os.listdir(tmp_path) == []
    else:
        Layout.open(tmp_path / "layout").verify()


def test_a_killed_convert_force_never_loses_the_old_layout(medium, rng, tmp_path):
    src, out = medium["src"], tmp_path / "out"
    dst = convert(src, out / "layout", dtype="float32", progress=False)
    for _ in range(KILLS):
        argv = ["convert", src, dst, "--quiet", "--force", "--dtype", "float16"]
        where = kill_at_random(argv, rng, out, 0.4)
        if not dst.exists():  # killed between the two renames: the old one waits
            assert [p.name for p in out.iterdir() if ".old-" in p.name], where
        run("convert", src, dst, "--quiet", "--force", "--dtype", "float32")
        layout = Layout.open(dst)
        layout.verify()
        assert layout.dtype == "float32" and os.listdir(out) == ["layout"], where


def test_a_killed_train_predictor_leaves_the_layout_whole(medium, rng, tmp_path):
    layout = Path(shutil.copytree(medium["layout"], tmp_path / "layout"))
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    argv = ["train-predictor", layout, "--text", medium["text"], "--tokens", 128]
    argv += ["--rank", 4]
    started = time.monotonic()
    run(*argv, env=env)
    full = time.monotonic() - started
    trained = Layout.open(layout).manifest["predictor"]["file"]
    for _ in range(KILLS - 1):  # its runs are the longest
        proc = subprocess.Popen(flashinfer(*argv), env=env, stderr=subprocess.DEVNULL)
        delay = rng.uniform(0, full)
        time.sleep(delay)
        proc.kill()
        where = f"seed {SEED}, run + {delay:.3f} s, exit {proc.wait(timeout=60)}"
        reopened = Layout.open(layout)
        reopened.verify()  # the manifest names the old predictor or the new one
        assert reopened.has_predictor, where
        run(*argv, env=env)
        expected = set(fingerprint(medium["layout"])) | {f"layout/{trained}"}
        assert set(fingerprint(layout)) == expected, where  # no orphans, no .new
        assert os.listdir(tmp_path / "tmp") == [], where  # nor the activations


def test_a_killed_first_use_leaves_the_cache_usable(medium, rng, tmp_path):
    src, cache = medium["src"], tmp_path / "cache"
    before = fingerprint(src)
    env = dict(os.environ, MLX_FLASHINFER_CACHE=str(cache))
    argv = ["generate", "--model", src, "-p", "the", "-m", 1]
    for _ in range(KILLS):
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir()
        where = kill_at_random(argv, rng, cache, 0.4, env=env)
        for entry in cache.iterdir():
            if not entry.name.startswith("."):
                Layout.open(entry).verify()
        assert fingerprint(src) == before, where
        run(*argv, env=env)
        entries = os.listdir(cache)
        assert len(entries) == 1 and not entries[0].startswith("."), where
        Layout.open(cache / entries[0]).verify()


@pytest.mark.slow
def test_a_killed_convert_of_the_default_model(rng, tmp_path):
    from mlx_flashinfer.formats.default_model import default_gguf_path

    try:
        gguf = default_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    out, dst = tmp_path / "out", tmp_path / "out" / "smollm2"
    out.mkdir()
    before = fingerprint(gguf)
    where = kill_at_random(["convert", "default", dst, "--quiet"], rng, out, 4.0)
    if dst.exists():
        Layout.open(dst).verify()
    assert fingerprint(gguf) == before, where
    run("convert", "default", dst, "--quiet", "--force")
    assert os.listdir(out) == ["smollm2"], where
    Layout.open(dst).verify()


# -- truncation ------------------------------------------------------------------------

CLEAN = (ValueError, FileNotFoundError)
QUICK = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("cut")
    config = tiny_config("llama", "relu")
    src = write_hf_checkpoint(tmp / "hf", config, random_weights(config))
    gguf_config = tiny_config("llama", "relu", vocab_size=300)
    gguf = write_gguf(tmp / "tiny.gguf", gguf_config, random_weights(gguf_config))
    return {
        "hf": src,
        "gguf": gguf,
        "layout": convert(src, tmp / "layout", progress=False),
    }


def assert_clean(err: Exception) -> None:
    assert isinstance(err, CLEAN) and str(err), repr(err)


@QUICK
@given(data=st.data())
def test_a_cut_gguf_is_a_clean_error(small, data):
    blob = small["gguf"].read_bytes()
    cut = data.draw(st.integers(0, len(blob) - 1), label="cut")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "cut.gguf").write_bytes(blob[:cut])
        with pytest.raises(Exception) as caught:
            convert(Path(tmp) / "cut.gguf", Path(tmp) / "out", progress=False)
        assert_clean(caught.value)
        assert os.listdir(tmp) == ["cut.gguf"]


@QUICK
@given(data=st.data())
def test_a_cut_safetensors_is_a_clean_error(small, data):
    size = (small["hf"] / "model.safetensors").stat().st_size
    cut = data.draw(st.integers(0, size - 1), label="cut")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(shutil.copytree(small["hf"], Path(tmp) / "hf"))
        os.truncate(src / "model.safetensors", cut)
        with pytest.raises(Exception) as caught:
            convert(src, Path(tmp) / "out", progress=False)
        assert_clean(caught.value)
        assert os.listdir(tmp) == ["hf"]


@QUICK
@given(data=st.data())
def test_a_cut_layout_file_is_refused_on_open(small, data):
    name = data.draw(st.sampled_from(sorted(os.listdir(small["layout"]))))
    size = (small["layout"] / name).stat().st_size
    cut = data.draw(st.integers(0, size - 1), label="cut")
    with tempfile.TemporaryDirectory() as tmp:
        layout = Path(shutil.copytree(small["layout"], Path(tmp) / "layout"))
        os.truncate(layout / name, cut)
        try:
            Layout.open(layout)
        except Exception as err:  # the type is what is checked
            assert_clean(err)
            assert name == MANIFEST or "truncated or replaced" in str(err)
            return
        # only the manifest's trailing newline may go: its content is whole
        original = (small["layout"] / MANIFEST).read_text()
        assert name == MANIFEST and cut >= len(original.rstrip()), cut
