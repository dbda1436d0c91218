"""A bounded fuzz of the chat API from its own OpenAPI description: every answer is < 500, none
hangs, and the server answers a normal request afterwards.

Bodies come from the request schema at /openapi.json (hypothesis-jsonschema), so they are shaped
like real requests with extreme values; arbitrary JSON values and mutated bodies cover what the
schema does not allow. Token budgets are capped so the fuzz measures robustness, not decoding time.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

EXAMPLES = 30  # per strategy, 90 requests in all (120 took 65 s at a load average of ~50)


@pytest.fixture(scope="module")
def chat_schema(serve_app) -> dict:
    spec = httpx.get(f"{serve_app['url']}/openapi.json", timeout=10).json()
    # A schema document whose refs resolve against itself.
    return {"$ref": "#/components/schemas/ChatCompletionRequest", "components": spec["components"]}


def _cap(body):
    """Small token budgets and answer counts, whatever else the body holds."""
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and not isinstance(body.get(key), bool):
                body[key] = max(min(body[key], 3), -3)
        body.setdefault("max_tokens", 2)
        if isinstance(body.get("n"), int) and not isinstance(body.get("n"), bool):
            body["n"] = min(body["n"], 3)
        body["stream"] = body.get("stream") is True and isinstance(body.get("stream"), bool)
    return body


def _send(app, client: httpx.Client, body) -> None:
    # json.dumps spells inf and nan as Infinity/NaN (not JSON) and escapes lone surrogates: both
    # are malformed input the server must refuse with a 400.
    resp = client.post(f"{app['url']}/v1/chat/completions", content=json.dumps(body).encode(),
                       headers={"Content-Type": "application/json"})
    assert resp.status_code < 500, (body, resp.status_code, resp.text[:300])
    if resp.status_code >= 400:
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


def _healthy(app) -> None:
    ok = httpx.post(f"{app['url']}/v1/chat/completions", headers={"Authorization": f"Bearer {app['key']}"},
                    json={"model": "llava", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                    timeout=30)
    assert ok.status_code == 200, ok.text


FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


def test_fuzz_from_the_openapi_schema(serve_app, chat_schema):
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {serve_app['key']}"}) as client:
        @FUZZ
        @given(from_schema(chat_schema))
        def schema_shaped(body):
            _send(serve_app, client, _cap(body))

        @FUZZ
        @given(from_schema(chat_schema), st.sampled_from(["model", "messages", "n", "seed", "temperature", "stop",
                                                          "logit_bias", "stream_options", "top_logprobs"]), JSON)
        def mutated(body, key, value):
            body[key] = value
            _send(serve_app, client, _cap(body))

        @FUZZ
        @given(JSON)
        def arbitrary(body):
            _send(serve_app, client, _cap(body))

        schema_shaped()
        mutated()
        arbitrary()
    _healthy(serve_app)
