"""Teacher replies -> LLaVA records, or a `ReplyParseError` saying why the reply is unusable.

Conversation and complex-reasoning replies use the reference layout:

    Question:
    <text>
    ===
    Answer:
    <text>
    ===

(the last `===` is often missing and is not required). Detailed-description replies are one or more
plain paragraphs; the instruction for them is sampled from `DETAIL_PROMPTS`.
"""

from __future__ import annotations

import random
import re
from typing import Any

from llava.datagen.instruction_lists import DETAIL_PROMPTS, place_image_token
from llava.errors import ReasonedError

SEPARATOR = re.compile(r"^\s*===\s*$", re.MULTILINE)
# The teacher must speak as if it saw the image; these give away the symbolic source.
SOURCE_LEAKS = re.compile(r"bounding box|coordinates|\bcaptions?\b|\[\s*0?\.\d+\s*,", re.IGNORECASE)


class ReplyParseError(ReasonedError):
    """A malformed teacher reply. `reason` is `<code>: <detail>`; `code` is the part before the colon."""


def parse_qa_pairs(reply: str) -> list[tuple[str, str]]:
    """Split a `Question:` / `===` / `Answer:` reply into (question, answer) pairs."""
    if not reply or not reply.strip():
        raise ReplyParseError("empty_reply: the teacher returned no text")
    blocks = [b.strip() for b in SEPARATOR.split(reply) if b.strip()]
    pairs: list[tuple[str, str]] = []
    pending: str | None = None
    for i, block in enumerate(blocks):
        head, _, body = block.partition("\n")
        head, body = head.strip(), body.strip()
        if head.startswith(("Question:", "Answer:")) and not body:
            # "Question: text" on one line is a common variant; accept it.
            label, _, body = head.partition(":")
            head, body = label + ":", body.strip()
        if head == "Question:":
            if pending is not None:
                raise ReplyParseError(f"unpaired_question: block {i} is a question but question "
                                      f"{len(pairs) + 1} has no answer")
            if not body:
                raise ReplyParseError(f"empty_question: block {i} has no question text")
            pending = body
        elif head == "Answer:":
            if pending is None:
                raise ReplyParseError(f"unpaired_answer: block {i} is an answer with no question before it")
            if not body:
                raise ReplyParseError(f"empty_answer: the answer to question {len(pairs) + 1} is empty")
            pairs.append((pending, body))
            pending = None
        else:
            raise ReplyParseError(f"unexpected_block: block {i} starts with {head[:40]!r}, "
                                  "expected 'Question:' or 'Answer:'")
    if pending is not None:
        raise ReplyParseError(f"unpaired_question: question {len(pairs) + 1} has no answer")
    if not pairs:
        raise ReplyParseError("no_pairs: the reply holds no Question/Answer pair")
    return pairs


def _check_leaks(texts: list[str]) -> None:
    for text in texts:
        hit = SOURCE_LEAKS.search(text)
        if hit:
            raise ReplyParseError(f"mentions_source: reply refers to its annotations ({hit.group(0)!r})")


def _conversations(pairs: list[tuple[str, str]], rng: random.Random) -> list[dict[str, str]]:
    turns: list[dict[str, str]] = []
    for i, (q, a) in enumerate(pairs):
        turns.append({"from": "human", "value": place_image_token(q, rng) if i == 0 else q})
        turns.append({"from": "gpt", "value": a})
    return turns


def reply_to_record(reply: str, task_type: str, *, record_id: str, image: str | None,
                    rng: random.Random) -> dict[str, Any]:
    """Parse one teacher reply into a LLaVA record with id `<record_id>_<task_type>`."""
    if task_type == "detail_description":
        text = (reply or "").strip()
        if not text:
            raise ReplyParseError("empty_reply: the teacher returned no text")
        if re.search(r"^\s*(Question|Answer):", text, re.MULTILINE):
            pairs = parse_qa_pairs(text)
            if len(pairs) != 1:
                raise ReplyParseError(f"wrong_pair_count: detailed description has {len(pairs)} pairs, expected 1")
            text = pairs[0][1]
        if len(text.split()) < 5:
            raise ReplyParseError(f"too_short: description has {len(text.split())} words")
        _check_leaks([text])
        pairs = [(rng.choice(DETAIL_PROMPTS), text)]
    elif task_type == "conversation":
        pairs = parse_qa_pairs(reply)
        _check_leaks([t for p in pairs for t in p])
    elif task_type == "complex_reasoning":
        pairs = parse_qa_pairs(reply)
        if len(pairs) != 1:
            raise ReplyParseError(f"wrong_pair_count: complex reasoning has {len(pairs)} pairs, expected 1")
        _check_leaks([t for p in pairs for t in p])
    else:
        raise ValueError(f"unknown task type {task_type!r}")
    record: dict[str, Any] = {"id": f"{record_id}_{task_type}"}
    if image is not None:
        record["image"] = image
    record["conversations"] = _conversations(pairs, rng)
    return record
