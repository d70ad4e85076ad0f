"""A GGUF of a synthetic mixture of experts (synth_moe.py), for llama.cpp's row of
benchmarks/moe_speed.py: the same model as a layout written by `tools/synth.py`,
rebuilt from the source identity its manifest records (shape, seed, skew).

Written as llama.cpp's converter (convert_hf_to_gguf.py) writes Mixtral: the "llama"
architecture with `expert_count` and `expert_used_count`, q/k rows permuted for its
interleaved RoPE, the router `ffn_gate_inp` kept float32 (as llama.cpp's quantizer
keeps it), each layer's experts stacked as `ffn_{gate,up,down}_exps`
[experts, rows, cols]. The tensor types follow the layout's dtype: float16 -> F16,
float32 -> F32, bfloat16 -> BF16; q4/q8 -> Q4_0/Q8_0 expert stacks (a part the
layout keeps at 8 bits, as q4's down columns, is Q8_0; a stack whose rows are not
whole 32-value blocks F16) with every other matrix F16 (not the layout's own
quantization: llama.cpp's blocks are symmetric, of 32). Norms are F32.
The vocabulary is a "llama" SentencePiece one of placeholder pieces: the benchmark
feeds token ids, never text.

Tensor data streams: one tensor at a time, a stack filled expert by expert in its
stored type, so the peak is about one stack (Qwen3-30B-A3B's shape at F16: 400 MB).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..formats.experts import expert_parts, router_name
from ..formats.layout import Layout
from .synth_moe import MOE_SHAPES, SyntheticMoE

# a layout's float dtype -> the GGML type of its GGUF's matrices
FLOAT_TYPES = {"float16": "F16", "float32": "F32", "bfloat16": "BF16"}
# a quantized part's bits -> the GGML type of its expert stack
BLOCK_TYPES = {4: "Q4_0", 8: "Q8_0"}
STACKS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")  # the bundle's parts
LAYER_NAMES = {  # the layer's tensors but its experts: GGUF name -> source name
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """q/k rows as llama.cpp's converter stores them for its interleaved RoPE: each
    head's two halves interleaved."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def synthetic_source(layout: Layout) -> SyntheticMoE:
    """The synthetic MoE a layout was written from (its manifest's "source").

    Raises:
        ValueError: the layout was not written by `tools/synth.py` from a synthetic
            MoE, or its model differs from the one its identity rebuilds.
    """
    identity = layout.manifest.get("source") or {}
    if identity.get("kind") != SyntheticMoE.kind or not layout.args.is_moe:
        raise ValueError(
            f"{layout.path}: not a synthetic mixture of experts (its source is "
            f"{identity.get('kind', 'unrecorded')}); write one with "
            "`python tools/synth.py DST --shape moe-small`"
        )
    args = layout.args
    # a named shape, or the sizes of a custom one (recorded since custom shapes
    # took --layers; older layouts: rebuilt from their model args)
    shape = identity.get("sizes") or identity["shape"]
    if not isinstance(shape, dict) and shape not in MOE_SHAPES:
        shape = {
            "hidden_size": args.hidden_size,
            "intermediate_size": args.intermediate_size,
            "num_hidden_layers": args.num_hidden_layers,
            "num_attention_heads": args.num_attention_heads,
            "num_key_value_heads": args.num_key_value_heads,
            "num_local_experts": args.num_experts,
            "num_experts_per_tok": args.experts_per_token,
            "vocab_size": args.vocab_size,
        }
    source = SyntheticMoE(shape, identity["seed"], identity["skew"])
    if source.args.to_dict() != args.to_dict():
        raise ValueError(
            f"{layout.path}: its model args differ from those of the synthetic "
            f"{identity['shape']} they record (were the shapes edited since?)"
        )
    return source


def tensor_plan(layout: Layout, source: SyntheticMoE) -> list[tuple]:
    """Every GGUF tensor in file order: (name, numpy shape, GGML type name, source
    names: one for a matrix or a norm, each expert's for a stack)."""
    import gguf

    args = layout.args
    float_type = FLOAT_TYPES.get(layout.dtype, "F16")
    bits = (layout.quantization or {}).get("part_bits")

    def stack_type(part: int, cols: int) -> str:
        if bits is None:
            return float_type
        kind = BLOCK_TYPES.get(bits[part], "F16")
        block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
        return kind if cols % block == 0 else "F16"

    def matrix(name: str, gguf_name: str) -> tuple:
        shape = source.shapes[name]
        return (gguf_name, shape, "F32" if len(shape) == 1 else float_type, [name])

    plan = [matrix("embed_tokens.weight", "token_embd.weight")]
    for i in range(args.num_hidden_layers):
        blk = f"blk.{i}."
        plan += [matrix(f"layers.{i}.{s}", blk + g) for g, s in LAYER_NAMES.items()]
        router = router_name(args, i)
        plan.append(
            (blk + "ffn_gate_inp.weight", source.shapes[router], "F32", [router])
        )
        experts = [expert_parts(args, i, e) for e in range(args.num_experts)]
        for part, stack in enumerate(STACKS):
            names = [parts[part][0] for parts in experts]
            shape = (args.num_experts, *source.shapes[names[0]])
            kind = stack_type(part, shape[-1])
            plan.append((blk + stack + ".weight", shape, kind, names))
    plan.append(matrix("norm.weight", "output_norm.weight"))
    plan.append(matrix("lm_head.weight", "output.weight"))
    return plan


def write_metadata(writer, args, vocab_size: int) -> None:
    """A Mixtral's hyperparameters and a placeholder "llama" tokenizer."""
    writer.add_block_count(args.num_hidden_layers)
    writer.add_context_length(args.max_position_embeddings)
    writer.add_embedding_length(args.hidden_size)
    writer.add_feed_forward_length(args.intermediate_size)
    writer.add_head_count(args.num_attention_heads)
    writer.add_head_count_kv(args.num_key_value_heads)
    writer.add_key_length(args.head_dim)  # Qwen3's 128 is not d_model / heads
    writer.add_value_length(args.head_dim)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_vocab_size(vocab_size)
    writer.add_expert_count(args.num_experts)
    writer.add_expert_used_count(args.experts_per_token)
    tokens = ["<unk>", "<s>", "</s>"]
    tokens += [f"\u2581t{i}" for i in range(vocab_size - len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))  # unk, control
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def _encoded(values: np.ndarray, kind: str) -> np.ndarray:
    """float32 values as stored in a GGUF tensor of type `kind` (blocks: bytes)."""
    import gguf

    if kind == "F32":
        return np.ascontiguousarray(values, dtype=np.float32)
    if kind == "F16":
        return values.astype(np.float16)
    return gguf.quants.quantize(values, gguf.GGMLQuantizationType[kind])


def _tensor_data(source: SyntheticMoE, args, name: str, kind: str, names: list):
    """A planned tensor's stored array (a stack filled expert by expert)."""
    if len(names) > 1:
        first = _encoded(source.tensor(names[0]), kind)
        stack = np.empty((len(names), *first.shape), first.dtype)
        stack[0] = first
        for e, expert in enumerate(names[1:], 1):
            stack[e] = _encoded(source.tensor(expert), kind)
        return stack
    values = source.tensor(names[0])
    if name.endswith("attn_q.weight"):
        values = llama_cpp_permute(values, args.num_attention_heads)
    elif name.endswith("attn_k.weight"):
        values = llama_cpp_permute(values, args.num_key_value_heads)
    return _encoded(values, kind)


def write_synthetic_gguf(
    layout_path, dst, *, force: bool = False, progress: bool = False
) -> Path:
    """Write the GGUF of the synthetic MoE the layout at `layout_path` holds.

    Args:
        layout_path: a layout written by `tools/synth.py` (an MoE shape).
        dst: the GGUF file to write (written as DST.partial, renamed when whole).
        force: replace an existing `dst`.
        progress: show a progress bar of bytes written.

    Returns:
        `dst` as a Path.

    Raises:
        ValueError: not a synthetic MoE layout; FileExistsError: `dst` exists and not
            `force`; FileNotFoundError: no layout, or `dst`'s folder is missing.
    """
    import gguf

    layout = Layout.open(layout_path)
    source = synthetic_source(layout)
    dst = Path(dst)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists: pass --force to replace it")
    if dst.is_dir():
        raise ValueError(f"{dst} is a folder: name a .gguf file")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"{dst.parent}: no such folder for {dst.name}")
    args = layout.args
    plan = tensor_plan(layout, source)
    partial = dst.with_name(dst.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), "llama")
    try:
        write_metadata(writer, args, args.vocab_size)
        total = 0
        for name, shape, kind, _ in plan:
            qtype = gguf.GGMLQuantizationType[kind]
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = int(np.prod(shape)) // block * size
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(name, byte_shape, np.uint8, nbytes, raw_dtype=qtype)
            total += nbytes
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(
            total=total, unit="B", unit_scale=True, desc="gguf", disable=not progress
        ) as bar:
            for name, _, kind, names in plan:
                data = _tensor_data(source, args, name, kind, names)
                writer.write_tensor_data(data.view(np.uint8))
                bar.update(data.nbytes)
                del data
        writer.close()
        os.replace(partial, dst)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return dst
