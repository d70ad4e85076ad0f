"""Golden logits for the tests, from an independent implementation: Hugging Face
transformers (float32, CPU torch) on the tiny checkpoints of tests/tiny_models.py.

Not part of the project: run it with a separate environment that has torch and
transformers (see tools/reference_logits.py), from the repository root:

    /path/to/refenv/bin/python tools/make_golden.py

It writes tests/golden/NAME.npz (tokens, logits) for every tiny model transformers can
run (fatrelu and drelu are not transformers activations; backend parity covers them).
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
    random_weights,
    tiny_model_configs,
    write_hf_checkpoint,
)

SKIP = {"llama-fatrelu", "llama-drelu"}


def main() -> None:
    out_dir = ROOT / "tests" / "golden"
    out_dir.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in tiny_model_configs().items():
            if name in SKIP:
                continue
            src = write_hf_checkpoint(
                Path(tmp) / name, config, random_weights(config, seed=3)
            )
            model = AutoModelForCausalLM.from_pretrained(
                src, dtype=torch.float32
            ).eval()
            with torch.no_grad():
                logits = model(torch.tensor([TOKENS])).logits[0].numpy()
            np.savez(out_dir / f"{name}.npz", tokens=np.array(TOKENS), logits=logits)
            print(name, logits.shape)


if __name__ == "__main__":
    main()
