"""What a user is told about the predictor's sparsity and what it costs: the trained
predictor's table (`train-predictor`, `inspect -v`) and, for models whose sparsity is
approximate (SiLU), the one line `generate`, `chat` and `verify` print in flash mode.
Figures come from the manifest, as measured when the predictor was trained."""

from __future__ import annotations

from ..flash.memory import format_bytes
from .kinds import default_kind

NAMES = {"lowrank": "low-rank", "lowbit": "low-bit"}


def skipped_share(section: dict) -> float:
    """Mean share of FFN neurons per token the trained cuts skip (tune split)."""
    report = section["report"]
    return 1.0 - sum(r["predicted_fraction"] for r in report) / len(report)


def predictor_table(section: dict) -> list[str]:
    """The per-layer table of a trained predictor and the quality it measured."""
    if section.get("recall_target"):
        how = f"cuts tuned to recall {section['recall_target']}"
    elif section.get("cuts"):
        how = "cuts chosen for a loss target"
    else:
        how = f"threshold {section['threshold']}"
    lowbit = section.get("kind") == "lowbit"
    name = "low-bit predictor (4-bit gate and up)" if lowbit else "low-rank predictor"
    column = "bits" if lowbit else "rank"
    lines = [
        f"{name}, {how}, {format_bytes(section['nbytes'])} in DRAM",
        f"layer  {column}  recall  precision  predicted  skipped  target set",
    ]
    for i, r in enumerate(section["report"]):
        lines.append(
            f"{i:>5}  {r.get(column, '-'):>4}  {r['recall']:>6.3f}  "
            f"{r['precision']:>9.3f}  "
            f"{r['predicted_fraction']:>9.1%}  {1 - r['predicted_fraction']:>7.1%}  "
            f"{r['true_fraction']:>10.1%}"
        )
    return lines + quality_lines(section)


def quality_lines(section: dict) -> list[str]:
    """What the stored cuts skip and cost, as measured when training (none for a
    predictor trained before this was measured)."""
    measured = section.get("quality")
    if not measured:
        return []
    pooled = measured.get("pooled_loss", measured["loss"])
    lines = [
        f"skips {skipped_share(section):.1%} of FFN neurons per token on average; "
        f"perplexity {measured['dense_perplexity']:.3f} dense -> "
        f"{measured['perplexity']:.3f} ({pooled:+.1%}) on "
        f"{measured['tokens']} calibration tokens it did not train on"
    ]
    if domains := measured.get("domains"):
        lines.append(f"{domains_line(measured)}:")
        lines.append("  domain        tokens  dense ppl  sparse ppl    loss")
        lines += [
            f"  {name:<12} {d['tokens']:>6}  {d['dense_perplexity']:>9.3f}  "
            f"{d['perplexity']:>10.3f}  {d['loss']:>+6.1%}"
            for name, d in domains.items()
        ]
    if measured.get("max_loss") is not None:
        if measured["met"]:
            verdict = "met"
        else:
            verdict = (
                "NOT met: skipping any neuron costs more; stored the best reached "
                "(the cheapest single step)"
            )
        lines.append(
            f"--max-loss {measured['max_loss']:.2%}: {verdict} "
            f"({measured['passes']} passes over the calibration tokens)"
        )
    return lines


def domains_line(measured: dict) -> str:
    """ "calibrated on N domains, worst +x% (name)", or the one domain's loss."""
    domains = measured.get("domains") or {}
    if len(domains) < 2:
        return f"calibrated on one text, {measured['loss']:+.1%}"
    return (
        f"calibrated on {len(domains)} domains, worst {measured['loss']:+.1%} "
        f"({measured['worst']})"
    )


def gate_dominates(section: dict) -> bool:
    """Whether the gate predictor (flash mode's without a trained one) costs less
    than the trained predictor of `section` on both counts: it predicts fewer
    neurons per token and holds less DRAM. Then the trained one reads more per
    token at any budget (more neurons wanted, less room to cache them) and fits
    fewer budgets; it can only lose less quality."""
    gate = section["gate"]
    predicted = 1.0 - skipped_share(section)
    return predicted > gate["predicted_fraction"] and section["nbytes"] > gate["nbytes"]


def gate_comparison(section: dict) -> str:
    """One line: the trained predictor of `section` against the gate predictor, as
    measured on the tune split (none for a predictor trained before this was)."""
    gate = section.get("gate")
    if not gate:
        return ""
    line = (
        f"against the gate predictor (flash mode's without one): predicts "
        f"{1.0 - skipped_share(section):.1%} of neurons per token (gate "
        f"{gate['predicted_fraction']:.1%}), holds {format_bytes(section['nbytes'])}"
        f" (gate {format_bytes(gate['nbytes'])})"
    )
    if measured := section.get("quality"):
        gate_loss = "exact" if gate["loss"] == 0 else f"{gate['loss']:+.1%}"
        line += f", perplexity {measured['loss']:+.1%} (gate {gate_loss})"
    return line


def not_stored_line(section: dict, layout) -> str:
    """Why a predictor the gate predictor dominates (`gate_dominates`) is not
    stored, and what to do."""
    gate, name = section["gate"], NAMES[section["kind"]]
    smaller = (
        " --kind lowrank makes a smaller one;" if section["kind"] != "lowrank" else ""
    )
    return (
        f"{layout}: the new {name} predictor is not stored: it predicts "
        f"{1.0 - skipped_share(section):.1%} of neurons per token and holds "
        f"{format_bytes(section['nbytes'])}, the gate predictor "
        f"{gate['predicted_fraction']:.1%} and {format_bytes(gate['nbytes'])}, so "
        "flash mode would read more per token and fit fewer budgets with it; it "
        f"loses less (perplexity {section['quality']['loss']:+.1%}, gate "
        f"{gate['loss']:+.1%}):{smaller} --force stores it; the layout keeps "
        "its predictor"
    )


def sparsity_line(model, layout) -> str | None:
    """One line on a flash model whose sparsity is approximate (not ReLU family):
    how much of the FFN its predictor skips and the calibrated perplexity loss;
    None for dense models and exact setups (ReLU family; a mixture of experts,
    routed by its router; the streamed placement, which computes every neuron)."""
    if model.plan is None or layout.args.is_relu_family or layout.args.is_moe:
        return None
    if model.plan.placement != "sparse":
        return None
    predictor = model.ffn.predictor
    act = layout.args.hidden_act
    if predictor.name == "gate":
        share = predictor.silu_sparsity
        return (
            f"sparse FFN ({act}, approximate): gate predictor skips about {share:.0%} "
            f"of neurons per token by |{act}(gate)| (it cannot see up); its loss is "
            "not calibrated: `flashinfer verify` measures it; `flashinfer "
            f"train-predictor {layout.path}` makes a "
            f"{NAMES[default_kind(layout.args)]} predictor with a calibrated loss"
        )
    if predictor.name not in ("lowrank", "lowbit"):
        return None
    name = NAMES[predictor.name]
    section = layout.manifest.get("predictor") or {}
    measured = section.get("quality")
    if not measured:
        return (
            f"sparse FFN ({act}, approximate): {name} predictor trained without a "
            "calibrated loss; retrain (`flashinfer train-predictor DIR`) to know it"
        )
    if predictor.threshold is not None:
        return (
            f"sparse FFN ({act}, approximate): low-rank predictor at threshold "
            f"{predictor.threshold}, not its trained cuts; calibrated at those: skips "
            f"{skipped_share(section):.0%}, perplexity {measured['loss']:+.1%}"
        )
    return (
        f"sparse FFN ({act}, approximate): {name} predictor skips "
        f"{skipped_share(section):.0%} of neurons per token; perplexity against "
        f"dense {domains_line(measured)} (predicted neurons only; a roomier cache "
        "loses less; `flashinfer verify -p P --text FILE` measures yours)"
    )
