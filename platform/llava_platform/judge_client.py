"""The LLaVA-Bench judge over an OpenAI-compatible chat-completions API.

The transport (timeouts, retries with back-off on 429/5xx, bounded concurrency, API key from a
named environment variable) is the teacher client's: one HTTP client for every OpenAI-compatible
model the platform calls. This module adds what is specific to judging: the settings, building each
judgement's messages from the rule file (`llava.eval.judge`), and keeping every item's outcome —
a failed call is recorded with its error, so it is counted as unparseable, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field

from llava_platform.config import StrictModel
from llava_platform.teacher_client import TeacherClient, TeacherError, TeacherSettings


class JudgeSettings(StrictModel):
    enabled: bool = False
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o"
    # Name of the environment variable holding the key (never the key itself); empty for no auth.
    api_key_env: str | None = "OPENAI_API_KEY"
    rules: str | None = None  # rule file in the reference rule.json layout; None: the shipped rules
    concurrency: int = Field(4, ge=1, le=64)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(4, ge=0, le=20)
    backoff_base_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    temperature: float = Field(0.2, ge=0, le=2)
    max_tokens: int = Field(512, ge=8)


class JudgeError(RuntimeError):
    """The judge cannot be used at all (no API key, unreadable rules)."""


def _client(settings: JudgeSettings, transport=None) -> TeacherClient:
    teacher = TeacherSettings(
        base_url=settings.base_url, model=settings.model, api_key_env=settings.api_key_env or None,
        concurrency=settings.concurrency, timeout_s=settings.timeout_s, max_retries=settings.max_retries,
        backoff_base_s=settings.backoff_base_s, backoff_max_s=settings.backoff_max_s,
        temperature=settings.temperature, max_tokens=settings.max_tokens,
    )
    try:
        return TeacherClient(teacher, transport=transport)
    except TeacherError as err:
        raise JudgeError(f"judge: {err.reason}") from None


def judge_answers(items: Sequence[dict[str, Any]], candidates: Sequence[str], settings: JudgeSettings,
                  *, transport=None) -> list[dict[str, Any]]:
    """Ask the judge about each (item, candidate answer); one row per item, in order.

    Items carry `id`, `category`, `question`, `context` and `reference` (see
    `llava.eval.judge.bench_items_from_captions`). Rows add `candidate`, `reply` (None when the call
    failed), `error`, `attempts` and the parsed `scores` (None when unparseable).
    """
    from llava.eval import judge

    if len(items) != len(candidates):
        raise ValueError(f"{len(items)} judge items but {len(candidates)} candidate answers")
    try:
        rules = judge.load_rules(settings.rules)
    except judge.RuleFileError as err:
        raise JudgeError(str(err)) from None
    jobs = []
    for i, (item, answer) in enumerate(zip(items, candidates, strict=True)):
        rule = judge.rule_for(rules, item["category"])
        messages = judge.build_judge_messages(item["question"], item["context"], item["reference"], answer, rule)
        jobs.append((i, messages))
    results = _client(settings, transport).complete_many(jobs)
    rows = []
    for item, answer, result in zip(items, candidates, results, strict=True):
        rows.append({"id": item.get("id"), "category": item["category"], "question": item["question"],
                     "reference": item["reference"], "candidate": answer, "reply": result.text,
                     "error": result.error, "attempts": result.attempts,
                     "scores": judge.parse_scores(result.text)})
    return rows
