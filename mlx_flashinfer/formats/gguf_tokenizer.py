"""Rebuild a Hugging Face ``tokenizer.json`` from the tokenizer stored in GGUF metadata.

A GGUF file carries its vocabulary as metadata (llama.cpp key names) but no
``tokenizer.json``; this module turns that metadata back into a ``tokenizers``
tokenizer so a converted model runs without its source checkpoint.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
)

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPIECE_UNDERLINE = "\u2581"

# llama.cpp rewrites the (?i:...) contractions of the original tokenizer.json
# regexes as explicit case classes; we keep its spelling so both split alike.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3_SPLIT = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> pre-tokenizer family, grouped as in llama-vocab.cpp.
_GPT2_NAMES = (
    "default gpt-2 gpt2 phi-2 mpt olmo jais jina-es jina-de jina-v1-en jina-v2-es "
    "jina-v2-de jina-v2-code roberta-bpe gigachat a.x-4.0 mellum modern-bert exaone4 "
    "trillion granite-docling"
)
_DIGITS_NAMES = "smollm starcoder refact command-r codeshell exaone minerva-7b mellum2"
# llama.cpp sets ignore_merges (whole-word vocab lookup first) for these only.
_IGNORE_MERGES_NAMES = (
    "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano"
)
_LLAMA3_NAMES = _IGNORE_MERGES_NAMES + " dbrx smaug-bpe glm4 chatglm-bpe"
_QWEN2_NAMES = (
    "qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open"
)
_PRE_FAMILY = {
    **dict.fromkeys(_GPT2_NAMES.split(), "gpt2"),
    **dict.fromkeys(_DIGITS_NAMES.split(), "digits"),
    **dict.fromkeys(_LLAMA3_NAMES.split(), "llama3"),
    **dict.fromkeys(_QWEN2_NAMES.split(), "qwen2"),
}
_IGNORE_MERGES = frozenset(_IGNORE_MERGES_NAMES.split())


def tokenizer_json_from_gguf(meta: dict) -> str:
    """Return the text of a tokenizer.json rebuilt from GGUF tokenizer metadata.

    Raises ValueError (message naming the unsupported value and what is
    supported) for an unsupported tokenizer.ggml.model.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(meta)
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(meta)
    else:
        raise ValueError(
            f"unsupported tokenizer.ggml.model {kind!r}: supported are 'gpt2' "
            "(byte-level BPE) and 'llama' (SentencePiece with byte fallback)"
        )
    _add_special_tokens(tokenizer, meta)
    return tokenizer.to_str()


def _byte_level_bpe(meta: dict) -> Tokenizer:
    """GPT-2 style byte-level BPE with the pre-tokenizer named by tokenizer.ggml.pre."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    pre = meta.get("tokenizer.ggml.pre", "default")
    family = _PRE_FAMILY.get(pre)
    if family is None:
        warnings.warn(
            f"unknown tokenizer.ggml.pre {pre!r}; falling back to the GPT-2 ByteLevel "
            "pre-tokenizer, tokenization may differ from llama.cpp",
            stacklevel=3,
        )
        family = "gpt2"
    merges = [_split_merge(m) for m in meta.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(
        models.BPE(
            {t: i for i, t in enumerate(tokens)},
            merges,
            ignore_merges=pre in _IGNORE_MERGES,
        )
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if family == "digits":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif family in ("llama3", "qwen2"):
        split = _LLAMA3_SPLIT if family == "llama3" else _QWEN2_SPLIT
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _split_merge(merge: str) -> tuple[str, str]:
    """Split "left right" at the first space after the first character, as llama.cpp."""
    cut = merge.index(" ", 1)
    return merge[:cut], merge[cut + 1 :]


def _sentencepiece_bpe(meta: dict) -> Tokenizer:
    """SentencePiece-style BPE with byte fallback, merges recovered from scores."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    model = models.BPE(
        {t: i for i, t in enumerate(tokens)},
        _merges_from_scores(tokens, scores, types),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(model)
    escape = normalizers.Replace(" ", SPIECE_UNDERLINE)
    steps: list = [
        decoders.Replace(SPIECE_UNDERLINE, " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
    ]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        # A normalizer (not Metaspace) prefixes every text segment, including the
        # ones after special tokens, which is what llama.cpp does.
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend(SPIECE_UNDERLINE), escape]
        )
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    else:
        tokenizer.normalizer = escape
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _merges_from_scores(
    tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]
) -> list[tuple[str, str]]:
    """BPE merges equivalent to llama.cpp's SentencePiece tokenizer.

    llama.cpp repeatedly joins the adjacent pair whose concatenation is the
    highest-scoring vocabulary piece, so every split of a piece into two pieces
    is a merge ranked by the joined piece's score (ties: lower ids first).
    """
    mergeable = {
        t: i
        for i, (t, ty) in enumerate(zip(tokens, types, strict=False))
        if ty in (NORMAL, USER_DEFINED, UNUSED)
    }
    ranked = []
    for piece, pid in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[pid], pid, mergeable[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_special_tokens(tokenizer: Tokenizer, meta: dict) -> None:
    """Register control/unknown (special) and user-defined tokens as added tokens.

    Added tokens are matched whole before pre-tokenization, as llama.cpp does for
    these token types. Files without token types fall back to the bos/eos/unk ids.
    """
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        keys = ("bos_token_id", "eos_token_id", "unknown_token_id")
        ids = {meta.get(f"tokenizer.ggml.{k}") for k in keys} - {None}
        types = [CONTROL if i in ids else NORMAL for i in range(len(tokens))]
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types, strict=False)
        if ty in (CONTROL, UNKNOWN)
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types, strict=False)
        if ty == USER_DEFINED
    ]
    if special:
        tokenizer.add_special_tokens(special)
    if user:
        tokenizer.add_tokens(user)
