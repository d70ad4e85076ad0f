"""Texts shipped with the package (sources and licences: data/README.md).

- `calibration_domains`: the calibration corpus, one text per domain (narrative
  prose, technical and reference prose, source code, conversations rendered in the
  model's chat template, other languages), what `train-predictor` calibrates on when
  no text is given (no model sampling, no download); each domain's loss is guarded
  on its own.
- `held_out_domains`: for each shipped domain, passages calibration never sees,
  what benchmarks and tests score.
- `calibration_text`: the narrative domain alone (chapters I-VI of Alice).
- `verify_text`: the opening of chapter IX, a short passage calibration never saw,
  scored by `verify` without `--text`.
- `held_out_part`: of the whole book, the part after the calibration text
  (chapters VII-XII), what benchmarks score.
"""

from __future__ import annotations

import json
import warnings
from importlib import resources

CALIBRATION_FILE = "alice_ch01-06.txt"
VERIFY_FILE = "alice_ch09_opening.txt"
# domain: (calibration file, held-out file); .json files hold conversations
DOMAINS = {
    "narrative": (CALIBRATION_FILE, VERIFY_FILE),
    "technical": ("technical.txt", "technical_heldout.txt"),
    "code": ("code.txt", "code_heldout.txt"),
    "chat": ("chat.json", "chat_heldout.json"),
    "languages": ("languages.txt", "languages_heldout.txt"),
}


def _read(name: str) -> str:
    return (resources.files(__package__) / "data" / name).read_text(encoding="utf-8")


def calibration_text() -> str:
    """The narrative domain's calibration text: chapters I-VI of Alice (about
    72,000 characters)."""
    return _read(CALIBRATION_FILE)


def verify_text() -> str:
    """A short passage outside the calibration text (chapter IX's opening)."""
    return _read(VERIFY_FILE)


def render_conversations(tokenizer, conversations: list[list[dict]]) -> str:
    """Conversations as the model reads them in `chat` and `serve`: each through
    its chat template (a plain "role: content" one when it has none), joined."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no template: the plain one, said once
        return "\n".join(
            tokenizer.apply_chat_template(c, add_generation_prompt=False)
            for c in conversations
        )


def _domain_text(name: str, tokenizer) -> str:
    text = _read(name)
    if name.endswith(".json"):
        return render_conversations(tokenizer, json.loads(text))
    return text


def calibration_domains(tokenizer) -> dict[str, str]:
    """The shipped calibration corpus: domain name -> text (conversations rendered
    by `tokenizer`'s chat template)."""
    return {d: _domain_text(files[0], tokenizer) for d, files in DOMAINS.items()}


def named_domains(tokenizer, texts) -> dict[str, str]:
    """Calibration texts by domain name: the shipped corpus (`texts` None), the
    texts given by name (a dict), or a list named "text 1", "text 2", ..."""
    if texts is None:
        return calibration_domains(tokenizer)
    if isinstance(texts, dict):
        return dict(texts)
    return {f"text {i + 1}": t for i, t in enumerate(texts)}


def held_out_domains(tokenizer) -> dict[str, str]:
    """Per shipped domain, passages no calibration reads: domain name -> text."""
    return {d: _domain_text(files[1], tokenizer) for d, files in DOMAINS.items()}


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
