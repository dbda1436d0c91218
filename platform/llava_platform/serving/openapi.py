"""The serving API's OpenAPI description: request bodies and error responses of every route.

The routes read their raw bodies (to apply the JSON limits of `protocol.parse_json_body` before any
schema), so FastAPI cannot infer their request bodies; this module states them from the same
pydantic models that validate the requests, plus the OpenAI error body for each error status the
route can answer. Clients and the fuzz test (tests/serving/test_openai_features.py) read it at /openapi.json.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from llava_platform.serving.protocol import ChatCompletionRequest, ReloadRequest


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error body, for every 4xx and 5xx this API answers."""

    error: ErrorDetail


_ERRORS = {
    400: "invalid request (the message names the parameter)",
    401: "missing or invalid API key",
    403: "the key is not allowed to do this",
    404: "unknown model",
    405: "method not allowed (see the Allow header)",
    413: "request body or image too large",
    415: "Content-Type is not application/json",
    500: "the model failed while generating",
    503: "overloaded or reloading: retry after Retry-After seconds",
}
_CHAT_ERRORS = (400, 401, 404, 413, 415, 500, 503)
_OK_CHAT = {"description": "a chat.completion object, or with stream=true a text/event-stream of "
                           "chat.completion.chunk objects ending with [DONE]",
            "content": {"application/json": {"schema": {"type": "object"}},
                        "text/event-stream": {"schema": {"type": "string"}}}}

# path -> method -> (request body model, error statuses)
_ROUTES: dict[str, dict[str, tuple[type[BaseModel] | None, tuple[int, ...]]]] = {
    "/v1/chat/completions": {"post": (ChatCompletionRequest, _CHAT_ERRORS)},
    "/invocations": {"post": (ChatCompletionRequest, _CHAT_ERRORS)},
    "/admin/reload": {"post": (ReloadRequest, (400, 401, 403, 413, 415, 503))},
    "/v1/models": {"get": (None, (401,))},
    "/readyz": {"get": (None, (503,))},
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def build_schema(api: FastAPI) -> dict[str, Any]:
    schema = get_openapi(title=api.title, version=api.version, routes=api.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (ChatCompletionRequest, ReloadRequest, ErrorBody):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
    for path, methods in _ROUTES.items():
        for method, (body_model, errors) in methods.items():
            op = schema.get("paths", {}).get(path, {}).get(method)
            if op is None:  # a route this app does not mount
                continue
            if body_model is not None:
                op["requestBody"] = {"required": body_model is ChatCompletionRequest,
                                     "content": {"application/json": {"schema": _ref(body_model.__name__)}}}
            if path in ("/v1/chat/completions", "/invocations"):
                op["responses"]["200"] = _OK_CHAT
            for status in errors:
                op["responses"][str(status)] = {"description": _ERRORS[status],
                                                "content": {"application/json": {"schema": _ref("ErrorBody")}}}
    return schema


def describe_api(api: FastAPI) -> None:
    """Serve `build_schema` at /openapi.json (computed once, on first request)."""

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            api.openapi_schema = build_schema(api)
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
