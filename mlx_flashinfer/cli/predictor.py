"""`flashinfer train-predictor`: a model's neuron predictor, calibrated on text; a
mixture of experts' routing, recorded on text (its router is its predictor)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..model.backends import BACKENDS
from ..predictors.calibrate import MIN_TOKENS
from ..predictors.report import gate_comparison, predictor_table
from ..predictors.train import DEFAULT_RECALL, DEFAULT_TOKENS
from .options import at_least, fraction, read_text_file


def add_commands(sub) -> None:
    """Register train-predictor."""
    p = sub.add_parser(
        "train-predictor",
        help="train the neuron predictor (a mixture of experts: record its routing)",
    )
    p.add_argument(
        "model", help="layout directory, or default (the embedded model's layout)"
    )
    p.add_argument(
        "--text",
        action="append",
        metavar="FILE",
        help="a UTF-8 calibration text file, one domain whose loss is kept within "
        "--max-loss on its own; give the option once per file: --text a.txt --text "
        "b.txt (default: the shipped corpus of five domains: narrative, technical "
        "prose, code, chat, other languages)",
    )
    p.add_argument(
        "--tokens",
        type=at_least(MIN_TOKENS),
        default=DEFAULT_TOKENS,
        help=f"calibration tokens, at least {MIN_TOKENS} (default {DEFAULT_TOKENS})",
    )
    p.add_argument(
        "--kind",
        choices=("lowbit", "lowrank"),
        default=None,
        help="lowbit: 4-bit copies of gate and up, which rank a SiLU model's neurons "
        "well (default for SiLU models; ~19%% of a float16 FFN in DRAM); lowrank: "
        "the paper's small trained predictor (ReLU-family models' only kind)",
    )
    p.add_argument(
        "--rank",
        type=at_least(1),
        default=None,
        help="lowrank: rank of every layer (64)",
    )
    p.add_argument(
        "--last-rank",
        type=at_least(1),
        default=None,
        help="lowrank: rank of the last eighth of the layers (the most active)",
    )
    cuts = p.add_mutually_exclusive_group()
    cuts.add_argument(
        "--recall",
        type=fraction(one_included=True),
        default=None,
        help="each layer's cut keeps this share of the neurons that matter, on "
        f"calibration text it did not train on (default {DEFAULT_RECALL})",
    )
    cuts.add_argument(
        "--max-loss",
        default=None,
        metavar="PCT",
        help="instead of --recall: choose each layer's cut so that perplexity on "
        "calibration text rises by at most PCT percent (e.g. 3%%) in every domain, "
        "skipping most where layers tolerate it",
    )
    p.add_argument(
        "--sparsity",
        type=fraction(one_included=False),
        default=None,
        help="SiLU models: per token, the fraction of neurons counted as not "
        "mattering (the smallest |silu(gate) x up|; default 0.5)",
    )
    p.add_argument("--backend", choices=BACKENDS, default=None)
    p.add_argument(
        "--memory-budget",
        default=None,
        help="refuse to start if calibration would hold more than this (bytes, "
        "1.5GB or 50%%); it holds the resident weights, one FFN layer and the "
        "calibration tokens' activations",
    )
    p.add_argument("--seed", type=at_least(0), default=None, help="default 0")
    p.add_argument(
        "--force",
        action="store_true",
        help="store the new predictor even when the gate predictor costs less on "
        "both counts (neurons read per token and DRAM held): it loses less quality",
    )
    p.set_defaults(run=cmd_train_predictor)


# what only training a neuron predictor takes: refused for a mixture of experts
TRAINING_ONLY = (
    "kind",
    "rank",
    "last_rank",
    "recall",
    "max_loss",
    "sparsity",
    "memory_budget",
    "seed",
    "force",
)


def cmd_train_predictor(opts) -> int:
    from ..formats.layout import Layout
    from ..loader import resolve_model
    from ..predictors.train import parse_max_loss, train_predictor

    max_loss = None if opts.max_loss is None else parse_max_loss(opts.max_loss)
    texts = {Path(f).name: read_text_file(f, "--text") for f in opts.text or []}
    if len(texts) < len(opts.text or []):
        raise ValueError("--text: each file once, by distinct names")
    path = resolve_model(opts.model)  # "default": the embedded model's cached layout
    if Layout.open(path).args.is_moe:
        return record_routing_command(opts, path, texts)
    kind = opts.kind
    if (opts.rank, opts.last_rank) != (None, None):  # a rank asks for low rank
        if kind == "lowbit":
            raise ValueError("--rank and --last-rank apply to --kind lowrank only")
        kind = "lowrank"
    section = train_predictor(
        path,
        force=opts.force,
        texts=texts or None,
        tokens=opts.tokens,
        kind=kind,
        rank=64 if opts.rank is None else opts.rank,
        last_rank=opts.last_rank,
        recall=opts.recall,
        max_loss=max_loss,
        silu_sparsity=0.5 if opts.sparsity is None else opts.sparsity,
        backend=opts.backend,
        memory_budget=opts.memory_budget,
        seed=opts.seed or 0,
        progress=sys.stderr.isatty(),
    )
    print("\n".join(predictor_table(section)))
    print(gate_comparison(section))
    print(
        f"trained on {section['tokens']} tokens ({section['source']}) in "
        f"{section['seconds']:.1f} s; stored in {Path(path) / section['file']}"
    )
    return 0


def record_routing_command(opts, path, texts: dict) -> int:
    """A mixture of experts: record its routing (`predictors/routing.py`), refusing
    the options that only training takes."""
    from ..formats.layout import Layout
    from ..predictors.routing import record_routing, routing_lines

    given = [n for n in TRAINING_ONLY if getattr(opts, n) not in (None, False)]
    if given:
        names = ", ".join("--" + n.replace("_", "-") for n in given)
        raise ValueError(
            f"{names}: not for a mixture of experts, whose router is its predictor "
            "(exact): train-predictor records its routing (--text, --tokens, "
            "--backend)"
        )
    layout = Layout.open(path)
    section = record_routing(
        layout,
        texts=texts or None,
        tokens=opts.tokens,
        backend=opts.backend,
        progress=sys.stderr.isatty(),
    )
    print("\n".join(routing_lines(section, layout.args.num_experts)))
    print(
        f"routing recorded on {section['tokens']} tokens ({section['source']}) in "
        f"{section['seconds']:.1f} s into {Path(path) / 'manifest.json'}: "
        "`flashinfer plan` predicts the experts cache from it"
    )
    return 0
