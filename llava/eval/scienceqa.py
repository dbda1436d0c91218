"""ScienceQA-format multiple choice: the reference prompt, answer extraction and accuracies.

Prompt (as the reference evaluation builds it):

    <question>
    Context: <context>            (only when there is a context)
    Options: (A) <c0> (B) <c1> ...
    Answer with the option's letter from the given choices directly.

Answer extraction accepts exactly three forms, each naming one of the offered letters:
1. the bare letter: `B`;
2. the letter followed by a period, alone or before more text: `B.` / `B. red`;
3. `The answer is B.` anywhere in the reply (a reasoning-then-answer reply), the final period
   optional; if the phrase names two different letters the reply is ambiguous.
Anything else, including a letter that is not among the options, is unparseable and counts as wrong.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTERS = string.ascii_uppercase
_PREFIX = re.compile(r"^([A-Z])\.(?:\s|$)")
_ANSWER_IS = re.compile(r"The answer is ([A-Z])(?![A-Za-z0-9])")


def build_prompt(item: dict[str, Any]) -> str:
    """The text prompt for one item (the image, if any, is passed alongside by the caller)."""
    choices = list(item["choices"])
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"item {item.get('id')!r}: needs 2-26 choices, has {len(choices)}")
    lines = [str(item["question"]).strip()]
    context = str(item.get("context") or "").strip()
    if context:
        lines.append(f"Context: {context}")
    lines.append("Options: " + " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices)))
    lines.append(INSTRUCTION)
    return "\n".join(lines)


def extract_answer(reply: str, n_choices: int) -> str | None:
    """The letter a reply chose, or None when it is not one of the accepted forms."""
    valid = set(LETTERS[:n_choices])
    text = (reply or "").strip()
    if len(text) == 1:
        return text if text in valid else None
    prefix = _PREFIX.match(text)
    if prefix:
        return prefix.group(1) if prefix.group(1) in valid else None
    named = set(_ANSWER_IS.findall(text))
    if len(named) == 1:
        (letter,) = named
        return letter if letter in valid else None
    return None


def answer_letter(item: dict[str, Any]) -> str:
    """Gold letter; `answer` is a choice index (ScienceQA) or already a letter."""
    answer = item["answer"]
    if isinstance(answer, int):
        return LETTERS[answer]
    text = str(answer).strip()
    if text.isdigit():
        return LETTERS[int(text)]
    return text.upper()


def _acc(flags: list[bool]) -> dict[str, Any]:
    return {"n": len(flags), "correct": sum(flags), "accuracy": sum(flags) / len(flags) if flags else 0.0}


def score_scienceqa(items: Sequence[dict[str, Any]], replies: Sequence[str]) -> dict[str, Any]:
    """Accuracy overall, per subject, with/without image; unparseable replies counted (and wrong)."""
    if len(items) != len(replies):
        raise ValueError(f"{len(items)} items but {len(replies)} replies")
    rows = []
    per_subject: dict[str, list[bool]] = defaultdict(list)
    per_modality: dict[str, list[bool]] = defaultdict(list)
    for item, reply in zip(items, replies, strict=True):
        choice = extract_answer(reply, len(item["choices"]))
        gold = answer_letter(item)
        ok = choice == gold
        per_subject[str(item.get("subject") or "unknown")].append(ok)
        per_modality["image" if item.get("image") else "text"].append(ok)
        rows.append({"id": item.get("id"), "gold": gold, "reply": reply, "extracted": choice,
                     "parsed": choice is not None, "correct": ok})
    overall = _acc([r["correct"] for r in rows])
    unparseable = sum(not r["parsed"] for r in rows)
    image = per_modality.get("image", [])
    return {
        **overall,
        "unparseable": unparseable,
        "unparseable_rate": unparseable / len(rows) if rows else 0.0,
        "per_subject": {s: _acc(v) for s, v in sorted(per_subject.items())},
        "image": _acc(image),
        "text_only": _acc(per_modality.get("text", [])),
        "rows": rows,
    }
