"""Options several commands share (model, backend and budget, sampling, prompt
cache) and what they turn into: a loaded model, a sampler."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..formats.layout import Layout
from ..model.backends import BACKENDS
from ..predictors.kinds import PREDICTORS
from ..predictors.report import sparsity_line


def at_least(low: int):
    """An argparse `type`: an integer >= `low`. Checked while parsing, so the error
    names the option and comes before anything is loaded or printed."""

    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer, got {text!r}"
            ) from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return integer


def fraction(one_included: bool):
    """An argparse `type`: a number above 0 and below 1 (or up to 1)."""

    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number, got {text!r}"
            ) from None
        if not (0 < value <= 1 if one_included else 0 < value < 1):  # refuses nan
            top = "1]" if one_included else "1)"
            raise argparse.ArgumentTypeError(f"must be in (0, {top}, got {text}")
        return value

    return number


def read_text_file(path: str, option: str) -> str:
    """The UTF-8 text of the file an option names.

    Raises:
        ValueError: not valid UTF-8 (the message names the file and the byte).
        OSError: no such file, unreadable.
    """
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{option} {path}: not valid UTF-8 text (byte 0x{data[err.start]:02x} at "
            f"offset {err.start})"
        ) from None


def make_sampling(opts) -> tuple:
    """(sampler, logits processors) from the sampling options.

    Raises:
        ValueError: an option out of range.
    """
    from ..generate import make_repetition_penalty, make_sampler

    sampler = make_sampler(
        temp=opts.temp,
        top_p=opts.top_p,
        top_k=opts.top_k,
        min_p=opts.min_p,
        seed=opts.seed,
    )
    size, penalty = opts.repetition_context_size, opts.repetition_penalty
    processors = [] if penalty is None else [make_repetition_penalty(penalty, size)]
    return sampler, processors


def add_generation_options(
    p: argparse.ArgumentParser, max_tokens: int | None, prompt: bool = True
) -> None:
    """--model, the prompt and its length (none: no reply), named as mlx-lm
    names them."""
    p.add_argument(
        "--model",
        default=None,
        help="layout directory, Hugging Face folder, .gguf file, Hub name "
        "(owner/name[@revision][:gguf-file]) or 'default' (default: the embedded "
        "SmolLM2-135M-Instruct; a folder named default: ./default)",
    )
    if prompt:
        p.add_argument("-p", "--prompt", required=True, help="'-' reads stdin")
        p.add_argument(
            "--ignore-chat-template",
            action="store_true",
            help="use the raw prompt (with BOS as the model expects)",
        )
    if max_tokens is not None:
        p.add_argument(
            "-m",
            "--max-tokens",
            type=at_least(1),
            default=max_tokens,
            help=f"the longest reply, in tokens (default {max_tokens})",
        )
    p.add_argument("--system-prompt", default=None)


def add_prompt_cache_option(p: argparse.ArgumentParser, required: bool = False):
    help = (
        "the file to save the prompt cache in"
        if required
        else "start from a prompt cache saved by cache-prompt: its prompt is "
        "prefilled already (generate: --prompt goes on from it; chat: its system "
        "prompt)"
    )
    p.add_argument("--prompt-cache-file", required=required, default=None, help=help)


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temp", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: no limit")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=at_least(0), default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--repetition-context-size", type=at_least(1), default=20)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Options choosing the backend and, for flash mode, the memory plan."""
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="default: mlx on Apple silicon, else numpy",
    )
    p.add_argument(
        "--memory-budget",
        default=None,
        help="run from flash within this budget: bytes, 1.5GB or 50%% "
        "(default: dense, every weight in memory)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="tokens whose neurons stay cached (flash mode; default 4)",
    )
    p.add_argument(
        "--predictor",
        choices=PREDICTORS,
        default=None,
        help="neuron predictor (flash mode; default: the trained one, else gate)",
    )
    p.add_argument(
        "--predictor-threshold",
        type=float,
        default=None,
        help="lowrank predictor's probability cut (default: as trained)",
    )
    p.add_argument(
        "--placement",
        choices=("sparse", "streamed", "auto", "experts"),
        default=None,
        help="flash mode: sparse (predicted neurons, cached over a window), "
        "streamed (a share of every layer held, the rest read every token ahead of "
        "compute: exact for any model) or auto (the planner's choice: `flashinfer "
        "plan` shows it); default: auto on a probed machine (`flashinfer probe`) "
        "unless a sparse option (--predictor, --window, --lookahead) is given, else "
        "sparse; a mixture of experts has experts (routed experts read at once, "
        "cached over the window and LRU), its default and only one",
    )
    p.add_argument("--threads", type=int, default=None, help="flash reader threads")
    p.add_argument(
        "--read-gap",
        default=None,
        metavar="SIZE",
        help="sparse placement: gaps of up to this many bytes (or 64KiB, say) "
        "between wanted neurons are read through, for fewer, larger reads "
        "(default: the plan's, else 16KiB)",
    )
    p.add_argument(
        "--lookahead",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="flash mode: read each layer's guessed neurons while the layer before "
        "computes (a second read buffer in the budget; the answer is the same)",
    )
    p.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="tokens the KV cache holds (default: model limit or 4096)",
    )
    add_cache_option(p)


def add_cache_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where checkpoints are converted on first use "
        "(default: $MLX_FLASHINFER_CACHE or ~/.cache/mlx-flashinfer)",
    )


def model_sparsity_line(opts, model) -> str | None:
    """`sparsity_report.sparsity_line` of the model the options name."""
    if model.plan is None:
        return None
    from ..loader import resolve_model

    return sparsity_line(
        model, Layout.open(resolve_model(opts.model, cache_dir=opts.cache_dir))
    )


def load_model(opts):
    from ..loader import load

    return load(
        opts.model,
        backend=opts.backend,
        memory_budget=opts.memory_budget,
        window=opts.window,
        predictor=opts.predictor,
        threads=opts.threads,
        max_context=opts.max_context,
        predictor_threshold=opts.predictor_threshold,
        cache_dir=opts.cache_dir,
        placement=opts.placement,
        read_gap=opts.read_gap,
        **lookahead_option(opts),
    )


def lookahead_option(opts) -> dict:
    """`lookahead=` for load() when the user chose (else load's default)."""
    return {} if opts.lookahead is None else {"lookahead": opts.lookahead}
