"""LLaVA-Bench-style judging: rule files, judge prompts, score parsing and relative scores.

A judge model sees the question, a textual description of the image (captions and boxes), a
reference answer ("assistant 1") and the candidate's answer ("assistant 2"), plus the rule for the
question's category, and replies with a first line holding two 1-10 scores. The relative score of a
category is mean(candidate) / mean(reference) x 100 over the replies that could be parsed; replies
that could not are counted and reported, never dropped silently.

Rule files use the reference `rule.json` layout: `{category: {"role": str, "prompt": str}}`. The
project ships its own default (`judge_rules.json` next to this module). This module does no
network I/O; the platform's judge client sends the messages built here.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_RULES = Path(__file__).with_name("judge_rules.json")
SYSTEM_PROMPT = "You are an exacting and fair reviewer who grades the answers of AI assistants."
# Our bench categories -> the rule keys they use in a reference-format rule file.
CATEGORY_RULES = {"conv": "conv", "detail": "detail", "complex": "complex"}
SCORE_MIN, SCORE_MAX = 1.0, 10.0


class RuleFileError(ValueError):
    """A judge rule file that is not in the expected `{category: {role, prompt}}` layout."""


@dataclass(frozen=True)
class JudgeRule:
    role: str
    prompt: str


def load_rules(path: str | Path | None = None) -> dict[str, JudgeRule]:
    source = Path(path) if path is not None else DEFAULT_RULES
    try:
        data = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RuleFileError(f"judge rules {source}: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise RuleFileError(f"judge rules {source}: expected a non-empty JSON object of categories")
    rules = {}
    for key, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("role"), str) or not isinstance(
                entry.get("prompt"), str):
            raise RuleFileError(f"judge rules {source}: category {key!r} needs string fields 'role' and 'prompt'")
        rules[key] = JudgeRule(entry["role"], entry["prompt"])
    return rules


def rule_for(rules: dict[str, JudgeRule], category: str) -> JudgeRule:
    key = CATEGORY_RULES.get(category, category)
    if key in rules:
        return rules[key]
    if "default" in rules:
        return rules["default"]
    raise RuleFileError(f"no judge rule for category {category!r} and no 'default' rule")


def build_judge_messages(question: str, context: str, reference: str, candidate: str,
                         rule: JudgeRule) -> list[dict[str, str]]:
    """Chat messages for one judgement; the reference answer is assistant 1, the candidate assistant 2."""
    role = rule.role
    body = (
        f"[Context]\n{context}\n\n"
        f"[Question]\n{question}\n\n"
        f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
        f"[{role} 2]\n{candidate}\n\n[End of {role} 2]\n\n"
        f"[System]\n{rule.prompt}\n\n"
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": body}]


_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


def parse_scores(reply: str | None) -> tuple[float, float] | None:
    """(reference score, candidate score) from the first non-blank line, or None if unparseable.

    The line must hold exactly two numbers in 1-10, separated by spaces and/or a comma, optionally
    wrapped in brackets or parentheses (`8 7`, `8, 7`, `(8, 7)`, `8.5,7`). Anything else on that line
    (words, a third number, a score outside 1-10) makes the reply unparseable.
    """
    lines = [ln.strip() for ln in (reply or "").splitlines() if ln.strip()]
    if not lines:
        return None
    line = lines[0]
    if line[:1] in "([" and line[-1:] in ")]":
        line = line[1:-1]
    parts = line.replace(",", " ").split()
    if len(parts) != 2 or not all(_NUMBER.match(p) for p in parts):
        return None
    first, second = float(parts[0]), float(parts[1])
    if not all(SCORE_MIN <= s <= SCORE_MAX and math.isfinite(s) for s in (first, second)):
        return None
    return first, second


def _summary(pairs: list[tuple[float, float]], total: int) -> dict[str, Any]:
    ref = sum(p[0] for p in pairs) / len(pairs) if pairs else None
    cand = sum(p[1] for p in pairs) / len(pairs) if pairs else None
    relative = cand / ref * 100.0 if ref else None
    return {"n": total, "parsed": len(pairs), "unparseable": total - len(pairs),
            "reference_mean": ref, "candidate_mean": cand, "relative": relative}


def relative_scores(judged: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Per category and overall: means of both scores and mean(candidate)/mean(reference) x 100.

    `judged` rows carry `category` and `reply` (the judge's raw text, None if the call failed).
    Overall pools every parsed reply, as the reference summary does.
    """
    per_cat: dict[str, list[tuple[float, float]]] = defaultdict(list)
    totals: dict[str, int] = defaultdict(int)
    for row in judged:
        cat = str(row["category"])
        totals[cat] += 1
        scores = parse_scores(row.get("reply"))
        if scores is not None:
            per_cat[cat].append(scores)
    all_pairs = [p for cat in sorted(per_cat) for p in per_cat[cat]]
    overall = _summary(all_pairs, sum(totals.values()))
    return {"overall": overall, "per_category": {c: _summary(per_cat[c], totals[c]) for c in sorted(totals)}}


# --------------------------------------------------------------------------- bench items


def _context(record: dict[str, Any]) -> str:
    captions = "\n".join(str(c).strip() for c in record.get("captions") or [])
    boxes = "\n".join(f"{i['category']}: [{', '.join(f'{v:.3f}' for v in i['bbox'])}]"
                      for i in record.get("instances") or [])
    return captions + ("\n\n" + boxes if boxes else "")


def bench_items_from_captions(records: Sequence[dict[str, Any]], *, noun: str = "shape",
                              seed: int = 0) -> list[dict[str, Any]]:
    """Judge items (one per image and category) from caption+box records, answered by the rule teacher.

    The reference answers come from the deterministic rule teacher, standing in for the GPT-4
    answers of LLaVA-Bench; categories are the bench's three: conv, detail, complex.
    """
    from llava.datagen.instruction_lists import DETAIL_PROMPTS
    from llava.datagen.parse import parse_qa_pairs
    from llava.datagen.rule_teacher import RuleTeacher

    teacher = RuleTeacher(noun=noun, seed=seed)
    items = []
    for record in records:
        context = _context(record)
        rng = random.Random(f"bench:{seed}:{record['id']}")
        conv = parse_qa_pairs(teacher.reply(record, "conversation"))
        complex_pairs = parse_qa_pairs(teacher.reply(record, "complex_reasoning"))
        detail = teacher.reply(record, "detail_description").strip()
        chosen = {"conv": rng.choice(conv) if conv else None,
                  "detail": (rng.choice(DETAIL_PROMPTS), detail) if detail else None,
                  "complex": complex_pairs[0] if complex_pairs else None}
        for category, pair in chosen.items():
            if pair is None:
                continue
            items.append({"id": f"{record['id']}_{category}", "image": record.get("image"), "category": category,
                          "question": pair[0], "reference": pair[1], "context": context})
    return items
