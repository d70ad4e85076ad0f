"""Calibration text through the model one layer at a time: what each layer's FFN sees.

Layer-outer order: every calibration sequence passes layer l before layer l+1 starts,
so each layer's FFN is read from the layout once in all, not once per sequence (as
running the sequences as prompts in flash mode would), and memory holds the resident
weights, one layer's FFN and the calibration tokens' residual streams
(tokens x d_model floats). A model that does not fit in memory is calibrated for the
price of reading it once. Each sequence runs as one prompt from position 0, exactly
as a whole forward pass would compute it.

- `calibration_sequences`: text -> token sequences; `split_sequences`: train / tune.
- `domain_sequences`: texts of several domains -> sequences, an equal share each,
  spread over each text; `split_domains`: train / tune within each domain.
- `LayerByLayer`: the model with one layer's FFN in memory, run a layer at a time.
"""

from __future__ import annotations

import numpy as np

from ..flash.memory import format_bytes, model_bytes, parse_budget
from ..formats.layout import Layout
from ..formats.quantize import row_norms
from ..model.backends import get_backend
from ..model.transformer import (
    KVCache,
    Model,
    UncountedFFN,
    ffn_activation,
    ffn_pre_activations,
    prepare_weights,
)

MIN_TOKENS = 128  # below this no layer can be fitted and checked on a held-out split
MIN_DOMAIN_TOKENS = 32  # a domain's text gives at least this many tokens
TUNE_EVERY = 5  # every 5th sequence is tuned on, not trained on: 20%


def calibration_sequences(
    tokenizer, texts: list[str], tokens: int, seq_len: int
) -> list[list[int]]:
    """The first `tokens` tokens of the texts (joined by blank lines), cut into
    sequences of `seq_len` (a last shorter one kept if it has 2 tokens or more);
    shorter sequences when that would give fewer than TUNE_EVERY of them, so that
    one at least is held out to tune on.

    Raises:
        ValueError: the texts give fewer than MIN_TOKENS tokens.
    """
    ids = tokenizer.encode("\n\n".join(texts))[:tokens]
    if len(ids) < MIN_TOKENS:
        raise ValueError(
            f"the text is too short to train on: {len(ids)} tokens, need at least "
            f"{MIN_TOKENS}"
        )
    seq_len = min(seq_len, len(ids) // TUNE_EVERY)
    return [
        ids[s : s + seq_len]
        for s in range(0, len(ids), seq_len)
        if len(ids[s : s + seq_len]) > 1
    ]


def split_sequences(count: int) -> tuple[list[int], list[int]]:
    """Indices of the sequences to train on and to tune thresholds on: every
    TUNE_EVERY-th sequence is tuned on (interleaved, so both splits span the whole
    text), the rest trained on; at least one of each.

    Raises:
        ValueError: fewer than 2 sequences.
    """
    if count < 2:
        raise ValueError(
            f"{count} calibration sequence is too few: need 2 (one to train on, one "
            "to tune on); give more tokens or a shorter sequence length"
        )
    tune = list(range(TUNE_EVERY - 1, count, TUNE_EVERY)) or [count - 1]
    chosen = set(tune)
    return [i for i in range(count) if i not in chosen], tune


def domain_shares(
    tokenizer, domains: dict[str, str], tokens: int, purpose: str = "to train on"
):
    """Each calibration text's token ids and its equal share of `tokens` (all its
    tokens when it has fewer): (name, ids, share) per domain; `purpose` ends the
    error's "too short".

    Raises:
        ValueError: no domain, or a domain's text below MIN_DOMAIN_TOKENS tokens.
    """
    if not domains:
        raise ValueError("no calibration text given")
    share = tokens // len(domains)
    for name, text in domains.items():
        ids = tokenizer.encode(text)
        if len(ids) < MIN_DOMAIN_TOKENS:
            raise ValueError(
                f"the calibration text {name!r} is too short {purpose}: "
                f"{len(ids)} tokens, need at least {MIN_DOMAIN_TOKENS}"
            )
        yield name, ids, min(share, len(ids))


def domain_sequences(
    tokenizer, domains: dict[str, str], tokens: int, seq_len: int
) -> tuple[list[list[int]], list[str]]:
    """Each domain's equal share of `tokens` (all its tokens when it has fewer), as
    sequences of up to `seq_len` spread evenly over its text (so a long document is
    sampled throughout, not only its start); at least TUNE_EVERY sequences per
    domain, shorter ones when needed, so one at least is tuned on.

    Returns:
        The sequences, and each one's domain name.

    Raises:
        ValueError: no domain, a domain's text below MIN_DOMAIN_TOKENS tokens, or
            all of them below MIN_TOKENS.
    """
    sequences, names = [], []
    for name, ids, take in domain_shares(tokenizer, domains, tokens):
        count = min(max(TUNE_EVERY, -(-take // seq_len)), take // 2)
        lengths = [take // count + (i < take % count) for i in range(count)]
        gap = (len(ids) - take) / max(count - 1, 1)  # tokens skipped between two
        start = 0
        for i, length in enumerate(lengths):
            at = start + round(i * gap)
            sequences.append(ids[at : at + length])
            names.append(name)
            start += length
    total = sum(len(s) for s in sequences)
    if total < MIN_TOKENS:
        raise ValueError(
            f"the text is too short to train on: {total} tokens, need at least "
            f"{MIN_TOKENS}"
        )
    return sequences, names


def split_domains(names: list[str]) -> tuple[list[int], list[int]]:
    """`split_sequences` within each domain (every domain is tuned on), given each
    sequence's domain name; returns the indices to train on and to tune on."""
    train, tune = [], []
    for name in dict.fromkeys(names):
        own = [i for i, n in enumerate(names) if n == name]
        fit, tuned = split_sequences(len(own))
        train += [own[i] for i in fit]
        tune += [own[i] for i in tuned]
    return sorted(train), sorted(tune)


class _OneLayerFFN(UncountedFFN):
    """The FFN of the layer `LayerByLayer` holds; hands what it computes to a
    `record` callable when given, skips the neurons `keep` drops when given."""

    def __init__(self, backend, args, resident: dict):
        self.backend, self.args, self.resident = backend, args, resident
        self.parts: list | None = None
        self.record = None  # (h, gate, up, act) as NumPy -> anything, kept in records
        self.records: list = []
        self.keep = None  # h -> (T, n_ffn) bool mask of the neurons kept

    def __call__(self, layer: int, h):
        B, r, args = self.backend, self.resident, self.args
        *inputs, output = self.parts
        rows = [B.rows_weight(p) for p in inputs]
        fc1_bias = r.get(f"layers.{layer}.fc1.bias")
        gate, up = ffn_pre_activations(B, args, h, rows, fc1_bias)
        a = ffn_activation(B, args, gate, up)
        if self.record is not None:
            numpy = [None if v is None else B.to_numpy(v) for v in (h, gate, up, a)]
            self.records.append(self.record(*numpy))
        if self.keep is not None:
            a = a * B.array(self.keep(h).astype(np.float32))
        down = B.columns_weight(output)
        return B.linear(a, down, r.get(f"layers.{layer}.fc2.bias"))

    def gate(self, layer: int, h) -> np.ndarray:
        """The gate (OPT: fc1 plus its bias) pre-activations of h, NumPy (T, n):
        what the gate predictor thresholds."""
        B = self.backend
        bias = self.resident.get(f"layers.{layer}.fc1.bias")
        return B.to_numpy(B.linear(h, B.rows_weight(self.parts[0]), bias))


def through_layer(model: Model, layer: int, streams: list) -> list:
    """Each residual stream (a sequence from position 0) through `layer` of
    `model`, with a KV cache of its own: a calibration runs whole sequences a layer
    at a time."""
    a, B = model.args, model.backend
    out = []
    for x in streams:
        cache = KVCache(B, a.num_key_value_heads, a.head_dim, x.shape[0])
        out.append(model.layer(layer, x, cache, 0))
    return out


class LayerByLayer:
    """The model with one layer's FFN in memory at a time, run on whole sequences
    (each a prompt from position 0), one layer at a time.

    `embed` gives the residual streams of token sequences; `load(i)` reads layer
    i's FFN (and drops the one before); `run(i, streams)` moves streams through
    layer i, optionally recording what its FFN computes or skipping neurons; `head`
    gives logits. Streams are backend arrays, one per sequence.
    """

    def __init__(self, layout: Layout, backend: str | None = None, max_context=None):
        self.layout, self.args = layout, layout.args
        self.B = get_backend(backend)
        resident = prepare_weights(self.B, layout.iter_resident(stored=True))
        self.ffn = _OneLayerFFN(self.B, self.args, resident)
        context = max_context or self.args.max_position_embeddings
        self.model = Model(self.args, self.B, resident, self.ffn, context)
        self.down_norms: np.ndarray | None = None
        self.stored: list | None = None

    def embed(self, sequences: list[list[int]]) -> list:
        return [self.model.embed(seq, 0) for seq in sequences]

    def load(self, layer: int) -> None:
        """Read `layer`'s FFN from the layout (held as stored, as decoding holds
        it; `stored`: the parts as read); `down_norms` are its down (fc2) columns'
        lengths."""
        self.ffn.parts = self.stored = None  # the layer before goes first
        parts = self.layout.read_parts(layer)  # each (n_ffn, d_model), as stored
        self.stored = parts  # NumPy, for what is built from the rows (lowbit.py)
        self.ffn.parts = [self.B.weight(p) for p in parts]
        self.down_norms = row_norms(parts[-1], self.layout.dtype)

    def run(self, layer: int, streams: list, keep=None, record=None):
        """Streams through `layer` (loaded).

        Args:
            keep: h -> (T, n_ffn) bool mask of the neurons each token keeps (the
                others are skipped).
            record: (h, gate, up, act) -> anything, called per stream with the
                FFN's input, pre-activations (gate: OPT's fc1 plus its bias; up:
                None for OPT) and activations, float32 NumPy (T, ...).

        Returns:
            The streams leaving the layer; with `record`, also the list of what it
            returned, one per stream.
        """
        self.ffn.keep, self.ffn.record, self.ffn.records = keep, record, []
        out = through_layer(self.model, layer, streams)
        records = self.ffn.records
        self.ffn.keep, self.ffn.record, self.ffn.records = None, None, []
        return out if record is None else (out, records)

    def head(self, x) -> np.ndarray:
        """float32 logits (T, vocab) of a stream leaving the last layer."""
        return self.B.to_numpy(self.model.head(x))


def calibration_bytes(
    layout: Layout, tokens: int, tune_tokens: int, seq_len: int, predictor: int = 0
) -> int:
    """DRAM that a calibration holds at most (weights and activations; the
    interpreter and libraries aside, as in the flash memory plan): resident weights,
    one layer's FFN as stored; per token its residual stream, FFN input and target
    set (float32, float32, bool per neuron); per tune token the gate pre-activations
    and activations (float32), all twice over while a layer's are assembled; a
    sequence's logits (float32, twice: scoring them); and `predictor`, the bytes of
    the predictor being made (all layers' are kept until it is stored)."""
    args = layout.args
    d, n = args.hidden_size, args.intermediate_size
    resident, _ = model_bytes(layout)
    layer = max(e.neurons for e in layout.layers) * layout.bundle_bytes
    activations = 2 * (tokens * (8 * d + n) + tune_tokens * 8 * n)
    logits = 2 * seq_len * args.vocab_size * 4
    return resident + layer + activations + logits + predictor


def check_calibration_budget(
    layout: Layout,
    tokens: int,
    tune_tokens: int,
    seq_len: int,
    memory_budget,
    predictor: int = 0,
) -> None:
    """Refuse a calibration that would hold more than `memory_budget` (bytes,
    "1.5GB" or "50%" of the weights as stored); `predictor` as for
    `calibration_bytes`.

    Raises:
        ValueError: naming what it holds and the budget.
    """
    resident, ffn = model_bytes(layout)
    budget = parse_budget(memory_budget, resident + ffn)
    needed = calibration_bytes(layout, tokens, tune_tokens, seq_len, predictor)
    if needed > budget:
        raise ValueError(
            f"calibrating on {tokens} tokens holds {format_bytes(needed)} (resident "
            "weights, one FFN layer, the tokens' activations"
            + (", the predictor" if predictor else "")
            + f"): more than the budget of {format_bytes(budget)}; give fewer tokens"
            + (
                f", or make a smaller predictor (this one holds "
                f"{format_bytes(predictor)}; --kind lowrank is smaller)"
                if predictor
                else ""
            )
        )
