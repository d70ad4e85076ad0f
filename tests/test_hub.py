"""Hugging Face Hub names as model specs (formats/hub.py), from a Hub cache each test
builds in huggingface_hub's own structure; HF_HUB_OFFLINE=1 throughout, and the
download path is replaced by a failure, so no test can reach the network."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from cli_checks import assert_refused, run
from tiny_models import (
    TOKENS,
    random_weights,
    tiny_config,
    write_gguf,
    write_hf_checkpoint,
)

from mlx_flashinfer import load
from mlx_flashinfer.formats import hub
from mlx_flashinfer.formats.hub import HubName, files_needed, parse_hub_name
from mlx_flashinfer.formats.layout import Layout
from mlx_flashinfer.generate import generate_step
from mlx_flashinfer.loader import resolve_model

COMMIT_1 = "1" * 40
COMMIT_2 = "2" * 40
REPO = "tiny-org/tiny-llama"


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch) -> Path:
    """A private Hub cache and model cache, offline; the download path fails."""
    cache = tmp_path / "hf-hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MLX_FLASHINFER_CACHE", str(tmp_path / "layouts"))

    def no_network(*args, **kwargs):
        raise AssertionError("a test reached the download path")

    monkeypatch.setattr(hub, "_download", no_network)
    return cache


def put_in_hub_cache(
    cache: Path, repo_id: str, files: dict[str, bytes], commit: str, ref="main"
) -> Path:
    """Files as huggingface_hub stores them: models--owner--name/blobs/<sha256>,
    snapshots/<commit>/<path> linked to the blob (relatively), refs/<ref> naming the
    commit (no ref when None). Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for path, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():  # fetched before (as huggingface_hub skips it)
            link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    config = tiny_config("llama", "silu")
    return write_hf_checkpoint(path, config, random_weights(config, seed=seed))


def greedy_tokens(spec) -> list[int]:
    model, _ = load(spec, backend="numpy")
    return list(generate_step(model, TOKENS[:5], max_tokens=8))


def test_the_fixture_is_the_real_cache_structure(offline_hub, tmp_path):
    """huggingface_hub itself finds the files the tests put in its cache."""
    from huggingface_hub import try_to_load_from_cache

    snapshot = put_in_hub_cache(
        offline_hub, REPO, folder_files(tiny_checkpoint(tmp_path / "src")), COMMIT_1
    )
    found = try_to_load_from_cache(REPO, "config.json", cache_dir=offline_hub)
    assert found == str(snapshot / "config.json")


def test_a_hub_name_loads_and_generates_as_its_folder(offline_hub, tmp_path, capsys):
    folder = tiny_checkpoint(tmp_path / "src")
    put_in_hub_cache(offline_hub, REPO, folder_files(folder), COMMIT_1)
    from_hub = greedy_tokens(REPO)
    assert from_hub == greedy_tokens(folder)
    assert len(set(from_hub)) > 1  # a model that says something, not one token
    capsys.readouterr()
    status, out, _ = run(
        ["generate", "--model", REPO, "-p", "the cat", "-m", "4", "--backend", "numpy"],
        capsys,
    )
    assert status == 0 and out.strip()


def test_a_second_resolve_converts_nothing_and_a_new_commit_anew(
    offline_hub, tmp_path, capsys
):
    put_in_hub_cache(
        offline_hub, REPO, folder_files(tiny_checkpoint(tmp_path / "a")), COMMIT_1
    )
    first = resolve_model(REPO)
    assert "converting" in capsys.readouterr().err
    manifest = (first / "manifest.json").stat().st_mtime_ns
    assert resolve_model(REPO) == first
    assert "converting" not in capsys.readouterr().err
    assert (first / "manifest.json").stat().st_mtime_ns == manifest
    # the Hub's cache moves main to a new commit (other weights): converted anew
    put_in_hub_cache(
        offline_hub,
        REPO,
        folder_files(tiny_checkpoint(tmp_path / "b", seed=1)),
        COMMIT_2,
    )
    second = resolve_model(REPO)
    assert second != first and "converting" in capsys.readouterr().err
    assert greedy_tokens(REPO) == greedy_tokens(tmp_path / "b")
    capsys.readouterr()
    # the old commit, named, is still the first layout
    assert resolve_model(f"{REPO}@{COMMIT_1}") == first
    assert "converting" not in capsys.readouterr().err


def test_a_missing_name_is_one_line_exit_2(offline_hub, tmp_path, capsys):
    err = assert_refused(
        ["generate", "--model", "nobody/nothing", "-p", "hi"], "nobody/nothing", capsys
    )
    assert "HF_HUB_OFFLINE" in err and str(offline_hub) in err
    dst = tmp_path / "out"
    assert_refused(["convert", "nobody/nothing", dst], "not in the Hugging", capsys)
    assert not dst.exists()


def test_an_incomplete_snapshot_names_what_it_misses(offline_hub, tmp_path, capsys):
    """What AutoConfig leaves behind: config.json alone."""
    files = folder_files(tiny_checkpoint(tmp_path / "src"))
    put_in_hub_cache(offline_hub, REPO, {"config.json": files["config.json"]}, COMMIT_1)
    assert_refused(["inspect", REPO], "neither safetensors weights", capsys)
    # a sharded model whose index is there but one shard is not
    sharded = tmp_path / "sharded"
    config = tiny_config("llama", "silu")
    write_hf_checkpoint(sharded, config, random_weights(config), shards=2)
    files = folder_files(sharded)
    del files["model-00002-of-00002.safetensors"]
    put_in_hub_cache(offline_hub, "tiny-org/sharded", files, COMMIT_1)
    assert_refused(
        ["inspect", "tiny-org/sharded"], "model-00002-of-00002.safetensors", capsys
    )


def test_a_local_folder_named_like_a_hub_name_wins(offline_hub, tmp_path, monkeypatch):
    put_in_hub_cache(
        offline_hub, REPO, folder_files(tiny_checkpoint(tmp_path / "hub")), COMMIT_1
    )
    monkeypatch.chdir(tmp_path)
    local = tiny_checkpoint(tmp_path / REPO, seed=1)
    layout = Layout.open(resolve_model(REPO))
    assert layout.manifest["source"]["path"] == str(local.resolve())
    assert greedy_tokens(REPO) == greedy_tokens(local)


def test_a_gguf_file_selector(offline_hub, tmp_path):
    config = tiny_config("llama", "silu")
    weights = random_weights(config)
    f16 = write_gguf(
        tmp_path / "tiny-F16.gguf",
        config,
        weights,
        qtype_of=lambda name, a: gguf.GGMLQuantizationType.F16,
    )
    f32 = write_gguf(tmp_path / "tiny-F32.gguf", config, weights)
    files = {
        "tiny-F16.gguf": f16.read_bytes(),
        "tiny-F32.gguf": f32.read_bytes(),
        # a vision projector beside them is never a choice (llama.cpp's rule)
        "mmproj-tiny-F16.gguf": b"GGUF not a model",
        "README.md": b"# tiny",
    }
    repo = "tiny-org/tiny-GGUF"
    snapshot = put_in_hub_cache(offline_hub, repo, files, COMMIT_1)
    layout = Layout.open(resolve_model(f"{repo}:F16"))
    chosen = (snapshot / "tiny-F16.gguf").resolve()  # its blob
    assert layout.manifest["source"]["path"] == str(chosen)
    assert greedy_tokens(f"{repo}:f16") == greedy_tokens(f16)
    # the whole file name selects too, and lands in the same layout
    assert resolve_model(f"{repo}:tiny-F16.gguf") == layout.path
    assert resolve_model(f"{repo}:F32") != layout.path
    with pytest.raises(FileNotFoundError, match="2 GGUF files: name one"):
        resolve_model(repo)
    with pytest.raises(FileNotFoundError, match="matches 'Q4_K_M'"):
        resolve_model(f"{repo}:Q4_K_M")


def test_only_what_conversion_reads_is_chosen():
    """A repository as transformers and mistral upload them: PyTorch, ONNX and
    consolidated copies beside the sharded safetensors."""
    listing = [
        ".gitattributes",
        "README.md",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "consolidated.safetensors",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json",
        "onnx/model.onnx",
        "original/model.safetensors",
    ]
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    name = parse_hub_name("org/model")
    chosen = files_needed(name, listing, lambda file: index)
    assert sorted(chosen) == sorted(
        [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ]
    )
    # without an index: the top folder's safetensors (an mlx-community repo)
    listing = ["config.json", "model.safetensors", "tokenizer.json", "README.md"]
    assert files_needed(name, listing, dict) == [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
    ]
    with pytest.raises(ValueError, match="PyTorch .bin weights are not read"):
        files_needed(name, ["config.json", "pytorch_model.bin"], dict)
    split = [f"m-Q4_K_M-0000{k}-of-00002.gguf" for k in (1, 2)] + ["m-Q8_0.gguf"]
    with pytest.raises(ValueError, match="llama-gguf-split --merge"):
        files_needed(parse_hub_name("org/m:Q4_K_M"), split, dict)
    assert files_needed(parse_hub_name("org/m:q8_0"), split, dict) == ["m-Q8_0.gguf"]


@pytest.mark.parametrize(
    "spec, parsed",
    [
        ("Qwen/Qwen2.5-0.5B-Instruct", ("Qwen/Qwen2.5-0.5B-Instruct", "main", None)),
        ("mlx-community/Qwen3-8B-4bit", ("mlx-community/Qwen3-8B-4bit", "main", None)),
        ("o/r-GGUF:Q4_K_M", ("o/r-GGUF", "main", "Q4_K_M")),
        ("o/r@v1.0:r-Q4_K_M.gguf", ("o/r", "v1.0", "r-Q4_K_M.gguf")),
        (f"o/r@{COMMIT_1}", ("o/r", COMMIT_1, None)),
        ("./o/r", None),
        ("/o/r", None),
        ("o/r/file.gguf", None),
        ("model.gguf", None),
        ("default", None),
        ("o--x/r", None),
        ("o/r.", None),
        ("o/r@../../etc", None),
    ],
)
def test_what_is_a_hub_name(spec, parsed):
    name = parse_hub_name(spec)
    if parsed is None:
        assert name is None
    else:
        assert name == HubName(spec, *parsed)


def test_a_path_object_is_never_a_hub_name(offline_hub, tmp_path):
    put_in_hub_cache(
        offline_hub, REPO, folder_files(tiny_checkpoint(tmp_path / "src")), COMMIT_1
    )
    assert parse_hub_name(Path(REPO)) is None
    with pytest.raises(FileNotFoundError, match="no such model"):
        resolve_model(Path(REPO))


def test_convert_takes_a_hub_name(offline_hub, tmp_path, capsys):
    folder = tiny_checkpoint(tmp_path / "src")
    put_in_hub_cache(offline_hub, REPO, folder_files(folder), COMMIT_1)
    status, out, err = run(["convert", REPO, tmp_path / "out", "--quiet"], capsys)
    assert status == 0, err
    ours = Layout.open(tmp_path / "out")
    direct = Layout.open(resolve_model(folder))
    for (name, a), (_, b) in zip(
        ours.iter_resident(), direct.iter_resident(), strict=True
    ):
        np.testing.assert_array_equal(a, b, err_msg=name)
    shutil.rmtree(tmp_path / "out")


REAL_DOWNLOAD = hub._download  # the fixture replaces it; these tests mock below it


def hub_error(status: int, code: str):
    """The error huggingface_hub raises for a Hub answer with this X-Error-Code (its
    own hf_raise_for_status on a response made here, not received)."""
    httpx = pytest.importorskip("httpx2", reason="huggingface_hub>=1.0's client")
    from huggingface_hub.utils import hf_raise_for_status

    request = httpx.Request("GET", "https://huggingface.co/api/models/nobody/nothing")
    response = httpx.Response(status, headers={"X-Error-Code": code}, request=request)
    try:
        hf_raise_for_status(response)
    except Exception as err:
        return err
    raise AssertionError("no error raised")


@pytest.mark.parametrize(
    "error, kind, says",
    [
        (lambda: hub_error(404, "RepoNotFound"), FileNotFoundError, "no such model"),
        (lambda: hub_error(403, "GatedRepo"), ValueError, "accept its terms"),
        (lambda: hub_error(404, "RevisionNotFound"), FileNotFoundError, "no revision"),
        (lambda: ConnectionRefusedError(111, "refused"), OSError, "cannot be reached"),
    ],
)
def test_the_hubs_refusals_are_one_line(offline_hub, monkeypatch, error, kind, says):
    import huggingface_hub

    raised = error()

    def model_info(self, *args, **kwargs):
        raise raised

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    with pytest.raises(kind, match=says) as caught:
        REAL_DOWNLOAD(parse_hub_name("nobody/nothing"), offline_hub, False)
    assert "\n" not in str(caught.value)


def test_a_download_asks_for_what_conversion_reads(offline_hub, monkeypatch, tmp_path):
    """The repository's listing as the Hub gives it; huggingface_hub's own pattern
    filter applied to what `_download` asks for selects exactly the needed files."""
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    config = tiny_config("llama", "silu")
    sharded = write_hf_checkpoint(
        tmp_path / "src", config, random_weights(config), shards=2
    )
    files = folder_files(sharded) | {
        "pytorch_model.bin": b"pickle",
        "onnx/model.onnx": b"onnx",
        "[odd].safetensors": b"only the index's shards are weights",
    }
    info = SimpleNamespace(
        sha=COMMIT_1,
        siblings=[SimpleNamespace(rfilename=f, size=len(b)) for f, b in files.items()],
    )
    asked = {}

    # as huggingface_hub's own: refs/REVISION written only for a name, not a commit
    def hf_hub_download(repo_id, filename, *, revision, cache_dir):
        assert revision == COMMIT_1  # the listed commit's index, whatever main is now
        file = {filename: files[filename]}
        return str(
            put_in_hub_cache(cache_dir, repo_id, file, COMMIT_1, None) / filename
        )

    def snapshot_download(repo_id, *, revision, cache_dir, allow_patterns):
        chosen = list(filter_repo_objects(files, allow_patterns=allow_patterns))
        asked["files"] = chosen
        ref = None if revision == COMMIT_1 else revision
        file = {f: files[f] for f in chosen}
        return str(put_in_hub_cache(cache_dir, repo_id, file, COMMIT_1, ref))

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    found = REAL_DOWNLOAD(parse_hub_name(REPO), offline_hub, False)
    assert sorted(asked["files"]) == sorted(folder_files(sharded))
    assert found.commit == COMMIT_1 and found.file is None
    # what was fetched serves the next run from the cache, and loads
    assert hub.hub_source(REPO) == found
    assert greedy_tokens(REPO) == greedy_tokens(sharded)
