"""OpenAI features as clients use them (logprobs, n, logit_bias, stream_options, strict types,
max_completion_tokens, /invocations, Allow on 405, the OpenAPI description), and a regression test
for each way a request used to hurt the server or other requests, and a bounded fuzz of the chat API
from its own OpenAPI description (every answer < 500, none hangs, healthy after): one real Serve app.

The fuzz bodies come from the request schema at /openapi.json (hypothesis-jsonschema), so they are
shaped like real requests with extreme values; arbitrary JSON values and mutated bodies cover what
the schema does not allow. Token budgets are capped so the fuzz measures robustness, not decoding.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from PIL import Image

from tests.serving.conftest import image_message

QUESTION = [{"role": "user", "content": "how many circles are there"}]


def _client(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app['url']}/v1", api_key=app["key"], max_retries=0)


def _post(app, body, *, path="/v1/chat/completions", headers=None, content=None) -> httpx.Response:
    hdrs = {"Authorization": f"Bearer {app['key']}"} | (headers or {})
    return httpx.post(f"{app['url']}{path}", json=body if content is None else None, content=content,
                      headers=hdrs, timeout=60)


def _still_healthy(app) -> None:
    ok = _post(app, {"model": "llava", "messages": QUESTION, "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200, ok.text


def test_logprobs_and_top_logprobs(serve_app):
    client = _client(serve_app)
    none = client.chat.completions.create(model="llava", messages=QUESTION, max_completion_tokens=5,
                                          temperature=0, logprobs=False)
    assert none.choices[0].logprobs is None
    zero = client.chat.completions.create(model="llava", messages=QUESTION, max_completion_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=0)
    assert zero.choices[0].logprobs.content and zero.choices[0].logprobs.content[0].top_logprobs == []
    five = client.chat.completions.create(model="llava", messages=image_message("what colour"),
                                          max_completion_tokens=5, temperature=0, logprobs=True, top_logprobs=5)
    content = five.choices[0].logprobs.content
    assert len(content) == five.usage.completion_tokens
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True) and all(v <= 0 for v in tops)
        assert entry.logprob == pytest.approx(tops[0], abs=1e-4)  # greedy picks the most likely token
    assert "".join(e.token for e in content).strip() == five.choices[0].message.content.strip()
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError):
            out = client.chat.completions.create(model="llava", messages=QUESTION, max_completion_tokens=5,
                                                 logprobs=True, top_logprobs=21, stream=stream)
            list(out)


def test_n_answers_share_a_prompt(serve_app):
    client = _client(serve_app)
    out = client.chat.completions.create(model="llava", messages=QUESTION, max_completion_tokens=12,
                                         temperature=1.0, n=3, seed=5)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.message.content for c in out.choices}) > 1, "three samples, one answer"
    single = client.chat.completions.create(model="llava", messages=QUESTION, max_completion_tokens=12)
    assert out.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    stream = client.chat.completions.create(model="llava", messages=QUESTION, max_completion_tokens=8,
                                            temperature=0.7, n=2, stream=True)
    texts, finishes = {0: "", 1: ""}, {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert all(texts.values()) and set(finishes) == {0, 1}


def test_streaming_last_chunk_carries_text_and_usage_options(serve_app):
    client = _client(serve_app)
    ref = client.chat.completions.create(model="llava", messages=QUESTION, max_completion_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="llava", messages=QUESTION, max_completion_tokens=10,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks].count(None) == len(chunks) - 1
    assert chunks[-1].choices[0].finish_reason == ref.choices[0].finish_reason
    assert chunks[-1].choices[0].delta.content, "the last chunk carries the last text with its finish reason"
    assert "".join(c.choices[0].delta.content for c in chunks) == ref.choices[0].message.content
    assert all(c.usage is None for c in chunks)
    running = list(client.chat.completions.create(
        model="llava", messages=QUESTION, max_completion_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in running]
    assert {c.usage.prompt_tokens for c in running} == {ref.usage.prompt_tokens}
    assert counts == sorted(counts) and counts[-1] == ref.usage.completion_tokens and running[-1].choices == []
    for options in ({"include_usage": True}, {"include_usage": None}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="llava", messages=QUESTION, stream=False, stream_options=options)


def test_logit_bias_and_min_tokens(serve_app):
    client = _client(serve_app)
    plain = client.chat.completions.create(model="llava", messages=QUESTION, max_completion_tokens=6,
                                           temperature=0, logprobs=True)
    first = plain.choices[0].logprobs.content[0]
    forced = _post(serve_app, {"model": "llava", "messages": QUESTION, "max_tokens": 6, "temperature": 0,
                               "logprobs": True, "logit_bias": {"7": 100}}).json()
    tokens = {e["token"] for e in forced["choices"][0]["logprobs"]["content"]}
    assert len(tokens) == 1 and tokens != {first.token}, "a +100 bias must pick the biased token every step"
    for bias in ({"999999": 1}, {"x": 1}, {"7": 101}):
        resp = _post(serve_app, {"model": "llava", "messages": QUESTION, "logit_bias": bias})
        assert resp.status_code == 400 and resp.json()["error"]["param"].startswith("logit_bias"), resp.text


def test_response_format_json_object_answers_json(serve_app):
    client = _client(serve_app)
    for temperature in (0, 0.8):
        out = client.chat.completions.create(model="llava", messages=QUESTION, max_completion_tokens=200,
                                             temperature=temperature, response_format={"type": "json_object"})
        assert out.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(out.choices[0].message.content), dict), out.choices[0].message.content
    text = client.chat.completions.create(model="llava", messages=QUESTION, max_completion_tokens=5,
                                          response_format={"type": "text"})
    assert text.choices[0].message.content is not None


def test_max_completion_tokens_invocations_and_model_default(serve_app):
    body = {"model": "llava", "messages": QUESTION, "max_completion_tokens": 3, "temperature": 0}
    chat = _post(serve_app, body).json()
    assert chat["usage"]["completion_tokens"] <= 3
    inv = _post(serve_app, body, path="/invocations").json()
    assert inv["choices"] == chat["choices"] and inv.keys() == chat.keys()
    parsed = _client(serve_app).chat.completions.create(**body)
    assert parsed.model_dump()["choices"] == chat["choices"]  # every field of the OpenAI objects is there
    nameless = _post(serve_app, {"messages": QUESTION, "max_tokens": 2})
    assert nameless.status_code == 200 and nameless.json()["model"] == "llava"


# -------------------------------------------------------------------------- strictness and error bodies


def _png(size) -> str:
    buf = io.BytesIO()
    Image.new("1", size).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


STRICT_CASES = {
    "stream_as_string": ({"stream": "yes"}, "stream"),
    "logprobs_as_int": ({"logprobs": 1}, "logprobs"),
    "n_as_float": ({"n": 2.0}, "n"),
    "n_too_many": ({"n": 99}, "n"),
    "top_logprobs_without_logprobs": ({"top_logprobs": 2}, "top_logprobs"),
    "seed_too_large": ({"seed": 2**63}, "seed"),
    "seed_too_small": ({"seed": -(2**63) - 1}, "seed"),
    "temperature_denormal": ({"temperature": 5e-324}, "temperature"),
    "temperature_tiny": ({"temperature": 1e-40}, "temperature"),
    "top_p_zero": ({"top_p": 0}, "top_p"),
    "response_format_json_schema": ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
                                    "response_format"),
    "response_format_unknown": ({"response_format": {"type": "xml"}}, "response_format.type"),
    "min_tokens_over_max": ({"min_tokens": 50, "max_tokens": 5}, "min_tokens"),
}


@pytest.mark.parametrize("case", list(STRICT_CASES))
def test_strict_parameters_are_400_naming_the_parameter(serve_app, case):
    extra, param = STRICT_CASES[case]
    resp = _post(serve_app, {"model": "llava", "messages": QUESTION, "max_tokens": 4} | extra)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param, resp.text


def test_out_of_range_seed_names_the_bound(serve_app):
    for seed in (2**63, -(2**63) - 1):
        with pytest.raises(openai.BadRequestError) as err:
            _client(serve_app).chat.completions.create(model="llava", messages=QUESTION, temperature=0, seed=seed)
        assert "less_than_equal" in err.value.message or "greater_than_equal" in err.value.message


MALFORMED = {
    "deep_json": b'{"model": "llava", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "long_integer": b'{"model": "llava", "messages": [], "seed": ' + b"9" * 5000 + b"}",
    "nan_literal": b'{"model": "llava", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
    "huge_float": b'{"model": "llava", "messages": [{"role": "user", "content": "x"}], "temperature": 1e999}',
    "lone_surrogate": b'{"model": "llava", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
    "not_utf8": b'{"model": "llava", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
    "not_an_object": b"[1, 2]",
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_bodies_are_400_with_the_openai_error_body(serve_app, case):
    resp = _post(serve_app, None, content=MALFORMED[case], headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_content_type_405_allow_and_openapi(serve_app):
    body = json.dumps({"model": "llava", "messages": QUESTION}).encode()
    wrong = _post(serve_app, None, content=body, headers={"Content-Type": "text/plain"})
    assert wrong.status_code == 415 and wrong.json()["error"]["code"] == "unsupported_media_type"
    get = httpx.get(f"{serve_app['url']}/v1/chat/completions", timeout=10)
    assert get.status_code == 405 and "POST" in get.headers["allow"]
    spec = httpx.get(f"{serve_app['url']}/openapi.json", timeout=10).json()
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert {"400", "401", "404", "413", "415", "503"} <= set(chat["responses"])
    props = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "logprobs", "top_logprobs", "n", "logit_bias", "response_format", "seed"} <= set(props)


def test_padded_size_limit_refuses_a_tiny_file_of_a_huge_image(serve_app):
    for size in ((12000, 1), (100000, 1)):
        started = time.monotonic()
        resp = _post(serve_app, {"model": "llava", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _png(size)}}, {"type": "text", "text": "x"}]}]})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "image_too_large", resp.text
        assert "square" in resp.json()["error"]["message"] and time.monotonic() - started < 2


def test_reload_body_is_validated_and_paths_are_not_echoed(serve_app):
    admin = {"Authorization": f"Bearer {serve_app['admin_key']}"}
    for raw in (b"[]", b'"x"', b'{"model_uri": 5}', b'{"model_uri": "/x", "force": "yes"}', b'{"other": 1}'):
        resp = httpx.post(f"{serve_app['url']}/admin/reload", content=raw, timeout=30,
                          headers=admin | {"Content-Type": "application/json"})
        assert resp.status_code == 400, (raw, resp.text)
    bad = httpx.post(f"{serve_app['url']}/admin/reload", json={"model_uri": "/nowhere/model"}, headers=admin,
                     timeout=30)
    assert bad.status_code == 400
    assert str(serve_app["model_dir"]) not in bad.text and "model-cache" not in bad.text
    _still_healthy(serve_app)


# -------------------------------------------------------------------------- one request never hurts others


POISON = [
    {"temperature": 1e-40}, {"temperature": 5e-324}, {"seed": 2**64}, {"seed": -(2**63) - 1},
    {"seed": 2**64, "temperature": 0.7}, {"top_p": 1e-320, "temperature": 0.5}, {"logit_bias": {"0": 1e308}},
    {"max_tokens": 10**30}, {"n": 0}, {"top_logprobs": 10**6, "logprobs": True},
]


def test_poisoned_requests_leave_live_streams_intact(serve_app):
    async def scenario():
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {serve_app['key']}"}) as http:
            async def stream() -> tuple[str, str | None]:
                body = {"model": "llava", "messages": QUESTION, "max_tokens": 48, "temperature": 0.8, "seed": 1,
                        "stream": True}
                text, finish = "", None
                async with http.stream("POST", f"{serve_app['url']}/v1/chat/completions", json=body) as resp:
                    assert resp.status_code == 200
                    async for line in resp.aiter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            assert "error" not in chunk, chunk
                            text += chunk["choices"][0]["delta"].get("content") or ""
                            finish = chunk["choices"][0]["finish_reason"] or finish
                return text, finish

            async def poison(extra: dict) -> int:
                await asyncio.sleep(0.3)  # while the streams decode
                body = {"model": "llava", "messages": QUESTION, "max_tokens": 8} | extra
                return (await http.post(f"{serve_app['url']}/v1/chat/completions", json=body)).status_code

            streams = [asyncio.create_task(stream()) for _ in range(3)]
            statuses = await asyncio.gather(*(poison(p) for p in POISON))
            return await asyncio.gather(*streams), statuses

    streams, statuses = asyncio.run(scenario())
    assert all(s < 500 for s in statuses) and statuses.count(200) <= 1, statuses  # only the tiny top_p is valid
    assert all(finish in ("stop", "length") and text for text, finish in streams), streams
    metrics = httpx.get(f"{serve_app['url']}/metrics", timeout=10).text
    assert 'llava_engine_failures{kind="step"}' not in metrics  # nothing reached the engine loop's last resort
    _still_healthy(serve_app)


# -------------------------------------------------------------------------- fuzz

EXAMPLES = 30  # per strategy, 90 requests in all: 13 s (load average ~40)


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
