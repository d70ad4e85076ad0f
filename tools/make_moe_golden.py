"""Golden logits of tiny mixture-of-experts models, from an independent
implementation: Hugging Face transformers (float32, CPU torch) on the tiny
checkpoints of tests/tiny_moe.py (hub naming: one tensor per expert).

Not part of the project: run it with a separate environment that has torch and
transformers (see tools/reference_logits.py), from the repository root:

    /path/to/refenv/bin/python tools/make_moe_golden.py

It writes tests/golden/moe/NAME.npz (tokens, logits, and each layer's routed experts
per token) for every tiny MoE model, or for those named on the command line
(`tools/make_moe_golden.py granitemoeshared`).
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from tiny_models import TOKENS, write_hf_checkpoint  # noqa: E402
from tiny_moe import hf_only_moe_configs, moe_weights, tiny_moe_configs  # noqa: E402


def main() -> None:
    out_dir = ROOT / "tests" / "golden" / "moe"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        configs = tiny_moe_configs() | hf_only_moe_configs()
        for name, config in configs.items():
            if sys.argv[1:] and name not in sys.argv[1:]:
                continue
            src = write_hf_checkpoint(
                Path(tmp) / name, config, moe_weights(config, seed=5)
            )
            model = AutoModelForCausalLM.from_pretrained(
                src, dtype=torch.float32
            ).eval()
            with torch.no_grad():
                out = model(torch.tensor([TOKENS]), output_router_logits=True)
            logits = out.logits[0].numpy()
            top_k = config["num_experts_per_tok"]
            routed = np.stack(
                [r.topk(top_k, dim=-1).indices.numpy() for r in out.router_logits]
            )  # (layers, tokens, top_k)
            np.savez(
                out_dir / f"{name}.npz",
                tokens=np.array(TOKENS),
                logits=logits,
                routed=routed,
            )
            print(name, logits.shape, routed.shape)


if __name__ == "__main__":
    main()
