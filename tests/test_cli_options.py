"""Options are checked before anything runs, each refusal one line naming the
option; what the commands print is true to what they did (one notice, after the
checks; the same bytes printed the same; plurals; --help and --version)."""

import importlib
import importlib.metadata
import shutil
from pathlib import Path

import pytest
from cli_checks import assert_refused, run
from tiny_models import random_weights, tiny_config, write_hf_checkpoint

from mlx_flashinfer import convert, generate, load, stream_generate
from mlx_flashinfer.cli import build_parser
from mlx_flashinfer.flash.memory import format_bytes, model_bytes
from mlx_flashinfer.formats.layout import Layout
from mlx_flashinfer.perplexity import perplexity
from mlx_flashinfer.predictors.train import train_predictor

# the package exports the function `generate`, which hides the module of that name
generate_module = importlib.import_module("mlx_flashinfer.generate")
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
FLASH = ["--memory-budget", "200%"]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict:
    """Tiny ReLU and SiLU layouts with a chat template; a UTF-8 and a broken text."""
    tmp = tmp_path_factory.mktemp("options")
    out = {}
    for act in ("relu", "silu"):
        config = tiny_config("llama", act, hidden_size=64, intermediate_size=96)
        src = write_hf_checkpoint(
            tmp / f"{act}-src", config, random_weights(config), chat_template=TEMPLATE
        )
        out[act] = convert(src, tmp / act, dtype="float32", progress=False)
    out["text"] = tmp / "alice.txt"
    out["text"].write_text("alice said the queen was a cat " * 40)
    out["bad text"] = tmp / "bad.txt"
    out["bad text"].write_bytes(b"alice \xff\xfe said")
    return out


# -- options out of range: the option named, before anything runs --------------------

REFUSED = {  # argv (MODEL, TEXT, BAD are replaced), what the one line says
    "sparsity above 1": (
        ["train-predictor", "MODEL", "--sparsity", "1.5"],
        "argument --sparsity: must be in (0, 1), got 1.5",
    ),
    "negative seed": (
        ["generate", "--model", "MODEL", "-p", "a", "--seed", "-1"],
        "argument --seed: must be >= 0, got -1",
    ),
    "recall and max-loss": (
        ["train-predictor", "MODEL", "--recall", "0.9", "--max-loss", "5%"],
        "argument --max-loss: not allowed with argument --recall",
    ),
    "recall above 1": (
        ["train-predictor", "MODEL", "--recall", "1.5"],
        "argument --recall: must be in (0, 1], got 1.5",
    ),
    "context 0": (
        ["perplexity", "--model", "MODEL", "--text", "TEXT", "--context", "0"],
        "argument --context: must be >= 2, got 0",
    ),
    "max-tokens 0": (
        ["perplexity", "--model", "MODEL", "--text", "TEXT", "--max-tokens", "0"],
        "argument --max-tokens: must be >= 1, got 0",
    ),
    "prefill 0": (
        ["perplexity", "--model", "MODEL", "--text", "TEXT", "--prefill", "0"],
        "argument --prefill: must be >= 1, got 0",
    ),
    "tokens 0": (
        ["train-predictor", "MODEL", "--tokens", "0"],
        "argument --tokens: must be >= 128, got 0",
    ),
    "text not UTF-8 (train)": (
        ["train-predictor", "MODEL", "--text", "BAD"],
        "bad.txt: not valid UTF-8 text (byte 0xff at offset 6)",
    ),
    "text not UTF-8 (perplexity)": (
        ["perplexity", "--model", "MODEL", "--text", "BAD"],
        "bad.txt: not valid UTF-8 text (byte 0xff at offset 6)",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_options_out_of_range_name_the_option(case, layouts, tmp_path, capsys):
    layout = Path(shutil.copytree(layouts["silu"], tmp_path / "layout"))
    before = {p.name: p.read_bytes() for p in layout.iterdir()}
    argv, says = REFUSED[case]
    names = {"MODEL": layout, "TEXT": layouts["text"], "BAD": layouts["bad text"]}
    assert_refused([names.get(a, a) for a in argv], says, capsys)
    assert {p.name: p.read_bytes() for p in layout.iterdir()} == before


def test_the_api_refuses_what_the_cli_refuses(layouts, tmp_path):
    model, tokenizer = load(layouts["relu"])
    with pytest.raises(ValueError, match="max_tokens must be >= 1, got 0"):
        generate(model, tokenizer, "alice", max_tokens=0)
    assert len(list(stream_generate(model, tokenizer, "alice", max_tokens=1))) == 1
    ids = tokenizer.encode("alice said the queen was a cat")
    with pytest.raises(ValueError, match="prefill must be >= 1"):
        perplexity(model, ids, 8, prefill=0)
    layout = Path(shutil.copytree(layouts["silu"], tmp_path / "layout"))
    for kwargs, says in [
        ({"silu_sparsity": 1.5}, r"silu_sparsity must be in \(0, 1\), got 1.5"),
        ({"recall": 0.9, "max_loss": 0.05}, "give recall or max_loss, not both"),
        ({"tokens": 0}, "tokens must be >= 128, got 0"),
    ]:
        with pytest.raises(ValueError, match=says):
            train_predictor(layout, progress=False, **kwargs)


# -- one line: notices come after what can fail ---------------------------------------


def test_an_error_after_the_model_loads_is_the_only_line(layouts, capsys):
    argv = ["generate", "--model", layouts["silu"], *FLASH, "-p", "alice " * 12]
    err = assert_refused([*argv, "--max-context", 10], "exceed the context", capsys)
    assert "sparse FFN" not in err
    status, _, err = run([*argv, "-m", 2], capsys)  # the notice, once, when it runs
    assert status == 0 and err.count("sparse FFN (silu, approximate)") == 1


def test_ctrl_c_ends_the_partial_reply_with_a_newline(layouts, capsys, monkeypatch):
    real = generate_module.stream_generate

    def interrupted(*args, **kwargs):
        for n, response in enumerate(real(*args, **kwargs)):
            if n == 2:
                raise KeyboardInterrupt
            yield response

    monkeypatch.setattr(generate_module, "stream_generate", interrupted)
    argv = ["generate", "--model", layouts["relu"], "-p", "alice", "-m", 8]
    status, out, err = run([*argv, "--ignore-chat-template"], capsys)
    model, tokenizer = load(layouts["relu"])
    two = generate(model, tokenizer, tokenizer.encode("alice"), max_tokens=2)
    assert status == 130 and out == two + "\n"
    assert err == "flashinfer generate: interrupted\n"


# -- the prompt cache and --system-prompt ----------------------------------------------


def test_another_system_prompt_than_the_caches_is_said_not_done(
    layouts, tmp_path, capsys, monkeypatch
):
    layout, file = layouts["relu"], tmp_path / "c.safetensors"
    made = ["--model", layout, "--prompt-cache-file", file]
    status, out, _ = run(
        ["cache-prompt", *made, "--system-prompt", "the queen", "-p", "alice"], capsys
    )
    cached = int(out.split("cached ")[1].split()[0])
    generate_ = ["generate", *made, "-p", " said", "-m", 2, "--stats"]
    says = "was made with system prompt 'the queen': another --system-prompt"
    assert_refused([*generate_, "--system-prompt", "the king"], says, capsys)
    assert_refused([*generate_, "--system-prompt", ""], says, capsys)
    assert_refused([*generate_, "--ignore-chat-template"], "chat template", capsys)
    monkeypatch.setattr("builtins.input", lambda prompt="": "q")
    assert_refused(["chat", *made, "--system-prompt", "the king"], says, capsys)
    for same in ([], ["--system-prompt", "the queen"]):  # the cache is all reused
        status, out, _ = run([*generate_, *same], capsys)
        assert status == 0 and f"({cached} reused from the prompt cache" in out


# -- what is printed -------------------------------------------------------------------


def test_version(capsys):
    status, out, _ = run(["--version"], capsys)
    assert status == 0
    assert out == f"flashinfer {importlib.metadata.version('mlx-flashinfer')}\n"


def subparser(command: str):
    (sub,) = [a for a in build_parser()._actions if a.dest == "command"]
    return sub.choices[command]


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "verify"])
def test_help_shows_the_default_of_max_tokens(command, capsys):
    default = subparser(command).get_default("max_tokens")
    status, out, _ = run([command, "--help"], capsys)
    assert status == 0 and isinstance(default, int)
    assert f"(default {default})" in " ".join(out.split())


def test_help_says_text_is_given_once_per_file(capsys):
    status, out, _ = run(["train-predictor", "--help"], capsys)
    assert status == 0 and "--text FILE" in out
    assert "--text a.txt --text b.txt" in " ".join(out.split())


@pytest.mark.parametrize("tokens,context", [(20, 32), (40, 16)])
def test_perplexity_counts_its_chunks(tokens, context, layouts, capsys):
    model, tokenizer = load(layouts["relu"])
    ids = tokenizer.encode(layouts["text"].read_text())[:tokens]
    chunks = perplexity(model, ids, context)["chunks"]
    assert (chunks == 1) == (tokens <= context)  # both forms are printed below
    argv = ["perplexity", "--model", layouts["relu"], "--text", layouts["text"]]
    status, out, _ = run([*argv, "--max-tokens", tokens, "--context", context], capsys)
    noun = "chunk" if chunks == 1 else "chunks"
    assert status == 0 and f"({chunks} {noun} of {context};" in out


def test_inspect_prints_the_same_bytes_as_the_plan(layouts, capsys):
    status, out, _ = run(["inspect", layouts["silu"], "--budget", "100%"], capsys)
    assert status == 0
    resident = [line.split()[1:3] for line in out.splitlines() if "resident" in line]
    assert len(resident) == 2 and resident[0] == resident[1]
    expected = format_bytes(model_bytes(Layout.open(layouts["silu"]))[0])
    assert " ".join(resident[0]) == expected


def test_a_budget_too_small_is_refused_before_inspect_prints(layouts, capsys):
    status, out, err = run(["inspect", layouts["silu"], "--budget", "1KB"], capsys)
    assert status == 2 and out == "" and err.count("\n") == 1
