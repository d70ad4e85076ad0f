"""Golden logits for the tests, from an independent implementation: Hugging Face
transformers (float32, CPU torch) on the tiny checkpoints of tests/tiny_models.py.

Not part of the project: run it with a separate environment that has torch and
transformers (see tools/reference_logits.py), from the repository root:

    /path/to/refenv/bin/python tools/make_golden.py [NAME ...]

It writes tests/golden/NAME.npz (tokens, logits) for every tiny model transformers can
run (fatrelu and drelu are not transformers activations; backend parity covers them),
or for the NAMEs given (the Llama family's variants: qwen2 qwen3 phi3 gemma2 gemma3
phi3-longrope). LongRoPE models go to tests/golden/longrope/ with a second run past
their pretraining context (tokens_long, logits_long: transformers' long factors).
Attention runs eager (Gemma 2's soft cap has no fused kernel): the plain math.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from tiny_models import (  # noqa: E402
    TOKENS,
    longrope_configs,
    random_weights,
    tiny_model_configs,
    write_hf_checkpoint,
)

SKIP = {"llama-fatrelu", "llama-drelu"}


def main(names: list[str]) -> None:
    out_dir = ROOT / "tests" / "golden"
    out_dir.mkdir(exist_ok=True)
    configs = tiny_model_configs() | longrope_configs()
    unknown = sorted(set(names) - set(configs))
    if unknown:
        sys.exit(f"unknown tiny models {unknown}: expected some of {sorted(configs)}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in configs.items():
            if name in SKIP or (names and name not in names):
                continue
            src = write_hf_checkpoint(
                Path(tmp) / name, config, random_weights(config, seed=3)
            )
            model = AutoModelForCausalLM.from_pretrained(
                src, dtype=torch.float32, attn_implementation="eager"
            ).eval()
            with torch.no_grad():
                logits = model(torch.tensor([TOKENS])).logits[0].numpy()
            runs = {"tokens": np.array(TOKENS), "logits": logits}
            folder = out_dir
            if name in longrope_configs():
                folder = out_dir / "longrope"
                folder.mkdir(exist_ok=True)
                long = (TOKENS * 4)[: config["original_max_position_embeddings"] + 8]
                with torch.no_grad():
                    runs["logits_long"] = model(torch.tensor([long])).logits[0].numpy()
                runs["tokens_long"] = np.array(long)
            np.savez(folder / f"{name}.npz", **runs)
            print(name, logits.shape)


if __name__ == "__main__":
    main(sys.argv[1:])
