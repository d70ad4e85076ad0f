"""The OpenAI API's shapes: a request body checked into a `CompletionRequest`, and
the JSON of completions, stream chunks, usage and errors, for
`/v1/chat/completions` and `/v1/completions`. No HTTP here (server.py), no
generation: the model only tokenizes and checks token ids.

Fields read: model, messages (chat) or prompt (text: a string or token ids),
max_tokens (or max_completion_tokens), temperature, top_p, stop, seed, stream,
stream_options.include_usage, n (1 only). Other fields are ignored, as most servers
do; a field of the wrong type is refused naming it.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass

from ..chat import encode_chat

ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass
class CompletionRequest:
    """A checked request: what the generation thread needs, nothing of HTTP."""

    kind: str  # "chat" or "text"
    ids: list[int]  # the whole prompt, tokenized
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool  # stream: a last chunk with the usage
    id: str = ""
    created: int = 0  # Unix seconds: when the request came (every chunk has it)

    def __post_init__(self):
        prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body.

    Raises:
        APIError: not UTF-8, not JSON, or not an object.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise APIError(
            400,
            f"the request body is not valid UTF-8 (byte 0x{raw[err.start]:02x} at "
            f"offset {err.start})",
        ) from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as err:
        raise APIError(400, f"the request body is not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise APIError(
            400, f"the request body is a JSON {type(body).__name__}, not an object"
        )
    return body


def parse_request(
    kind: str, body: dict, model, tokenizer, model_id: str, defaults
) -> CompletionRequest:
    """Check a completion request and tokenize its prompt.

    Args:
        kind: "chat" (/v1/chat/completions) or "text" (/v1/completions).
        body: from `parse_body`.
        model: checks token ids and the context (`max_context`).
        tokenizer: renders and encodes the prompt.
        model_id: the one model served; `model` in the body must name it.
        defaults: the server's options (max_tokens, temp, top_p, system_prompt).

    Raises:
        APIError: naming the bad field.
    """
    name = _field(body, "model", str, None)
    if name is not None and name != model_id:
        raise APIError(
            404,
            f"the model {name!r} does not exist: this server serves {model_id!r}",
            "model",
            "model_not_found",
        )
    max_tokens = _field(body, "max_completion_tokens", int, None)
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", int, defaults.max_tokens)
    if max_tokens < 1:
        raise APIError(
            400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens"
        )
    temperature = float(_field(body, "temperature", float, defaults.temp))
    if not 0 <= temperature <= 2:
        raise APIError(
            400, f"temperature must be in 0..2, got {temperature}", "temperature"
        )
    top_p = float(_field(body, "top_p", float, defaults.top_p))
    if not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
    n = _field(body, "n", int, 1)
    if n != 1:
        raise APIError(400, f"n must be 1 (one choice per request), got {n}", "n")
    stop = _field(body, "stop", (str, list), None)
    stop = [stop] if isinstance(stop, str) else stop or []
    if not all(isinstance(s, str) for s in stop):
        raise APIError(400, "stop must be a string or a list of strings", "stop")
    seed = _field(body, "seed", int, None)
    if seed is not None and seed < 0:
        raise APIError(400, f"seed must be >= 0, got {seed}", "seed")
    options = _field(body, "stream_options", dict, None) or {}
    ids = (
        _chat_ids(body, tokenizer, defaults)
        if kind == "chat"
        else _text_ids(body, tokenizer)
    )
    _check_ids(ids, model, "messages" if kind == "chat" else "prompt")
    return CompletionRequest(
        kind=kind,
        ids=ids,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=stop,
        stream=_field(body, "stream", bool, False),
        include_usage=_field(options, "include_usage", bool, False),
    )


def _field(body: dict, name: str, kind, default):
    """body[name] when present and not null, checked against `kind` (int is not
    bool; a float field takes ints; numbers are finite)."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (
        isinstance(value, bool) and bool not in kinds
    )
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    if not ok:
        names = " or ".join(_JSON_NAMES[k] for k in kinds)
        raise APIError(
            400,
            f"{name} must be {names}, got {json.dumps(value)[:40]}",
            name,
            "invalid_type",
        )
    return value


_JSON_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list",
    dict: "an object",
}


def _chat_ids(body: dict, tokenizer, defaults) -> list[int]:
    messages = _field(body, "messages", list, None)
    if not messages:
        raise APIError(400, "messages must be a non-empty list", "messages")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object", where, "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise APIError(
                400,
                f"{where}.role must be one of {', '.join(ROLES)}, got "
                f"{json.dumps(role)}",
                f"{where}.role",
            )
        content = message.get("content")
        if isinstance(content, list):  # parts: only text ones here
            if not all(
                isinstance(p, dict)
                and p.get("type") == "text"
                and isinstance(p.get("text"), str)
                for p in content
            ):
                raise APIError(
                    400,
                    f"{where}.content: only text parts are supported",
                    f"{where}.content",
                )
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(
                400,
                f"{where}.content must be a string",
                f"{where}.content",
                "invalid_type",
            )
        checked.append(
            {"role": "system" if role == "developer" else role, "content": content}
        )
    if defaults.system_prompt and checked[0]["role"] != "system":
        checked.insert(0, {"role": "system", "content": defaults.system_prompt})
    try:
        return encode_chat(tokenizer, checked)
    except ValueError as err:  # the template refused them (roles out of order...)
        raise APIError(400, str(err), "messages") from None


def _text_ids(body: dict, tokenizer) -> list[int]:
    prompt = _field(body, "prompt", (str, list), None)
    if prompt is None:
        raise APIError(400, "prompt is required", "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise APIError(
            400,
            "prompt must be a string or a list of token ids (one prompt per request)",
            "prompt",
            "invalid_type",
        )
    return list(prompt)


def _check_ids(ids: list[int], model, param: str) -> None:
    if len(ids) > model.max_context:
        raise APIError(
            400,
            f"the prompt is {len(ids)} tokens, more than the context of "
            f"{model.max_context}",
            param,
            "context_length_exceeded",
        )
    try:
        model.check_tokens(ids)
    except ValueError as err:
        raise APIError(400, str(err), param) from None


# -- responses -------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion(
    request: CompletionRequest,
    model_id: str,
    text: str,
    finish_reason: str | None,
    usage_: dict,
    extra: dict,
) -> dict:
    """A whole (not streamed) response; `extra` goes under "flashinfer"."""
    if request.kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason,
            "logprobs": None,
        }
        obj = "chat.completion"
    else:
        choice, obj = _text_choice(text, finish_reason), "text_completion"
    return {
        "id": request.id,
        "object": obj,
        "created": request.created,
        "model": model_id,
        "choices": [choice],
        "usage": usage_,
        "flashinfer": extra,
    }


def _text_choice(text: str | None, finish_reason: str | None) -> dict:
    """A /v1/completions choice (whole or streamed: the same fields)."""
    return {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}


def chunk(
    request: CompletionRequest,
    model_id: str,
    text: str | None,
    finish_reason: str | None = None,
    role: bool = False,
) -> dict:
    """One server-sent event of a stream; text None gives an empty choice list (the
    usage chunk)."""
    if request.kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else {"content": text}
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice, obj = _text_choice(text, finish_reason), "text_completion"
    return {
        "id": request.id,
        "object": obj,
        "created": request.created,
        "model": model_id,
        "choices": [] if text is None and not role else [choice],
    }
