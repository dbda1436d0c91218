"""Exact-match scoring of short answers (the synthetic shapes held-out set).

Normalisation before comparing, so that formatting is not mistaken for a wrong answer:
- lower case; surrounding whitespace dropped, inner runs of whitespace collapsed;
- punctuation removed (`"Red."` == `"red"`; `"top-left"` == `"top left"`);
- number words zero to twenty become digits (`"Three"` == `"3"`);
- the articles a / an / the are dropped (`"the left"` == `"left"`).
Everything else must match exactly: `"3 shapes"` is not `"3"`, `"reddish"` is not `"red"`.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
          "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")
NUMBER_WORDS = {word: str(i) for i, word in enumerate(_WORDS)}
ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[^\w\s]|_")


def normalise_answer(text: str) -> str:
    text = unicodedata.normalize("NFKC", text or "").lower()
    text = _PUNCT.sub(" ", text)
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


def exact_match(prediction: str, answer: str) -> bool:
    return normalise_answer(prediction) == normalise_answer(answer)


def score_shapes(items: Sequence[dict[str, Any]], predictions: Sequence[str]) -> dict[str, Any]:
    """Accuracy overall and per `question_type`; one row per item with what was compared."""
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} items but {len(predictions)} predictions")
    rows = []
    per_type: dict[str, list[bool]] = defaultdict(list)
    for item, pred in zip(items, predictions, strict=True):
        ok = exact_match(pred, str(item["answer"]))
        qtype = str(item.get("question_type") or "unknown")
        per_type[qtype].append(ok)
        rows.append({"id": item.get("id"), "question_type": qtype, "answer": str(item["answer"]),
                     "prediction": pred, "normalised": normalise_answer(pred), "correct": ok})
    correct = sum(r["correct"] for r in rows)
    return {
        "n": len(rows),
        "correct": correct,
        "accuracy": correct / len(rows) if rows else 0.0,
        "per_type": {t: {"n": len(v), "correct": sum(v), "accuracy": sum(v) / len(v)} for t, v in sorted(per_type.items())},
        "rows": rows,
    }
