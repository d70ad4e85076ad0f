"""The default model as a K-quant GGUF, converted to our layouts, scored beside
llama.cpp on the same token ids.

    python benchmarks/kquant_perplexity.py --llama-python PYTHON --text FILE
        [--work DIR] [--ftype Q4_K_M] [--context 512] [--threads 2] [--out JSON]

1. The embedded model's Q4_1 GGUF dequantized (gguf's values) into a float16 GGUF,
   metadata copied, norms kept float32.
2. llama.cpp's `llama_model_quantize` (in `--llama-python`, the interpreter with
   llama-cpp-python) makes the `--ftype` GGUF of it. Rows that are not multiples of
   256 values cannot be K-quants: llama.cpp then picks another type (for the default
   model's d_model of 576, Q5_0 in place of Q4_K, Q8_0 in place of Q6_K); the
   tensor types it chose are recorded.
3. `convert` to q4 and q8 layouts (group size 32, the GGUF's), with their records of
   what was taken unchanged and what was rounded again.
4. Perplexity of the text's second half (from the first line break past its middle):
   ours (NumPy, dense) for each layout, llama.cpp's of the K-quant and float16 GGUFs,
   on the same token ids and chunks (llama_cpp_perplexity.py's scorer).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
from llama_cpp_perplexity import llama_perplexity

QUANTIZE = r"""
import ctypes, sys
import llama_cpp

src, dst, ftype, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
params.nthread = threads
code = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
sys.exit(code)
"""


def write_f16_gguf(src: Path, dst: Path) -> None:
    """`src`'s tensors as gguf dequantizes them, matrices float16, the rest float32,
    with its metadata."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    skip = ("general.architecture", "general.file_type")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        sub = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        values = values.reshape([int(x) for x in reversed(t.shape)])
        writer.add_tensor(
            t.name, values.astype(np.float16 if values.ndim == 2 else np.float32)
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def scale_rounding(path: Path) -> dict[str, dict]:
    """Per K-quant type kquants.py maps exactly: its scales' float16 rounding over
    every tensor of that type in the file."""
    import gguf

    from mlx_flashinfer.formats.kquants import KQUANT_TYPES, float16_rounding

    total: dict[str, dict] = {}
    for t in gguf.GGUFReader(path).tensors:
        kind = t.tensor_type.name
        if kind in KQUANT_TYPES and KQUANT_TYPES[kind][2]:
            got = float16_rounding(np.asarray(t.data), kind)
            row = total.setdefault(kind, {"groups": 0, "rounded": 0, "max_relative": 0})
            row["groups"] += got["groups"]
            row["rounded"] += got["rounded"]
            row["max_relative"] = max(row["max_relative"], got["max_relative"])
    return total


def tensor_types(path: Path) -> dict[str, dict[str, int]]:
    """{tensor kind (ffn_down, attn_q, ...): {GGUF type: count}}."""
    import gguf

    kinds: dict[str, Counter] = {}
    for t in gguf.GGUFReader(path).tensors:
        kind = t.name.split(".")[-2] if t.name.startswith("blk.") else t.name
        kinds.setdefault(kind, Counter())[t.tensor_type.name] += 1
    return {k: dict(v) for k, v in sorted(kinds.items())}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def second_half(text: str) -> str:
    middle = text.index("\n", len(text) // 2) + 1
    return text[middle:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-python", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--work", default="/tmp/kquant-perplexity")
    parser.add_argument("--ftype", default="Q4_K_M")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the results as JSON")
    opts = parser.parse_args()
    from mlx_flashinfer import Layout, convert, load
    from mlx_flashinfer.formats.default_model import default_gguf_path
    from mlx_flashinfer.perplexity import perplexity

    work = Path(opts.work)
    work.mkdir(parents=True, exist_ok=True)
    f16 = work / "default-F16.gguf"
    kquant = work / f"default-{opts.ftype}.gguf"
    if not f16.is_file():
        write_f16_gguf(default_gguf_path(), f16)
    if not kquant.is_file():
        command = [opts.llama_python, "-c", QUANTIZE, str(f16), str(kquant)]
        subprocess.run([*command, opts.ftype, str(opts.threads)], check=True)
    result = {
        "ftype": opts.ftype,
        "tensor_types": tensor_types(kquant),
        "float16_scale_rounding": scale_rounding(kquant),
        "bytes": {"f16_gguf": f16.stat().st_size, "kquant_gguf": kquant.stat().st_size},
        "context": opts.context,
        "cpu": cpu_name(),
        "layouts": {},
    }
    ids = None
    for dtype in ("q4", "q8"):
        layout = work / f"default-{opts.ftype}-{dtype}"
        if not layout.is_dir():
            convert(kquant, layout, dtype=dtype, progress=False)
        model, tokenizer = load(layout, backend="numpy")
        if ids is None:
            text = Path(opts.text).read_text(encoding="utf-8")
            ids = tokenizer.encode(second_half(text))
        started = time.perf_counter()
        ours = perplexity(model, ids, opts.context)
        result["layouts"][dtype] = {
            "perplexity": ours["perplexity"],
            "tokens": ours["tokens"],
            "seconds": round(time.perf_counter() - started, 1),
            "quantization": Layout.open(layout).manifest["quantization"],
            "bytes": sum(f.stat().st_size for f in layout.rglob("*") if f.is_file()),
        }
        print(f"ours {dtype}: perplexity {ours['perplexity']:.4f}", flush=True)
    for name, path in (("kquant", kquant), ("f16", f16)):
        theirs = llama_perplexity(
            opts.llama_python, path, ids, opts.context, opts.threads
        )
        result[f"llama_cpp_{name}"] = theirs
        print(f"llama.cpp {name}: perplexity {theirs['perplexity']:.4f}", flush=True)
    reference = result["llama_cpp_kquant"]["perplexity"]
    for row in result["layouts"].values():
        row["vs_llama_cpp"] = round(row["perplexity"] / reference - 1, 5)
    print(json.dumps(result, indent=1))
    if opts.out:
        Path(opts.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
