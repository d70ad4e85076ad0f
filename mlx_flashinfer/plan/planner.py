"""The planner: every plan a budget allows, its predicted cost per token
(`costs.py`), and the fastest whose quality loss the user allows (the paper's cost
model guiding the choice, section 3).

Candidates, each exact or with the loss calibration measured:
- dense, when every weight fits;
- streamed: an equal share of every layer held, the rest read every token ahead of
  compute (exact for any activation);
- sparse, for each predictor the layout can run (the trained one, with its
  calibrated loss; the gate, exact for the ReLU family; all neurons, exact), each
  window length of the statistics, reads ahead on and off, with the read gap
  foreseen fastest (how far a read runs through unwanted bundles: fewer reads
  against more bytes, which pays where a read's own cost is high);
- for a mixture of experts, in place of streamed and sparse: experts (the router's
  exact choice, read when not cached; `expert_costs.py`), each window, reads
  ahead on and off.
Allowed loss: exact only when the user allows none (`max_loss=0`) or no trained
predictor exists; by default the trained predictor's own calibrated loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..flash.expert_plan import plan_experts
from ..flash.memory import (
    MemoryPlan,
    layer_demand,
    model_bytes,
    parse_budget,
    plan_memory,
    plan_streamed,
)
from ..flash.reader import DEFAULT_MAX_GAP, DEFAULT_THREADS
from ..formats.layout import Layout
from ..model.transformer import kv_cache_bytes
from ..predictors.kinds import predictor_nbytes, trained_kind
from .costs import TokenCost, dense_cost, paging_cost, sparse_cost, streamed_cost
from .disk import SHORT_THREADS, has_ring
from .expert_costs import experts_cost, experts_dense_cost, experts_paging_cost
from .machine import Machine
from .prompt_costs import prompt_cost

WINDOWS = (4, 2, 1, 8)  # window lengths a sparse plan may take (ties: the first)
READ_GAPS = (DEFAULT_MAX_GAP, 0, 64 * 1024)  # bytes a read runs through
# Another gap than the reader's default only for a clear foreseen gain: on OPT-6.7B
# q4 at 50% (io_uring) gap 0 was foreseen 1.3% faster than 16 KiB and measured
# within noise of it (5 pairs: 317 against 311 ms a token, Intel Xeon 2 vCPU).
GAP_MARGIN = 0.05
# A reader without io_uring (macOS; Linux where it is refused) reads through a
# thread pool: another count than its default 16 threads, of those the probe
# measured, by the same margin (a disk whose reads gain nothing from more in
# flight leaves their work to the cores compute needs)
READ_THREADS = tuple(sorted(SHORT_THREADS, key=lambda t: t != DEFAULT_THREADS))


@dataclass
class Candidate:
    """One plan the budget allows, with its predicted cost."""

    placement: str  # "dense", "streamed", "sparse" or "experts"
    cost: TokenCost
    loss: float  # calibrated perplexity loss (0.0: exact)
    plan: MemoryPlan | None = None
    predictor: str | None = None
    window: int | None = None
    lookahead: bool = False
    read_gap: int | None = None  # sparse: bytes a read runs through
    threads: int | None = None  # sparse: reader threads (None: an io_uring reads)

    @property
    def name(self) -> str:
        ahead = ", reads ahead" if self.lookahead else ""
        if self.placement == "experts":
            return f"experts (window {self.window}{ahead})"
        if self.placement != "sparse":
            return self.placement
        gap = "" if self.read_gap is None else f", read gap {self.read_gap // 1024} KiB"
        threads = "" if self.threads is None else f", {self.threads} reader threads"
        return f"sparse ({self.predictor}, window {self.window}{ahead}{gap}{threads})"

    def prompt_cost(self, layout: Layout, machine: Machine, tokens: int):
        """What a `tokens`-token prompt costs under this plan, its wait for the
        first token (`prompt_costs.py`); None where that is not modelled."""
        return prompt_cost(
            layout,
            self.placement,
            machine,
            tokens,
            plan=self.plan,
            predictor=self.predictor,
            window=self.window or 0,
        )

    def options(self) -> dict:
        """The `load` keywords that run this plan."""
        if self.placement == "dense":
            return {"dense": True}
        if self.placement == "streamed":
            return {"placement": "streamed"}
        if self.placement == "experts":
            return {
                "placement": "experts",
                "window": self.window,
                "lookahead": self.lookahead,
            }
        options = {
            "placement": "sparse",
            "predictor": self.predictor,
            "window": self.window,
            "lookahead": self.lookahead,
            "read_gap": self.read_gap,
        }
        return options | ({"threads": self.threads} if self.threads else {})


@dataclass
class Choice:
    """The planner's answer: the chosen plan, the others by predicted time, and OS
    paging for comparison."""

    best: Candidate
    others: list[Candidate] = field(default_factory=list)
    refused: list[Candidate] = field(default_factory=list)  # over the allowed loss
    paging: TokenCost | None = None
    allowed_loss: float = 0.0


def calibrated_loss(layout: Layout, predictor: str) -> float | None:
    """The trained predictor's calibrated perplexity loss; 0.0 for the exact ones
    (all; the gate and oracle of a ReLU-family model); None when unmeasured."""
    if predictor == "all":
        return 0.0
    if predictor in ("gate", "oracle"):
        return 0.0 if layout.args.is_relu_family else None
    section = layout.manifest.get("predictor") or {}
    if section.get("kind") != predictor:
        return None
    return (section.get("quality") or {}).get("loss")


def candidates(
    layout: Layout,
    budget: int,
    machine: Machine,
    max_context: int,
    predictor: str | None = None,
) -> list[Candidate]:
    """Every plan `budget` allows, with its predicted cost (unordered). With
    `predictor` (the user's choice), only the sparse plans of that predictor: its
    loss is theirs to allow (NaN where calibration never measured it)."""
    resident, ffn = model_bytes(layout)
    kv_cache = kv_cache_bytes(layout.args, max_context)
    found = []
    if predictor is None and budget >= resident + ffn:
        dense = (experts_dense_cost if layout.args.is_moe else dense_cost)(
            layout, machine
        )
        found.append(Candidate("dense", dense, 0.0))
    if layout.args.is_moe:
        return found + _experts_candidates(layout, budget, machine, max_context)
    if predictor is None:
        try:
            plan = plan_streamed(layout, budget, kv_cache, max_context)
            cost = streamed_cost(layout, plan, machine)
            found.append(Candidate("streamed", cost, 0.0, plan))
        except ValueError:
            pass
    if predictor is not None:
        names = [predictor]
    else:
        names = ["all"] + (["gate"] if layout.args.is_relu_family else [])
        names += [trained] if (trained := trained_kind(layout)) else []
    for name in names:
        loss = calibrated_loss(layout, name)
        if loss is None and predictor is None:
            continue  # unmeasured: only when the user names it
        loss = float("nan") if loss is None else loss
        nbytes = predictor_nbytes(name, layout)
        demand = layer_demand(layout, name)
        # reads ahead only where they pay: the ReLU family (on SiLU models the
        # guesses read more than they hide, as measured for loader.DEFAULT_LOOKAHEAD;
        # default model at 60%: 706 ms/token with them, 371 without)
        aheads = (False, True) if layout.args.is_relu_family else (False,)
        for lookahead in aheads:
            try:
                plan = plan_memory(
                    layout, budget, nbytes, kv_cache, max_context, lookahead, demand
                )
            except ValueError:
                continue
            for window in WINDOWS if name != "all" else (1,):
                gap, threads, cost = _read_options(
                    layout, plan, machine, name, window, nbytes
                )
                found.append(
                    Candidate(
                        "sparse",
                        cost,
                        loss,
                        plan,
                        name,
                        window,
                        lookahead,
                        gap,
                        threads,
                    )
                )
    return found


def _read_options(layout, plan, machine, name, window, nbytes):
    """The read gap and reader threads of a sparse plan (threads None: an
    io_uring reads) and its cost: the reader's defaults unless another choice is
    foreseen faster by more than GAP_MARGIN."""
    pool = READ_THREADS if not has_ring(machine.disk) else (None,)
    costs = {
        (gap, threads): sparse_cost(
            layout,
            plan,
            machine,
            name,
            window,
            nbytes,
            read_gap=gap,
            reader_threads=threads or DEFAULT_THREADS,
        )
        for gap in READ_GAPS
        for threads in pool
    }

    def weighed(option: tuple) -> float:
        gap, threads = option
        default = gap == DEFAULT_MAX_GAP and threads in (None, DEFAULT_THREADS)
        return costs[option].total_s / (1.0 if default else 1.0 - GAP_MARGIN)

    best = min(costs, key=weighed)
    return *best, costs[best]


def _experts_candidates(
    layout: Layout, budget: int, machine: Machine, max_context: int
) -> list[Candidate]:
    """The experts placement's plans (exact: the router decides), each window and
    reads ahead on and off."""
    kv_cache = kv_cache_bytes(layout.args, max_context)
    found = []
    for lookahead in (False, True):
        try:
            plan = plan_experts(layout, budget, kv_cache, max_context, lookahead)
        except ValueError:
            continue
        for window in WINDOWS + (0,):
            cost = experts_cost(layout, plan, machine, window)
            found.append(Candidate("experts", cost, 0.0, plan, None, window, lookahead))
    return found


def choose(
    layout: Layout,
    budget: str | int,
    machine: Machine,
    *,
    max_loss: float | None = None,
    max_context: int = 4096,
    predictor: str | None = None,
) -> Choice:
    """The fastest plan within the allowed loss (`max_loss`; None: the trained
    predictor's own calibrated loss, or exact when there is none); with
    `predictor`, the fastest sparse plan of that predictor, whatever its loss.

    Raises:
        ValueError: the budget allows no plan (the message names the smallest
            budget that does).
    """
    resident, ffn = model_bytes(layout)
    amount = parse_budget(budget, resident + ffn)
    if layout.args.is_moe and predictor not in (None, "router"):
        raise ValueError(
            f"a mixture of experts is routed by its router, not the {predictor} "
            "predictor"
        )
    predictor = None if layout.args.is_moe else predictor
    if max_loss is None:
        trained = trained_kind(layout)
        max_loss = (calibrated_loss(layout, trained) or 0.0) if trained else 0.0
        max_loss = max(max_loss, 0.0)  # a loss below zero (chance) still allows exact
    found = sorted(
        candidates(layout, amount, machine, max_context, predictor),
        key=lambda c: c.cost.total_s,
    )
    allowed = [c for c in found if predictor or c.loss <= max_loss + 1e-12]
    if not allowed and predictor:
        raise ValueError(
            f"memory budget {budget} allows no sparse plan with the {predictor} "
            "predictor; `flashinfer inspect MODEL --budget B --predictor "
            f"{predictor}` shows what it needs"
        )
    if not allowed:
        raise ValueError(
            f"memory budget {budget} allows no plan: the resident weights alone are "
            f"{resident} bytes; `flashinfer inspect MODEL --budget B` shows what a "
            "plan needs"
        )
    return Choice(
        best=allowed[0],
        others=allowed[1:],
        refused=[c for c in found if c not in allowed],
        paging=(experts_paging_cost if layout.args.is_moe else paging_cost)(
            layout, amount, machine
        ),
        allowed_loss=max_loss,
    )


def budget_for(
    layout: Layout,
    tokens_per_s: float,
    machine: Machine,
    *,
    max_loss: float | None = None,
    max_context: int = 4096,
) -> tuple[int, Choice] | None:
    """The smallest budget (to 1% of the model) whose best plan reaches
    `tokens_per_s`, with that plan; None if even every weight in DRAM does not."""
    resident, ffn = model_bytes(layout)
    whole = resident + ffn

    def fast_enough(amount: int) -> Choice | None:
        try:
            choice = choose(
                layout, amount, machine, max_loss=max_loss, max_context=max_context
            )
        except ValueError:
            return None
        return choice if choice.best.cost.total_s <= 1 / tokens_per_s else None

    top = fast_enough(whole)
    if top is None:
        return None
    low, high = resident, whole  # not fast enough at low, fast enough at high
    best = (high, top)
    while high - low > whole // 100:
        mid = (low + high) // 2
        if (got := fast_enough(mid)) is not None:
            high, best = mid, (mid, got)
        else:
            low = mid
    return best
