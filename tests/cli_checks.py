"""What the command-line tests share: running `flashinfer ARGV` in process, the
one-line refusal check, and a folder's snapshot (to show nothing changed)."""

from pathlib import Path

from mlx_flashinfer.cli import main


def run(argv: list, capsys) -> tuple[int, str, str]:
    """main(argv) -> (exit status, stdout, stderr); argparse's refusals, --help and
    --version exit too."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_refused(argv: list, says: str, capsys) -> str:
    """`flashinfer ARGV` exits 2 with exactly one line on stderr, saying `says`."""
    status, _, err = run(argv, capsys)
    assert status == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert says in err, err
    return err


def snapshot(folder: Path) -> dict:
    """Every file under `folder` (names and bytes)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
        for p in sorted(folder.rglob("*"))
    }
