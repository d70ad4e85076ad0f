"""Tokenizers carried in a layout: tokenizer.json, SentencePiece, chat templates,
streaming.

BOS/EOS follow the model's own config as recorded in the manifest at conversion.
"""

from __future__ import annotations

import warnings
from datetime import datetime
from pathlib import Path

FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


class Tokenizer:
    """Encode/decode text, render chat templates; the same for every tokenizer kind.

    Args:
        folder: the layout directory holding the tokenizer files.
        info: the manifest's "tokenizer" section (file, bos/eos ids, prepend_bos,
            chat_template).

    Raises:
        ValueError: the tokenizer file or the chat template does not parse (checked
            here, so a bad one fails at load, not in the middle of a reply).
    """

    def __init__(self, folder: str | Path, info: dict):
        folder = Path(folder)
        self.kind = info["file"]
        self.bos_token_id: int | None = info.get("bos_token_id")
        self.eos_token_ids: set[int] = set(info.get("eos_token_ids") or [])
        self.prepend_bos: bool = bool(info.get("prepend_bos"))
        self.chat_template: str | None = info.get("chat_template")
        path = folder / self.kind
        try:
            if self.kind == "tokenizer.json":
                from tokenizers import Tokenizer as HFTokenizer

                self._tok = HFTokenizer.from_file(str(path))
                self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
            else:
                import sentencepiece

                self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
                self.vocab_size = self._sp.get_piece_size()
            self.decode(self.encode("Hi!", add_special_tokens=False))
        except FileNotFoundError:
            raise
        except Exception as err:  # both libraries raise bare Exception/RuntimeError
            raise ValueError(
                f"{folder}: {self.kind} does not load ({_one_line(err)})"
            ) from None
        if self.chat_template is not None:
            try:
                self.apply_chat_template([{"role": "user", "content": "Hi!"}])
            except ValueError as err:
                raise ValueError(f"{folder}: {err}") from None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS as the model expects
        it."""
        if self.kind == "tokenizer.json":
            ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        else:
            ids = self._sp.encode(text)
        if (
            add_special_tokens
            and self.prepend_bos
            and self.bos_token_id is not None
            and (not ids or ids[0] != self.bos_token_id)
        ):
            ids = [self.bos_token_id, *ids]
        return list(ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if self.kind == "tokenizer.json":
            return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self._sp.decode(list(ids))

    def token_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        if self.kind == "tokenizer.json":
            return self._tok.id_to_token(token_id) or ""
        return self._sp.id_to_piece(token_id)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True
    ) -> str:
        """Render `messages` with the model's chat template (jinja2, sandboxed).

        A model without a template gets a plain "role: content" one, with a warning.
        """
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = self.chat_template
        if not template:
            warnings.warn(
                "the model has no chat template; using a plain one", stacklevel=2
            )
            template = FALLBACK_TEMPLATE

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        eos = min(self.eos_token_ids) if self.eos_token_ids else None
        try:
            return env.from_string(template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.token_text(self.bos_token_id),
                eos_token=self.token_text(eos),
            )
        except (TemplateError, TypeError, ValueError, LookupError) as err:
            raise ValueError(f"the chat template fails: {_one_line(err)}") from None

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


class StreamingDetokenizer:
    """Turns tokens into text as they come, never emitting a broken UTF-8 character.

    A token may end inside a multi-byte character; the decoder then ends with U+FFFD and
    we hold the text back until a later token completes it.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""  # everything emitted so far

    def add(self, token: int) -> str:
        """Add a token; return the text it makes printable (possibly empty)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""
        return self._emit(text)

    def finalize(self) -> str:
        """Emit whatever is left, even an incomplete character."""
        return self._emit(self.tokenizer.decode(self.tokens))

    def _emit(self, text: str) -> str:
        new = text[len(self.text) :]
        self.text = text
        return new


def load_tokenizer(layout) -> Tokenizer:
    """A layout's tokenizer, parsed with its chat template.

    Args:
        layout: an open `Layout`.

    Raises:
        ValueError: either does not parse (the layout was damaged after conversion).
    """
    try:
        return Tokenizer(layout.path, layout.manifest["tokenizer"])
    except ValueError as err:
        raise ValueError(f"{err}; re-convert the model") from None
