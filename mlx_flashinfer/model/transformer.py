"""The transformer, written once against the Backend API, for both families.

`Model(tokens, cache)` runs a prompt chunk or one decode step; the FFN is a pluggable
object (`DenseFFN` here; the flash FFN streams neurons from disk) so the token path
below is the same whether weights are in memory or on flash.
"""

from __future__ import annotations

import numpy as np

from ..formats.args import ModelArgs
from ..formats.families import longrope
from ..formats.quantize import Quantized, dequantize
from ..formats.safetensors_stream import decode

PREFILL_CHUNK = (
    512  # long prompts run in chunks: attention scores stay (chunk x context)
)


class KVCache:
    """Keys and values of one layer: (kv_heads, capacity, head_dim), grown in steps."""

    step = 256

    def __init__(self, backend, kv_heads: int, head_dim: int, max_context: int):
        self.backend = backend
        self.shape = (kv_heads, 0, head_dim)
        self.max_context = max_context
        self.keys = self.values = None
        self.offset = 0

    def update_and_fetch(self, keys, values):
        """Append (kv_heads, T, head_dim) keys/values; return all of them so far."""
        end = self.offset + keys.shape[1]
        if self.keys is None or end > self.keys.shape[1]:
            capacity = min(-(-end // self.step) * self.step, max(self.max_context, end))
            grown_k = self.backend.zeros((self.shape[0], capacity, self.shape[2]))
            grown_v = self.backend.zeros((self.shape[0], capacity, self.shape[2]))
            if self.offset:
                grown_k[:, : self.offset] = self.keys[:, : self.offset]
                grown_v[:, : self.offset] = self.values[:, : self.offset]
            self.keys, self.values = grown_k, grown_v
        self.keys[:, self.offset : end] = keys
        self.values[:, self.offset : end] = values
        self.offset = end
        return self.keys[:, :end], self.values[:, :end]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else 2 * int(np.prod(self.keys.shape)) * 4


def kv_cache_bytes(args: ModelArgs, context: int) -> int:
    """float32 keys + values of every layer at `context` tokens (for memory
    planning)."""
    return (
        2
        * 4
        * args.num_hidden_layers
        * args.num_key_value_heads
        * args.head_dim
        * context
    )


def silu_magnitude(gate: np.ndarray) -> np.ndarray:
    """|silu(gate)| of NumPy pre-activations: what CATS thresholds, and with |up|
    the size of a SiLU neuron's activation."""
    return np.abs(gate * (0.5 + 0.5 * np.tanh(0.5 * gate)))


def gate_magnitude(act: str, gate: np.ndarray) -> np.ndarray:
    """|act(gate)| of NumPy pre-activations for a smooth gated activation `act`
    (silu, or Gemma's GeGLU gelu_tanh): what the gate predictor thresholds and, with
    |up|, the size of a neuron's activation."""
    if act == "gelu_tanh":
        return np.abs(gelu_tanh_numpy(gate))
    return silu_magnitude(gate)


def gelu_tanh_numpy(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (PyTorch's approximate="tanh"), float32."""
    x = np.asarray(x, dtype=np.float32)
    inner = np.float32(np.sqrt(2 / np.pi)) * (x + np.float32(0.044715) * x * x * x)
    return np.float32(0.5) * x * (1 + np.tanh(inner))


def ffn_activation(backend, args: ModelArgs, gate, up=None):
    """The activations that multiply the down (OPT: fc2) columns, from the gate (OPT:
    fc1 plus its bias) and up pre-activations, each (T, n)."""
    B = backend
    if args.family == "opt":
        return B.relu(gate)
    act = args.hidden_act
    if act == "silu":
        return B.silu(gate) * up
    if act == "gelu_tanh":  # GeGLU (Gemma)
        return B.gelu_tanh(gate) * up
    if act == "relu":
        return B.relu(gate) * up
    if act == "fatrelu":
        return B.above(gate, args.activation_threshold) * up
    if act == "relu2":
        r = B.relu(gate)
        return r * r * up
    return B.relu(gate) * B.relu(up)  # drelu: ReLU on both branches (TurboSparse)


def ffn_pre_activations(backend, args: ModelArgs, h, parts, fc1_bias=None):
    """gate (OPT: fc1 plus its bias) and up (OPT: None) pre-activations of h, (T, n)
    each, over the gate/up rows of `parts` (as for `ffn_forward`)."""
    gate = backend.linear(h, parts[0], fc1_bias)
    up = None if args.family == "opt" else backend.linear(h, parts[1])
    return gate, up


def ffn_forward(backend, args: ModelArgs, h, parts, fc1_bias=None, fc2_bias=None):
    """The FFN over a set of neurons given as `linear` weights.

    Llama family: parts = (gate (n, d), up (n, d), down (d, n)); OPT: (fc1, fc2);
    down (fc2) is the `columns_weight` view of (n, d) columns.
    A neuron whose activation is zero adds exactly zero, so running over any superset of
    the active neurons gives the dense result for ReLU-family models (paper section
    3.1).
    """
    gate, up = ffn_pre_activations(backend, args, h, parts, fc1_bias)
    a = ffn_activation(backend, args, gate, up)
    return backend.linear(a, parts[-1], fc2_bias)


class UncountedFFN:
    """The hooks Model calls on its FFN (the flash FFN counts reads per token with
    them), for an FFN whose weights are all in memory: nothing to count."""

    def new_sequence(self) -> None:
        pass

    def begin_token(self) -> None:
        pass

    def end_token(self, logits, prompt_tokens: int) -> None:
        pass

    def io_stats(self) -> dict:
        return {"bytes_read": 0, "reads": 0, "tokens": 0}


class DenseFFN(UncountedFFN):
    """Every FFN weight in memory: the reference the sparse path is proved against.

    Held as stored (or widened to float32 with `widen`, the reference that 16-bit
    compute is measured against); gate/up (OPT: fc1) rows and down (fc2) columns
    are each (n_ffn, d_model), as in the bundles and the neuron cache."""

    def __init__(self, backend, layout, resident: dict, widen: bool = False):
        self.backend = backend
        self.args = layout.args
        self.layers = []
        for i in range(self.args.num_hidden_layers):
            parts = layout.read_parts(i)  # each (n_ffn, d_model)
            if widen:
                parts = [_widened(p, layout.dtype) for p in parts]
            self.layers.append([backend.weight(p) for p in parts])
        self.fc1_bias = [
            resident.get(f"layers.{i}.fc1.bias")
            for i in range(self.args.num_hidden_layers)
        ]
        self.fc2_bias = [
            resident.get(f"layers.{i}.fc2.bias")
            for i in range(self.args.num_hidden_layers)
        ]

    def held_bytes(self) -> dict:
        return {"ffn": sum(int(w.nbytes) for parts in self.layers for w in parts)}

    def __call__(self, layer: int, h):
        B = self.backend
        *inputs, output = self.layers[layer]
        parts = [B.rows_weight(r) for r in inputs] + [B.columns_weight(output)]
        return ffn_forward(
            B, self.args, h, parts, self.fc1_bias[layer], self.fc2_bias[layer]
        )


def _widened(part, dtype: str) -> np.ndarray:
    """Stored values (or a NumPy `Quantized`) as float32."""
    if isinstance(part, Quantized):
        q = part
        return dequantize(q.packed, q.scales, q.biases, q.bits, q.group_size)
    return decode(part, dtype).astype(np.float32)


def prepare_weights(backend, resident) -> dict:
    """Resident NumPy tensors (a dict, or (name, array) pairs from
    `Layout.iter_resident`, which never holds them all twice) -> backend arrays:
    matrices through `backend.weight`, held as given (stored form, or float32);
    vectors (norms, biases: always float32) as plain arrays."""
    return {
        name: backend.weight(value)
        if isinstance(value, Quantized) or value.ndim == 2
        else backend.array(value)
        for name, value in (
            resident.items() if isinstance(resident, dict) else resident
        )
    }


class Model:
    """One transformer for both families over a backend's arrays.

    Args:
        args: the model's shape.
        backend: a Backend API module (`fallback_numpy.backend`,
            `mlx_flashinfer.model.mlx_backend`).
        weights: resident tensors by canonical name, from `prepare_weights`.
        ffn: callable (layer, h) -> FFN output, e.g. `DenseFFN`.
        max_context: tokens the KV cache may hold.
    """

    def __init__(self, args: ModelArgs, backend, weights: dict, ffn, max_context: int):
        self.args = args
        self.backend = backend
        self.w = weights
        self.ffn = ffn
        self.max_context = max_context
        # what a saved prompt cache is checked against (`load` sets the layout's)
        self.weights_id: str | None = None
        # the prompt cache the flash windows follow (prompt_cache.py)
        self.sequence_owner: int | None = None
        self.scale = (args.query_pre_attn_scalar or args.head_dim) ** -0.5
        rotated = int(args.head_dim * args.partial_rotary_factor)
        inv_freq = args.rope_theta ** (-np.arange(0, rotated, 2) / rotated)
        if "rope_freqs" in weights:
            inv_freq = inv_freq / backend.to_numpy(weights["rope_freqs"])
        self.rope_gain = None  # LongRoPE: the rotated dims of q and k times a factor
        if long := longrope(args, max_context):
            inv_freq = inv_freq / long[0]
            gain = np.ones(args.head_dim, dtype=np.float32)
            gain[:rotated] = long[1]
            self.rope_gain = backend.array(gain)
        self.inv_freq = inv_freq.astype(np.float32)
        # per layer (by its tensors' prefix): the keys a sliding layer sees, and its
        # RoPE (Gemma 3's sliding layers rotate with their own base, never scaled)
        local_inv_freq = self.inv_freq
        if args.rope_local_theta:
            steps = np.arange(0, args.head_dim, 2) / args.head_dim
            local_inv_freq = (args.rope_local_theta**-steps).astype(np.float32)
        layers = range(args.num_hidden_layers)
        sliding = {f"layers.{i}.": args.is_sliding(i) for i in layers}
        self.window = {
            p: args.sliding_window if s else None for p, s in sliding.items()
        }
        self.rope_freqs = {
            p: local_inv_freq if s else self.inv_freq for p, s in sliding.items()
        }

    def make_cache(self) -> list[KVCache]:
        """A fresh KV cache (and, on flash, fresh neuron windows) for a new sequence."""
        a = self.args
        self.ffn.new_sequence()
        self.sequence_owner = None
        return [
            KVCache(self.backend, a.num_key_value_heads, a.head_dim, self.max_context)
            for _ in range(a.num_hidden_layers)
        ]

    def __call__(self, tokens: list[int], cache: list[KVCache], *, last_only=False):
        """Logits (T, vocab) of `tokens`, which continue the sequence held in
        `cache`; `last_only`: (1, vocab), of the last token alone (a prompt's next
        token needs no others: the head is a large product, 21% of the default
        model's weights and a tenth of Qwen3-30B-A3B's active ones)."""
        offset = cache[0].offset
        if offset + len(tokens) > self.max_context:
            raise ValueError(
                f"context full: {offset + len(tokens)} tokens exceed the maximum of "
                f"{self.max_context}"
            )
        self.ffn.begin_token()
        x = self.embed(tokens, offset)
        for i in range(self.args.num_hidden_layers):
            x = self.layer(i, x, cache[i], offset)
        logits = self.head(x[-1:] if last_only else x)
        self.ffn.end_token(logits, len(tokens))
        return logits

    def embed(self, tokens: list[int], offset: int):
        """The residual stream (T, d_model) entering the first layer."""
        B, w, a = self.backend, self.w, self.args
        x = B.weight_rows(w["embed_tokens.weight"], tokens)
        if a.embed_scale != 1.0:  # Gemma
            x = x * a.embed_scale
        if a.family == "opt":
            if a.word_embed_proj_dim:
                x = B.linear(x, w["project_in.weight"])
            positions = (
                np.arange(offset, offset + len(tokens)) + 2
            )  # OPT's learned offset
            x = x + B.weight_rows(w["embed_positions.weight"], positions)
        return x

    def head(self, x):
        """Logits (T, vocab) of the residual stream leaving the last layer."""
        B, w, a = self.backend, self.w, self.args
        if a.family == "llama":
            x = B.rms_norm(x, w["norm.weight"], a.norm_eps)
        else:
            if a.do_layer_norm_before:
                x = B.layer_norm(
                    x, w["final_layer_norm.weight"], w["final_layer_norm.bias"], 1e-5
                )
            if a.word_embed_proj_dim:
                x = B.linear(x, w["project_out.weight"])
        head = (
            w["embed_tokens.weight"] if a.tie_word_embeddings else w["lm_head.weight"]
        )
        logits = B.linear(x, head)
        cap = a.final_logit_softcapping
        return logits if not cap else B.tanh(logits * (1 / cap)) * cap

    def layer(self, i: int, x, cache: KVCache, offset: int):
        """Layer i on the residual stream x (T, d_model) of positions offset, ..."""
        B, w, a, p = self.backend, self.w, self.args, f"layers.{i}."
        if a.sandwich_norms:  # Gemma: each block's output normed too
            return self._sandwich_layer(i, x, cache, offset)
        if a.family == "llama":
            h = B.rms_norm(x, w[p + "input_layernorm.weight"], a.norm_eps)
            x = x + self._attention(p, h, cache, offset)
            h = B.rms_norm(x, w[p + "post_attention_layernorm.weight"], a.norm_eps)
            return x + self.ffn(i, h)
        # OPT: LayerNorm before the block (most sizes) or after it (opt-350m)
        pre = a.do_layer_norm_before
        ln1 = (
            w[p + "self_attn_layer_norm.weight"],
            w[p + "self_attn_layer_norm.bias"],
            1e-5,
        )
        ln2 = (w[p + "final_layer_norm.weight"], w[p + "final_layer_norm.bias"], 1e-5)
        h = B.layer_norm(x, *ln1) if pre else x
        x = x + self._attention(p, h, cache, offset)
        if not pre:
            x = B.layer_norm(x, *ln1)
        h = B.layer_norm(x, *ln2) if pre else x
        x = x + self.ffn(i, h)
        return x if pre else B.layer_norm(x, *ln2)

    def _sandwich_layer(self, i: int, x, cache: KVCache, offset: int):
        """Gemma 2/3: RMSNorm before and after attention and before and after the
        FFN (post_attention_layernorm norms the attention's output, not the FFN's
        input as in Llama)."""
        B, w, a, p = self.backend, self.w, self.args, f"layers.{i}."

        def norm(y, name):
            return B.rms_norm(y, w[p + name + ".weight"], a.norm_eps)

        h = norm(x, "input_layernorm")
        x = x + norm(self._attention(p, h, cache, offset), "post_attention_layernorm")
        h = norm(x, "pre_feedforward_layernorm")
        return x + norm(self.ffn(i, h), "post_feedforward_layernorm")

    def _attention(self, p: str, h, cache: KVCache, offset: int):
        B, w, a = self.backend, self.w, self.args
        t, hd = h.shape[0], a.head_dim
        out_name = "self_attn.o_proj" if a.family == "llama" else "self_attn.out_proj"

        def project(name, heads):
            y = B.linear(
                h, w[f"{p}self_attn.{name}.weight"], w.get(f"{p}self_attn.{name}.bias")
            )
            # RMSNorm of queries and keys where the checkpoint has one (before
            # RoPE): over all heads (OLMoE) or each head's (Qwen3, Gemma 3)
            norm = w.get(f"{p}self_attn.{name[0]}_norm.weight")
            if norm is not None and norm.shape[0] != hd:
                y = B.rms_norm(y, norm, a.norm_eps)
            y = y.reshape(t, heads, hd).transpose(1, 0, 2)  # (heads, T, hd)
            if norm is not None and norm.shape[0] == hd:
                y = B.rms_norm(y, norm, a.norm_eps)
            return y

        q = project("q_proj", a.num_attention_heads)
        k = project("k_proj", a.num_key_value_heads)
        v = project("v_proj", a.num_key_value_heads)
        if a.family == "llama":
            q = B.rope(q, offset, self.rope_freqs[p])
            k = B.rope(k, offset, self.rope_freqs[p])
            if self.rope_gain is not None:
                q, k = q * self.rope_gain, k * self.rope_gain
        keys, values = cache.update_and_fetch(k, v)
        out = B.attention(
            q,
            keys,
            values,
            self.scale,
            offset,
            softcap=a.attn_logit_softcapping,
            window=self.window[p],
        )
        out = out.transpose(1, 0, 2).reshape(t, a.num_attention_heads * hd)
        return B.linear(out, w[p + out_name + ".weight"], w.get(p + out_name + ".bias"))

    def check_tokens(self, token_ids) -> list[int]:
        """Validate token ids (non-empty, in range, within the context) and return a
        list.

        Raises:
            ValueError: naming the bad input.
        """
        if isinstance(token_ids, str | bytes | bytearray):  # would pass as ints
            raise ValueError(
                f"token ids must be integers, not {type(token_ids).__name__}: "
                "encode text with tokenizer.encode"
            )
        ids = list(token_ids)
        odd = [
            t for t in ids if isinstance(t, bool) or not isinstance(t, int | np.integer)
        ]
        if odd:
            raise ValueError(f"token id {odd[0]!r} is not an integer")
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("no tokens: the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.args.vocab_size]
        if bad:
            raise ValueError(
                f"token id {bad[0]} out of range: the vocabulary has "
                f"{self.args.vocab_size}"
            )
        limit = self.args.max_position_embeddings
        if len(ids) > self.max_context and self.max_context < limit:
            raise ValueError(
                f"{len(ids)} tokens exceed the context of {self.max_context} chosen "
                f"for the KV cache; the model allows {limit}: raise --max-context "
                f"(max_context=) up to {limit}"
            )
        if len(ids) > self.max_context:
            raise ValueError(
                f"{len(ids)} tokens exceed the model's context of {self.max_context}"
            )
        return ids

    def prefill(self, ids: list[int], cache: list[KVCache]):
        """Run a prompt in chunks; return the logits (1, vocab) of its last token
        (backend array)."""
        for start in range(0, len(ids), PREFILL_CHUNK):
            out = self(ids[start : start + PREFILL_CHUNK], cache, last_only=True)
        return out

    def logits(self, token_ids, prefill: int | None = None) -> np.ndarray:
        """float32 logits (len(token_ids), vocab) from a fresh cache.

        The first `prefill` tokens (default: all) run as a prompt; every later token
        runs as its own decode step, so on flash the sparse path is what gets scored.
        """
        ids = self.check_tokens(token_ids)
        prefill = len(ids) if prefill is None else prefill
        if not 1 <= prefill <= len(ids):
            raise ValueError(f"prefill {prefill} out of range: 1..{len(ids)}")
        cache = self.make_cache()
        chunks = [
            self.backend.to_numpy(
                self(ids[start : min(start + PREFILL_CHUNK, prefill)], cache)
            )
            for start in range(0, prefill, PREFILL_CHUNK)
        ]
        chunks += [self.backend.to_numpy(self([t], cache)) for t in ids[prefill:]]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def io_stats(self) -> dict:
        """Flash I/O running totals (bytes_read, reads, ...); zeros when dense."""
        return self.ffn.io_stats()

    def held_bytes(self) -> dict:
        """Bytes of the weight arrays the model holds, by part of the memory plan
        ("resident", then the FFN's: "ffn" when dense; "predictor", "neuron cache",
        "scratch", "read buffer" on flash). The KV cache comes with `make_cache`."""
        resident = sum(int(w.nbytes) for w in self.w.values())
        return {"resident": resident, **self.ffn.held_bytes()}
