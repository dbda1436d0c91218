"""The teacher HTTP client against a real HTTP server on loopback: retries, back-off, limits, auth."""

from __future__ import annotations

import asyncio

import pytest

from llava.datagen.prompts import DEFAULT_PROMPT_DIR, build_messages, load_prompt_dir
from llava_platform.teacher_client import TeacherClient, TeacherError, TeacherSettings, retry_after_seconds
from tests.datagen.teacher_server import TeacherServer

PROMPTS = load_prompt_dir(DEFAULT_PROMPT_DIR)
RECORD = {"id": "r1", "captions": ["A red ball on grass.", "A ball.", "Grass.", "Red ball.", "Ball on grass."],
          "instances": [{"category": "sports ball", "bbox": [0.1, 0.2, 0.3, 0.4]}]}


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("TEACHER_TEST_KEY", "sk-test")
    with TeacherServer(system_to_type={p.system_message: t for t, p in PROMPTS.items()}) as srv:
        yield srv


def _client(server: TeacherServer, delays: list[float] | None = None, **overrides) -> TeacherClient:
    settings = dict(base_url=server.base_url, model="teacher-test", api_key_env="TEACHER_TEST_KEY",
                    concurrency=4, timeout_s=5, max_retries=3, backoff_base_s=0.01, backoff_max_s=0.05)
    settings.update(overrides)

    async def record_sleep(seconds: float) -> None:
        if delays is not None:
            delays.append(seconds)
        await asyncio.sleep(min(seconds, 0.05))

    return TeacherClient(TeacherSettings(**settings), sleep=record_sleep)


def _messages(record=RECORD, task="complex_reasoning"):
    return build_messages(PROMPTS[task], record, seed=0)


def test_reply_and_request_body(server):
    [result] = _client(server).complete_many([("k", _messages())])
    assert result.error is None and result.text.startswith("Question:\n") and result.attempts == 1
    body = server.requests[0]
    assert body["model"] == "teacher-test" and body["messages"] == _messages()


def test_retries_on_429_and_5xx_then_succeeds(server):
    server.plan(RECORD["captions"][0], "429", "500", "503")
    delays: list[float] = []
    [result] = _client(server, delays).complete_many([("k", _messages())])
    assert result.error is None and result.attempts == 4
    assert len(delays) == 3 and all(0 <= d <= 0.05 for d in delays)


def test_retry_after_header_sets_the_delay(server):
    server.plan(RECORD["captions"][0], "429-retry-after")
    delays: list[float] = []
    [result] = _client(server, delays, backoff_base_s=5, backoff_max_s=10).complete_many([("k", _messages())])
    assert result.error is None and delays == [pytest.approx(0.05)]


def test_retries_exhausted_and_client_errors_are_not_retried(server):
    server.plan(RECORD["captions"][0], "500", "500", "500", "500", "ok")
    [result] = _client(server).complete_many([("k", _messages())])
    assert result.error.startswith("retries_exhausted: 4 attempts") and "http_500" in result.error
    other = dict(RECORD, captions=["A different picture."] * 5)
    server.plan(other["captions"][0], "400", "ok")
    delays: list[float] = []
    [result] = _client(server, delays).complete_many([("k", _messages(other))])
    assert result.error.startswith("http_400") and delays == []


def test_bad_body_and_wrong_key(server, monkeypatch):
    server.plan(RECORD["captions"][0], "garbage-json")
    [result] = _client(server).complete_many([("k", _messages())])
    assert result.error.startswith("bad_response")
    monkeypatch.setenv("TEACHER_TEST_KEY", "sk-wrong")
    [result] = _client(server).complete_many([("k", _messages())])
    assert result.error.startswith("http_401")


def test_missing_key_variable_is_named(monkeypatch):
    monkeypatch.delenv("NO_SUCH_TEACHER_KEY", raising=False)
    with pytest.raises(TeacherError, match="NO_SUCH_TEACHER_KEY"):
        TeacherClient(TeacherSettings(base_url="http://127.0.0.1:9/v1", model="m", api_key_env="NO_SUCH_TEACHER_KEY"))


def test_concurrency_is_bounded(server):
    server.slow_s = 0.5  # long enough that the client has several requests open even on a loaded machine
    jobs = []
    for i in range(12):
        record = dict(RECORD, captions=[f"Picture number {i}."] * 5)
        server.plan(record["captions"][0], "slow")
        jobs.append((i, _messages(record)))
    results = _client(server, concurrency=3).complete_many(jobs)
    assert [r.key for r in results] == list(range(12)) and all(r.error is None for r in results)
    assert 2 <= server.max_in_flight <= 3


def test_timeouts_are_retried_then_reported(server):
    server.slow_s = 1.0
    server.plan(RECORD["captions"][0], "slow", "slow")
    [result] = _client(server, timeout_s=0.2, max_retries=1).complete_many([("k", _messages())])
    assert result.error.startswith("retries_exhausted: 2 attempts") and "Timeout" in result.error


def test_retry_after_parsing():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == pytest.approx(10.0)
