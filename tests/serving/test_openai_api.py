"""The served API through the unmodified `openai` client and raw HTTP: answers, bad input, load,
overload and a hot reload, all against one real Ray Serve app (module fixture)."""

from __future__ import annotations

import asyncio
import shutil
import time

import httpx
import openai
import pytest
from PIL import Image

from tests.serving.conftest import data_url, image_message


def _auth(app) -> dict[str, str]:
    return {"Authorization": f"Bearer {app['key']}"}


def _valid(content, max_tokens: int = 8) -> dict:
    return {"model": "llava", "messages": content, "max_tokens": max_tokens, "temperature": 0}


def _post(app, body=None, *, content: bytes | None = None, headers=None) -> httpx.Response:
    hdrs = _auth(app) | (headers or {})
    return httpx.post(f"{app['url']}/v1/chat/completions", json=body, content=content, headers=hdrs, timeout=60)


def _still_healthy(app) -> None:
    assert httpx.get(f"{app['url']}/healthz", timeout=10).status_code == 200
    ok = _post(app, _valid([{"role": "user", "content": "hello"}], 2))
    assert ok.status_code == 200, ok.text


# ------------------------------------------------------------------------------------------ happy path


def test_openai_client_non_streaming_with_image(serve_app):
    client = openai.OpenAI(base_url=f"{serve_app['url']}/v1", api_key=serve_app["key"], max_retries=0)
    out = client.chat.completions.create(
        model="llava", messages=image_message("What colour is the shape?"), max_tokens=12, temperature=0
    )
    choice = out.choices[0]
    assert isinstance(choice.message.content, str) and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    # The image's feature tokens are part of the prompt count (tiny CLIP: 16 patches).
    assert out.usage.prompt_tokens > 16
    assert out.system_fingerprint.startswith("llava-")


def test_openai_client_streaming_matches_non_streaming(serve_app):
    client = openai.OpenAI(base_url=f"{serve_app['url']}/v1", api_key=serve_app["key"], max_retries=0)
    messages = image_message("Describe the picture.", colour=(30, 200, 90), size=(64, 40))
    ref = client.chat.completions.create(model="llava", messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(
        model="llava", messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == ref.choices[0].message.content
    assert finishes == [ref.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == ref.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == ref.usage.prompt_tokens


def _gauge(app, name: str) -> float:
    text = httpx.get(f"{app['url']}/metrics", timeout=10).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_disconnected_stream_leaves_the_running_batch(serve_app):
    """The engine gauges show the stream's row while it decodes; closing the connection mid-stream
    takes the row out of the batch well before its 256 tokens could have been decoded for nobody."""
    messages = [{"role": "user", "content": "describe everything at length"}]
    started = time.monotonic()
    whole = _post(serve_app, _valid(messages, 256)).json()
    full_s = time.monotonic() - started
    assert whole["usage"]["completion_tokens"] == 256, "needs a prompt that decodes the whole budget"
    body = _valid(messages, 256) | {"stream": True}
    with httpx.stream("POST", f"{serve_app['url']}/v1/chat/completions", json=body, headers=_auth(serve_app),
                      timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        next(line for line in lines if line.startswith("data: ") and '"content"' in line)
        assert _gauge(serve_app, "llava_engine_decoding") == 1.0
        closed = time.monotonic()
    while _gauge(serve_app, "llava_engine_decoding") != 0.0:
        assert time.monotonic() - closed < full_s / 2, "the disconnected stream kept decoding"
        time.sleep(0.01)
    assert _gauge(serve_app, "llava_engine_waiting") == 0.0
    _still_healthy(serve_app)


def test_raw_sse_framing_ends_with_done(serve_app):
    body = _valid([{"role": "user", "content": "two red circles"}], 6) | {"stream": True}
    with httpx.stream("POST", f"{serve_app['url']}/v1/chat/completions", json=body, headers=_auth(serve_app),
                      timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_stop_and_seed_parameters(serve_app):
    client = openai.OpenAI(base_url=f"{serve_app['url']}/v1", api_key=serve_app["key"], max_retries=0)
    msgs = [{"role": "user", "content": "how many squares are there"}]
    full = client.chat.completions.create(model="llava", messages=msgs, max_tokens=20, temperature=0)
    text = full.choices[0].message.content
    if len(text) >= 6:
        cut = client.chat.completions.create(model="llava", messages=msgs, max_tokens=20, temperature=0,
                                             stop=[text[3:6]])
        assert cut.choices[0].message.content == text[: text.find(text[3:6])]
        assert cut.choices[0].finish_reason == "stop"
    a, b = (client.chat.completions.create(model="llava", messages=msgs, max_tokens=12, temperature=1.0,
                                           top_p=0.9, seed=11) for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content


def test_models_probes_and_metrics(serve_app):
    client = openai.OpenAI(base_url=f"{serve_app['url']}/v1", api_key=serve_app["key"], max_retries=0)
    assert [m.id for m in client.models.list().data] == ["llava"]
    ready = httpx.get(f"{serve_app['url']}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    metrics = httpx.get(f"{serve_app['url']}/metrics", timeout=10).text
    assert 'llava_requests_total{status="200"' in metrics
    assert "llava_completion_tokens_total" in metrics


# ------------------------------------------------------------------------------------------ bad input

BOMB = Image.new("1", (3000, 3000))  # 9 MP > the 4 MP test limit, a few KB as PNG
NOT_IMAGE = "data:image/png;base64," + __import__("base64").b64encode(b"definitely not a png").decode()


def _img_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


BAD_REQUESTS = {
    "invalid_json": (dict(content=b'{"model": "llava", "messages": [', headers={"content-type": "application/json"}),
                     400, "invalid_json"),
    "not_an_object": (dict(content=b"[1, 2]", headers={"content-type": "application/json"}), 400, "invalid_json"),
    "missing_messages": (dict(body={"model": "llava"}), 400, "invalid_value"),
    "bad_role": (dict(body={"model": "llava", "messages": [{"role": "robot", "content": "x"}]}), 400, "invalid_value"),
    "temperature_range": (dict(body=_valid([{"role": "user", "content": "x"}]) | {"temperature": 9}), 400,
                          "invalid_value"),
    "unknown_part": (dict(body=_valid([{"role": "user", "content": [{"type": "audio", "x": 1}]}])), 400,
                     "invalid_value"),
    "bad_base64": (dict(body=_valid([{"role": "user", "content": [_img_part("data:image/png;base64,@@@not-b64@@")]}])),
                   400, "invalid_base64"),
    "not_an_image": (dict(body=_valid([{"role": "user", "content": [_img_part(NOT_IMAGE)]}])), 400, "invalid_image"),
    "decompression_bomb": (dict(body=_valid([{"role": "user", "content": [_img_part(data_url(BOMB))]}])), 400,
                           "image_too_large"),
    "too_many_images": (dict(body=_valid([{"role": "user", "content": [
        _img_part(data_url(Image.new("RGB", (8, 8)))) for _ in range(3)]}])), 400, "too_many_images"),
    "remote_url_disabled": (dict(body=_valid([{"role": "user", "content": [
        _img_part("http://127.0.0.1:1/x.png")]}])), 400, "remote_images_disabled"),
    "context_length": (dict(body=_valid([{"role": "user", "content": "red blue green " * 400}])), 400,
                       "context_length_exceeded"),
    "max_tokens_zero": (dict(body=_valid([{"role": "user", "content": "x"}], 0)), 400, "invalid_value"),
    "max_tokens_huge": (dict(body=_valid([{"role": "user", "content": "x"}], 100_000)), 400, "invalid_value"),
    "unknown_model": (dict(body={"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}), 404,
                      "model_not_found"),
    "body_too_large": (dict(body=_valid([{"role": "user", "content": "x" * 2_100_000}])), 413, "request_too_large"),
    "no_api_key": (dict(body=_valid([{"role": "user", "content": "x"}]), headers={"Authorization": ""}), 401,
                   "invalid_api_key"),
    "wrong_api_key": (dict(body=_valid([{"role": "user", "content": "x"}]),
                           headers={"Authorization": "Bearer nope"}), 401, "invalid_api_key"),
    "bad_turn_order": (dict(body=_valid([{"role": "assistant", "content": "hi"}])), 400, "invalid_messages"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_openai_error_and_server_stays_healthy(serve_app, case):
    kwargs, status, code = BAD_REQUESTS[case]
    resp = _post(serve_app, **kwargs)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["message"]
    assert serve_app["key"] not in resp.text
    _still_healthy(serve_app)


def test_bad_input_in_a_stream_request_is_a_4xx_not_a_broken_stream(serve_app):
    body = _valid([{"role": "user", "content": "red " * 1200}]) | {"stream": True}
    resp = _post(serve_app, body)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"


def test_openai_client_raises_typed_errors(serve_app):
    client = openai.OpenAI(base_url=f"{serve_app['url']}/v1", api_key=serve_app["key"], max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{serve_app['url']}/v1", api_key="wrong", max_retries=0).models.list()


# ------------------------------------------------------------------------------------------ load


async def _fire(app, n: int, concurrency: int, max_tokens: int, stream_every: int = 0) -> list[tuple[int, dict]]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120, headers=_auth(app),
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def one(i: int) -> tuple[int, dict]:
            msgs = image_message(f"question {i}", colour=(i % 255, 80, 160)) if i % 2 else \
                [{"role": "user", "content": f"how many circles {i}"}]
            body = {"model": "llava", "messages": msgs, "max_tokens": max_tokens, "temperature": 0.7, "top_p": 0.9}
            async with sem:
                r = await client.post(f"{app['url']}/v1/chat/completions", json=body)
            return r.status_code, (r.json() if r.headers.get("content-type", "").startswith("application/json")
                                   else {"raw": r.text}) | {"_retry_after": r.headers.get("retry-after")}

        return await asyncio.gather(*(one(i) for i in range(n)))


def _well_formed(body: dict, max_tokens: int) -> bool:
    choice = body["choices"][0]
    u = body["usage"]
    return (isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
            and 0 < u["completion_tokens"] <= max_tokens and u["total_tokens"] == u["prompt_tokens"]
            + u["completion_tokens"] and body["object"] == "chat.completion")


def test_load_200_requests_at_concurrency_16(serve_app):
    results = asyncio.run(_fire(serve_app, 200, 16, 12))
    statuses = [s for s, _ in results]
    assert statuses.count(200) == 200, sorted(set(statuses))
    assert all(_well_formed(b, 12) for _, b in results)
    # Dynamic batching actually happened.
    metrics = httpx.get(f"{serve_app['url']}/metrics", timeout=10).text
    big_batches = [line for line in metrics.splitlines() if line.startswith('llava_batch_size_bucket{le="1.0"}')]
    count = [line for line in metrics.splitlines() if line.startswith("llava_batch_size_count")]
    assert float(big_batches[0].split()[-1]) < float(count[0].split()[-1])


def test_overload_returns_503_with_retry_after_then_recovers(serve_app):
    # 16 ongoing + 24 queued fit; 150 at once cannot.
    results = asyncio.run(_fire(serve_app, 150, 150, 64))
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    rejected = [b for s, b in results if s == 503]
    assert rejected, "expected back-pressure rejections"
    # Serve's proxy refuses what the replica and its queue cannot hold, before it costs any memory.
    assert all(b["_retry_after"] == "2" for b in rejected)
    assert all(_well_formed(b, 64) for s, b in results if s == 200)
    _still_healthy(serve_app)


# ------------------------------------------------------------------------------------------ reload


def _llavactl(argv: list[str]) -> int:
    """The `llavactl` parser with the serving command groups (independent of other groups' modules)."""
    import argparse

    from llava_platform.commands import chat, serve

    parser = argparse.ArgumentParser(prog="llavactl")
    sub = parser.add_subparsers(dest="command", required=True)
    serve.register(sub)
    chat.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_promotion_then_reload_serves_the_new_champion(serve_app, monkeypatch, capsys):
    url, client, name = serve_app["url"], serve_app["registry"], serve_app["name"]
    monkeypatch.setenv("LLAVA_TEST_KEY", serve_app["admin_key"])
    before = httpx.get(f"{url}/v1/models", headers=_auth(serve_app), timeout=10).json()["data"][0]
    assert before["root"] == f"models:/{name}@champion"
    client.set_registered_model_alias(name, "champion", serve_app["versions"][1])  # the promotion
    assert _llavactl(["serve", "reload", "--address", url, "--admin-key-env", "LLAVA_TEST_KEY"]) == 0
    assert "switched" in capsys.readouterr().out
    after = httpx.get(f"{url}/v1/models", headers=_auth(serve_app), timeout=10).json()["data"][0]
    assert after["version"] != before["version"] and after["root"] == before["root"]
    resp = _post(serve_app, _valid([{"role": "user", "content": "hi"}], 2))
    assert resp.status_code == 200 and resp.json()["system_fingerprint"] == f"llava-{after['version']}"


def test_reload_under_load_switches_version_without_failures(serve_app, tmp_path, monkeypatch):
    url = serve_app["url"]
    before = httpx.get(f"{url}/v1/models", headers=_auth(serve_app), timeout=10).json()["data"][0]["version"]
    new_dir = tmp_path / "champion-v2"
    shutil.copytree(serve_app["model_dir"], new_dir)
    monkeypatch.setenv("LLAVA_TEST_KEY", serve_app["admin_key"])

    async def scenario():
        # Keep 8 requests in flight from before the reload until after it returned.
        results: list[tuple[int, dict]] = []
        done = asyncio.Event()

        async def worker():
            extra = 0
            while extra < 3:
                results.extend(await _fire(serve_app, 1, 1, 16))
                extra += done.is_set()

        workers = [asyncio.create_task(worker()) for _ in range(8)]
        await asyncio.sleep(0.5)
        rc = await asyncio.to_thread(
            _llavactl, ["serve", "reload", "--address", url, "--model", str(new_dir), "--admin-key-env", "LLAVA_TEST_KEY"]
        )
        done.set()
        await asyncio.gather(*workers)
        return rc, results

    rc, results = asyncio.run(scenario())
    assert rc == 0
    assert [s for s, _ in results].count(200) == len(results), sorted({s for s, _ in results})
    assert all(_well_formed(b, 16) for _, b in results)
    after = httpx.get(f"{url}/v1/models", headers=_auth(serve_app), timeout=10).json()["data"][0]
    assert after["version"] != before and after["root"] == str(new_dir)
    # Requests before the swap were answered by the old model, those after it by the new one.
    assert {b["system_fingerprint"] for _, b in results} == {f"llava-{before}", f"llava-{after['version']}"}


def test_reload_without_change_is_a_no_op_and_bad_uri_is_a_4xx(serve_app, monkeypatch, capsys):
    monkeypatch.setenv("LLAVA_TEST_KEY", serve_app["admin_key"])
    argv = ["serve", "reload", "--address", serve_app["url"], "--admin-key-env", "LLAVA_TEST_KEY"]
    assert _llavactl(argv) == 0
    assert "unchanged" in capsys.readouterr().out
    assert _llavactl(argv + ["--model", "/does/not/exist"]) == 1
    assert "HTTP 400" in capsys.readouterr().err
    monkeypatch.delenv("LLAVA_TEST_KEY")
    assert _llavactl(argv) == 1  # no key -> 401
    _still_healthy(serve_app)


def test_the_inference_key_cannot_reload(serve_app):
    resp = httpx.post(f"{serve_app['url']}/admin/reload", json={}, headers=_auth(serve_app), timeout=30)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_admin_key", resp.text


def test_llavactl_chat_with_image(serve_app, tmp_path, monkeypatch, capsys):
    image = tmp_path / "shape.png"
    Image.new("RGB", (40, 30), (0, 0, 255)).save(image)
    monkeypatch.setenv("LLAVA_API_KEY", serve_app["key"])
    outputs = []
    for extra in ([], ["--stream"]):
        rc = _llavactl(["chat", "--image", str(image), "What colour?", "--url", serve_app["url"], "--max-tokens", "8",
                        *extra])
        assert rc == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]  # greedy: streamed == non-streamed
    assert _llavactl(["chat", "--image", str(tmp_path / "missing.png"), "q", "--url", serve_app["url"]]) == 2
