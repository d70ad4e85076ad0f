"""The user's side of generation: prompts into token ids, the chat REPL, and the text
of generation statistics (for `flashinfer chat`, `generate` and `verify`).

Input and output are injected (a `read(prompt)` function and a text stream) so tests
drive the REPL without a terminal.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import TextIO

from .flash.memory import format_bytes
from .generate import GenerationResponse, context_full, stream_generate
from .prompt_cache import PromptCache, make_prompt_cache

HELP = """commands:
  /reset   forget the conversation (the system prompt stays)
  /stats   flash bytes, reads, cache hit rate and speed of the last reply
  /help    this help
  /quit    leave (also q or Ctrl-D)
Ctrl-C stops a reply; the chat goes on."""

_COUNTERS = (
    "tokens",
    "bytes_read",
    "reads",
    "neurons_hit",
    "neurons_predicted",
    "prefill_layers",
    "prefill_streamed",
)


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` rendered by the model's chat template, ready for the
    assistant's reply.

    A model without a template gets a plain "role: content" one (and its BOS); the
    templates of models that want a BOS write it themselves, as in Hugging Face.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the chat says it once, not per turn
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=tokenizer.chat_template is None)


def read_prompt(prompt: str) -> str:
    """The prompt text: `prompt` itself, or all of stdin for "-".

    Raises:
        ValueError: the text is not valid UTF-8.
    """
    if prompt != "-":
        try:
            prompt.encode("utf-8")  # undecodable argv bytes arrive as lone surrogates
        except UnicodeEncodeError:
            raise ValueError("the prompt is not valid UTF-8 text") from None
        return prompt
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"the prompt on stdin is not valid UTF-8 text (byte "
            f"0x{data[err.start]:02x} at offset {err.start})"
        ) from None


def prompt_ids(
    tokenizer,
    prompt: str,
    system_prompt: str | None = None,
    ignore_chat_template: bool = False,
) -> list[int]:
    """Token ids of a one-turn prompt: through the chat template (after the system
    prompt) unless told not to or the model has none; else the raw text with BOS as
    the model expects.

    Raises:
        ValueError: a system prompt without a chat template to put it in.
    """
    if ignore_chat_template or tokenizer.chat_template is None:
        if system_prompt:
            raise ValueError(
                "--system-prompt needs the chat template (ignored or absent)"
            )
        return tokenizer.encode(prompt)
    system = [{"role": "system", "content": system_prompt}] * bool(system_prompt)
    return encode_chat(tokenizer, [*system, {"role": "user", "content": prompt}])


def prefix_ids(
    tokenizer,
    prompt: str,
    system_prompt: str | None = None,
    ignore_chat_template: bool = False,
) -> list[int]:
    """Token ids that `prompt_ids` of `prompt` + any more text starts with (up to
    how the tokenizer splits the joint): what `flashinfer cache-prompt` caches.
    Through the chat template, the user's turn is left open (mlx-lm's
    continue_final_message)."""
    if ignore_chat_template or tokenizer.chat_template is None:
        return prompt_ids(tokenizer, prompt, system_prompt, ignore_chat_template)
    marker = "<query>"
    system = [{"role": "system", "content": system_prompt}] * bool(system_prompt)
    messages = [*system, {"role": "user", "content": prompt + marker}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode(text[: text.index(marker)], add_special_tokens=False)


def io_delta(before: dict, after: dict) -> dict | None:
    """Flash counters between two `model.io_stats()` snapshots: {"decode": {...},
    "prefill": {...}}, or None for a dense model (nothing read from flash)."""
    if "decode" not in after:
        return None
    return {
        part: {k: after[part][k] - before[part][k] for k in _COUNTERS}
        for part in ("decode", "prefill")
    }


def stats_lines(response: GenerationResponse, flash: dict | None) -> list[str]:
    """A few lines of speed, memory and flash I/O for one generation.

    Args:
        response: the last response of the generation.
        flash: `io_delta` over the generation (None for a dense model).

    Returns:
        Lines without newlines.
    """
    computed = response.prompt_tokens - response.cached_tokens
    lines = [
        f"prompt: {response.prompt_tokens} tokens ({response.cached_tokens} reused "
        f"from the prompt cache, {computed} computed), "
        f"{response.prompt_tps:.1f} tok/s",
        f"generation: {response.generation_tokens} tokens, "
        f"{response.generation_tps:.1f} tok/s",
        f"peak memory: {response.peak_memory_gb:.2f} GB",
    ]
    if flash is None:
        lines.append("flash: none (dense: every weight in memory)")
        return lines
    decode, prefill = flash["decode"], flash["prefill"]
    n = max(decode["tokens"], 1)
    hit_rate = decode["neurons_hit"] / max(decode["neurons_predicted"], 1)
    lines.append(
        f"flash, per decoded token: {format_bytes(decode['bytes_read'] / n)}, "
        f"{decode['reads'] / n:.1f} reads, cache hit rate {hit_rate:.1%} "
        f"({decode['tokens']} tokens, {format_bytes(decode['bytes_read'])} in all)"
    )
    streamed = prefill["prefill_streamed"]
    sparse = prefill["prefill_layers"] - streamed
    how = f"{streamed} layers streamed whole" + (
        f", {sparse} read sparsely (their tokens' neurons only)" if sparse > 0 else ""
    )
    lines.append(
        f"flash, prompt: {format_bytes(prefill['bytes_read'])} in "
        f"{prefill['reads']} reads ({how})"
    )
    return lines


class Chat:
    """A conversation with a model: history kept within its context, replies
    streamed.

    Args:
        model, tokenizer: from `load`.
        max_tokens: the longest reply, in tokens.
        system_prompt: an optional first "system" message.
        sampler, logits_processors: as for `stream_generate` (default greedy).
        out: where text goes (default sys.stdout).
        prompt_cache: kept across turns, so a turn computes only its own tokens
            (default: a new one; `load_prompt_cache` gives a saved one).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_tokens: int = 256,
        system_prompt: str | None = None,
        sampler=None,
        logits_processors: list | None = None,
        out: TextIO | None = None,
        prompt_cache: PromptCache | None = None,
    ):
        self.model = model
        self.prompt_cache = (
            make_prompt_cache(model) if prompt_cache is None else prompt_cache
        )
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.system = [{"role": "system", "content": system_prompt}] * bool(
            system_prompt
        )
        self.sampler = sampler
        self.logits_processors = logits_processors
        self.out = out or sys.stdout
        self.history: list[dict] = []  # user, assistant, user, ... turns
        self.last: tuple[GenerationResponse, dict | None] | None = None

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def run(self, read: Callable[[str], str] = input, prompt: str = ">> ") -> None:
        """Read lines and answer them until /quit, q or end of input.

        Args:
            read: a function like `input`: shows `prompt`, returns a line, raises
                EOFError at the end of input.
            prompt: the input prompt.
        """
        if self.tokenizer.chat_template is None:
            self.say("(the model has no chat template: using a plain 'role: text' one)")
        while True:
            try:
                line = read(prompt)
                line.encode("utf-8")  # undecodable bytes arrive as lone surrogates
            except EOFError:
                self.say()
                return
            except KeyboardInterrupt:
                self.say("\n(Ctrl-C stops a reply; q or Ctrl-D leaves)")
                continue
            except (UnicodeDecodeError, UnicodeEncodeError):
                self.say("that input is not valid UTF-8 text; type it again")
                continue
            if not self.handle(line.strip()):
                return

    def handle(self, line: str) -> bool:
        """Answer one input line; False when the user leaves."""
        if not line:
            return True
        if line in ("q", "/quit", "/exit"):
            return False
        if line == "/help":
            self.say(HELP)
        elif line == "/reset":
            self.history.clear()
            self.say("(conversation reset)")
        elif line == "/stats":
            self.show_stats()
        elif line.startswith("/"):
            self.say(f"unknown command {line.split()[0]}")
            self.say(HELP)
        else:
            self.reply(line)
        return True

    def show_stats(self) -> None:
        if self.last is None:
            self.say("no reply yet")
            return
        for text in stats_lines(*self.last):
            self.say(text)

    def reply(self, text: str) -> None:
        """Stream the model's answer to `text` and add both to the history."""
        self.history.append({"role": "user", "content": text})
        ids = self._fit_history()
        if ids is None:
            self.history.pop()
            return
        before, last, answer = self.model.io_stats(), None, ""
        try:
            for last in stream_generate(
                self.model,
                self.tokenizer,
                ids,
                max_tokens=self.max_tokens,
                sampler=self.sampler,
                logits_processors=self.logits_processors,
                prompt_cache=self.prompt_cache,
            ):
                answer += last.text
                self.say(last.text, end="")
            self.say()
            if last is not None and context_full(self.model, last):
                self.say("(reply cut: the context is full)")
        except KeyboardInterrupt:
            self.say("\n(reply stopped)")
        self.history.append({"role": "assistant", "content": answer})
        if last is not None:
            self.last = (last, io_delta(before, self.model.io_stats()))

    def _fit_history(self) -> list[int] | None:
        """Prompt ids of the conversation, the oldest exchanges dropped until it and a
        full reply fit the context; None (and a line) when the new message alone is
        too long."""
        limit, dropped = self.model.max_context, 0
        while True:
            ids = encode_chat(self.tokenizer, self.system + self.history)
            if len(ids) + self.max_tokens <= limit or len(self.history) == 1:
                break
            del self.history[:2]
            dropped += 1
        if dropped:
            self.say(
                f"(context full: dropped the oldest {dropped} exchange"
                f"{'s' * (dropped > 1)})"
            )
        if len(ids) >= limit:
            self.say(
                f"that message is too long: {len(ids)} tokens, the context holds "
                f"{limit}"
            )
            return None
        return ids
