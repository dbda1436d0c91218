"""The OpenAI chat-completions wire format: request schema, error bodies, response and chunk builders.

Unknown request fields are ignored (clients send optional OpenAI parameters we do not use), but
every field we do read is validated strictly (no "yes" for a boolean, no 2.0 for an integer), and a
failure names the offending parameter in `param` and pydantic's error type in the message (as
vLLM does, so clients and ported test suites can tell "too large" from "wrong type").

The body is parsed with limits of its own before any schema sees it: nesting depth, integer
length, no NaN/Infinity literals, no lone surrogates in strings. Python's `json` would otherwise
raise RecursionError or ValueError (a 500), or hand the tokenizer a string it cannot encode.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Temperatures in (0, MIN_TEMPERATURE) are refused: dividing logits by ~1e-38 overflows to inf and
# sampling turns NaN. 0 means greedy, as in the OpenAI API.
MIN_TEMPERATURE = 1e-3
MAX_TOP_LOGPROBS = 20  # OpenAI's and vLLM's limit
SEED_MIN = -(2**63)  # vLLM's range (a torch long); negative seeds map to torch's unsigned range
SEED_MAX = 2**63 - 1
MAX_JSON_DEPTH = 32  # a chat request nests about 6 deep
MAX_INT_DIGITS = 40  # seeds are 19 digits; anything longer is a typo or an attack


class APIError(Exception):
    """An error returned to the client as `{"error": {...}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageURL(_Lenient):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Lenient):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part] | None = None


class StreamOptions(_Lenient):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM's extension: usage on every chunk


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]


class ChatCompletionRequest(_Lenient):
    model: str | None = None  # as in vLLM, left out (or empty) means the served model
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0)  # vLLM's extension: no end-of-sequence before this many tokens
    temperature: Temperature | None = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = 1.0
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: only allowed when logprobs is true")
        if self.temperature is not None and 0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature: must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling_temperature(self) -> float:
        return 1.0 if self.temperature is None else self.temperature

    def sampling_top_p(self) -> float:
        return 1.0 if self.top_p is None else self.top_p

    def choices(self) -> int:
        return self.n or 1

    def wants_logprobs(self) -> int | None:
        """None without logprobs, else how many alternatives per token (top_logprobs, default 0)."""
        return (self.top_logprobs or 0) if self.logprobs else None


# --------------------------------------------------------------------------------------------- parsing


def _reject_constant(name: str) -> Any:
    raise APIError(400, f"request body is not valid JSON: {name} is not a JSON number", code="invalid_json")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise APIError(400, f"request body has an integer of {len(text)} digits; at most {MAX_INT_DIGITS}",
                       code="invalid_json")
    return int(text)


def _check_tree(data: Any) -> None:
    """Depth limit and UTF-8-encodable strings, walked iteratively (no recursion to exhaust)."""
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
        if isinstance(node, str):
            _check_text(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                _check_text(key)
                stack.append((value, depth + 1))
        elif isinstance(node, list):
            stack.extend((value, depth + 1) for value in node)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "request body has a string with a lone surrogate (not valid Unicode text)",
                       code="invalid_json") from None


def parse_json_body(raw: bytes) -> Any:
    """JSON with the limits above; any failure is a 400 APIError, never an exception of `json`'s."""
    try:
        data = json.loads(raw, parse_int=_parse_int, parse_constant=_reject_constant)
    except APIError:
        raise
    except RecursionError:
        raise APIError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json") from None
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise APIError(400, f"request body is not valid JSON: {err}", code="invalid_json") from None
    _check_tree(data)
    return data


def validation_error(err: ValidationError) -> APIError:
    first = err.errors()[0]
    # Drop the union-branch labels pydantic inserts (e.g. "list[...]"), keep field names/indices.
    loc = [str(p) for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p in ("str", "none")))]
    param = ".".join(loc) or None
    msg = first["msg"].removeprefix("Value error, ")
    if param is None and first["type"] == "value_error":  # a cross-field rule names its field first
        param = msg.split(":", 1)[0]
    return APIError(400, f"invalid request: {param or 'body'}: {msg} (type={first['type']})", param=param,
                    code="invalid_value")


def parse_request(raw: bytes) -> ChatCompletionRequest:
    data = parse_json_body(raw)
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return ChatCompletionRequest.model_validate(data, strict=True)
    except ValidationError as err:
        raise validation_error(err) from None


class ReloadRequest(BaseModel):
    """Body of POST /admin/reload; an empty body re-resolves the served URI."""

    model_config = ConfigDict(extra="forbid")
    model_uri: str | None = Field(None, min_length=1, max_length=2048)
    force: bool = False


def parse_reload_body(raw: bytes) -> ReloadRequest:
    data = parse_json_body(raw) if raw.strip() else {}
    if not isinstance(data, dict):
        raise APIError(400, 'reload body must be a JSON object, e.g. {"model_uri": "models:/llava@champion"}',
                       code="invalid_json")
    try:
        return ReloadRequest.model_validate(data, strict=True)
    except ValidationError as err:
        raise validation_error(err) from None


# --------------------------------------------------------------------------------------------- responses


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprobs_body(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    return None if entries is None else {"content": entries, "refusal": None}


def _message(text: str) -> dict[str, Any]:
    # Every field of the OpenAI message object, so a client's parsed view equals the raw body.
    return {"content": text, "refusal": None, "role": "assistant", "annotations": None, "audio": None,
            "function_call": None, "tool_calls": None}


def completion_body(cid: str, model: str, fingerprint: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """One response for the n answers of a request (they share the prompt, so its tokens count once)."""
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
        "service_tier": None,
        "metadata": None,
        "moderation": None,
        "choices": [{
            "index": i,
            "message": _message(res["text"]),
            "finish_reason": res["finish_reason"],
            "logprobs": logprobs_body(res.get("logprobs")),
        } for i, res in enumerate(results)],
        "usage": usage(results[0]["prompt_tokens"], sum(r["completion_tokens"] for r in results)),
    }


def chunk_body(cid: str, model: str, fingerprint: str, delta: dict[str, Any], finish_reason: str | None,
               created: int, *, index: int = 0, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason,
                     "logprobs": logprobs_body(logprobs)}],
    }


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
