"""The judge client against a loopback OpenAI-compatible server: prompts sent, retries, failures kept."""

from __future__ import annotations

import pytest

from llava.eval import judge
from llava_platform.judge_client import JudgeError, JudgeSettings, judge_answers
from tests.eval.judge_server import JudgeServer
from tests.paths import REFERENCE

ITEMS = [
    {"id": "q1", "category": "conv", "question": "What color is the circle?", "context": "A red circle.",
     "reference": "The circle is red."},
    {"id": "q2", "category": "detail", "question": "Describe the image.", "context": "A red circle.",
     "reference": "One red circle on white."},
    {"id": "q3", "category": "complex", "question": "Why is it round?", "context": "A red circle.",
     "reference": "Because it is a circle."},
]


def _reply(messages):
    body = messages[-1]["content"]
    if "[Question]\nWhy is it round?" in body:
        return "The second assistant did fine."  # no score line: unparseable
    return "9 6\nAssistant 1 names the colour."


def _settings(server: JudgeServer, **kw) -> JudgeSettings:
    return JudgeSettings(enabled=True, base_url=server.base_url, model="judge-test", api_key_env="JUDGE_TEST_KEY",
                         backoff_base_s=0.0, backoff_max_s=0.0, timeout_s=10, **kw)


def test_judge_round_trip_with_retry(monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "judge-test-key")
    with JudgeServer(_reply, fail_first=1) as server:
        rows = judge_answers(ITEMS, ["Red.", "A circle.", "It is."], _settings(server, concurrency=1))
    assert [r["scores"] for r in rows] == [(9.0, 6.0), (9.0, 6.0), None]
    assert rows[0]["attempts"] == 2 and server.statuses[0] == 503  # the first call was retried
    sent = server.requests[-1]
    assert sent["model"] == "judge-test"
    assert "[Assistant 2]\nIt is." in sent["messages"][1]["content"]
    assert judge.load_rules()["complex"].prompt in sent["messages"][1]["content"]
    scores = judge.relative_scores(rows)
    assert scores["overall"]["unparseable"] == 1
    assert scores["overall"]["relative"] == pytest.approx(6 / 9 * 100)


def test_reference_rule_file_is_used(monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "judge-test-key")
    reference = str(REFERENCE / "rule.json")
    with JudgeServer(_reply) as server:
        judge_answers(ITEMS[:1], ["Red."], _settings(server, rules=reference))
    assert judge.load_rules(reference)["conv"].prompt in server.requests[0]["messages"][1]["content"]


def test_failed_calls_are_kept_and_counted(monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "judge-test-key")
    with JudgeServer(_reply, always_fail=True) as server:
        rows = judge_answers(ITEMS, ["a", "b", "c"], _settings(server, max_retries=1))
    assert len(rows) == 3 and all(r["reply"] is None and "retries_exhausted" in r["error"] for r in rows)
    assert judge.relative_scores(rows)["overall"]["unparseable"] == 3
    assert len(server.requests) == 6  # 2 attempts each


def test_wrong_key_is_not_retried_and_missing_key_fails_early(monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "wrong")
    with JudgeServer(_reply) as server:
        rows = judge_answers(ITEMS[:1], ["a"], _settings(server))
    assert rows[0]["error"].startswith("http_401") and server.statuses == [401]
    monkeypatch.delenv("JUDGE_TEST_KEY")
    with pytest.raises(JudgeError, match="JUDGE_TEST_KEY"):
        judge_answers(ITEMS[:1], ["a"], JudgeSettings(enabled=True, base_url="http://127.0.0.1:9/v1",
                                                      api_key_env="JUDGE_TEST_KEY"))
