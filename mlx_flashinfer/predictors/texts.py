"""Texts shipped with the package (source and licence: data/README.md).

- `calibration_text`: chapters I-VI of Alice's Adventures in Wonderland, what
  `train-predictor` calibrates on when no text is given (no model sampling, no
  download).
- `verify_text`: the opening of chapter IX, a short passage calibration never saw,
  scored by `verify`.
- `held_out_part`: of the whole book, the part after the calibration text
  (chapters VII-XII), what benchmarks score.
"""

from __future__ import annotations

from importlib import resources

CALIBRATION_FILE = "alice_ch01-06.txt"
VERIFY_FILE = "alice_ch09_opening.txt"


def _read(name: str) -> str:
    return (resources.files(__package__) / "data" / name).read_text(encoding="utf-8")


def calibration_text() -> str:
    """The default calibration text: chapters I-VI of Alice (about 72,000
    characters)."""
    return _read(CALIBRATION_FILE)


def verify_text() -> str:
    """A short passage outside the calibration text (chapter IX's opening)."""
    return _read(VERIFY_FILE)


def held_out_part(book: str) -> str:
    """The part of the whole book that the calibration text does not contain.

    Args:
        book: the whole text of Alice's Adventures in Wonderland, as in the source
            the calibration text was cut from (Project Gutenberg eBook #11).

    Returns:
        Everything after the calibration text (chapters VII-XII).

    Raises:
        ValueError: `book` does not start with the calibration text.
    """
    calibration = calibration_text()
    if not book.startswith(calibration):
        raise ValueError(
            "this text does not start with the shipped calibration text (chapters "
            "I-VI of Project Gutenberg's Alice, eBook #11): its held-out part is "
            "unknown"
        )
    return book[len(calibration) :]
