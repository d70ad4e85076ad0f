"""The `flashinfer` command line: one subcommand per job (each group of commands in
its own module, its parser beside it), user errors as one line + exit 2."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import warnings

from .. import __version__
from . import bench, evaluate, generate, layouts, plan, predictor, serve

DESCRIPTION = (
    "Run a language model larger than memory: its feed-forward neurons read from "
    "flash when predicted (LLM in a flash). User errors: one line, exit 2."
)
# User mistakes print one line and exit 2; anything else is a bug and keeps its
# traceback. OSError covers the disk's refusals too: read-only, full, busy.
USER_ERRORS = (ValueError, OSError, ImportError)
# what to do about the system's refusals, by errno; ELSEWHERE is filled in per command
# (`write_elsewhere`): each names what the user can change
_OS_HINTS = {
    errno.EROFS: "write {elsewhere}",
    errno.ENOSPC: "free some space, or write {elsewhere}",
    errno.EDQUOT: "free some space, or write {elsewhere}",
    errno.EBUSY: "a mount point or a directory in use: choose another path",
    errno.EACCES: "check its permissions, or write {elsewhere}",
}


def error_line(err: BaseException, command: str = "", opts=None) -> str:
    """The one line a user error prints: an OSError of the system as `path: what;
    what to do`, any other message with its newlines folded.

    Args:
        err: the error.
        command: the subcommand that failed (what the hint suggests depends on it).
        opts: its parsed options (which file the failed write was meant for).

    Returns:
        The line, without the "flashinfer COMMAND: error:" prefix.
    """
    if isinstance(err, OSError) and err.errno is not None and err.strerror:
        elsewhere = write_elsewhere(command, opts, err.filename)
        where = f"{err.filename}: " if err.filename is not None else ""
        hint = _OS_HINTS.get(err.errno, "").format(elsewhere=elsewhere)
        text = f"{where}{err.strerror}" + (f"; {hint}" if hint else "")
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def write_elsewhere(command: str, opts, filename) -> str:
    """Where else a refused write can go, as the option the user would change: it
    ends the hint "write ...". A command writes its own output (convert's DST,
    cache-prompt's file, train-predictor's layout) or converts a model into the
    cache on first use."""
    if command == "convert":
        return "to another DST"
    cache_file = getattr(opts, "prompt_cache_file", None)
    if cache_file and filename is not None and _same_path(filename, cache_file):
        return "to another --prompt-cache-file"
    if command == "train-predictor" and opts is not None and opts.model != "default":
        # it writes into the layout it trains, and has no other place to write
        return (
            f"into a copy of the layout (cp -r {opts.model} COPY; flashinfer "
            "train-predictor COPY)"
        )
    if command == "bench":
        return "elsewhere: --out, --probe-dir or --cache-dir"
    if opts is not None and hasattr(opts, "cache_dir"):
        return "elsewhere: --cache-dir or $MLX_FLASHINFER_CACHE"
    return "elsewhere: $MLX_FLASHINFER_CACHE"


def _same_path(a, b) -> bool:
    return os.path.abspath(os.fsdecode(a)) == os.path.abspath(os.fsdecode(b))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flashinfer", description=DESCRIPTION)
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for group in (layouts, generate, serve, evaluate, predictor, plan, bench):
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    try:
        with _sigterm_unwinds(), warnings.catch_warnings():
            # inf and nan are reported once, naming the layer (nonfinite.py)
            warnings.filterwarnings(
                "ignore",
                "(overflow|invalid value|divide by zero) encountered",
                RuntimeWarning,
            )
            return opts.run(opts)
    except BrokenPipeError:  # e.g. `flashinfer generate ... | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except USER_ERRORS as err:
        line = error_line(err, opts.command, opts)
        print(f"flashinfer {opts.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flashinfer {opts.command}: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _sigterm_unwinds():
    """SIGTERM raises SystemExit, so cleanups (a conversion's staging directory) run
    as they do for Ctrl-C; by default it ends the process on the spot."""

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
