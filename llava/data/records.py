"""The LLaVA record format and its validation.

`{"id": "...", "image": "a.jpg" | ["a.jpg", "b.jpg"] (optional),
  "conversations": [{"from": "human", "value": "<image>\\nWhat ...?"}, {"from": "gpt", "value": "..."}]}`
"""

from __future__ import annotations

import json
from pathlib import Path

from llava.data.templates import IMAGE_TOKEN

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class RecordError(ValueError):
    """A record that does not follow the LLaVA format; the message starts with a reason code."""


def load_records(path: str | Path) -> list[dict]:
    """A JSON list or JSONL file of records."""
    return parse_records(Path(path).read_text(encoding="utf-8"), str(path))


def parse_records(text: str, path: str = "<records>") -> list[dict]:
    stripped = text.lstrip()
    if stripped.startswith("["):
        data = json.loads(text)
    else:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(data, list):
        raise RecordError(f"schema: {path} holds {type(data).__name__}, expected a list of records")
    return data


def image_list(record: dict) -> list[str]:
    image = record.get("image")
    if image is None:
        return []
    if isinstance(image, str):
        return [image]
    if isinstance(image, list) and all(isinstance(i, str) for i in image):
        return list(image)
    raise RecordError(f"schema: 'image' must be a string or a list of strings, got {type(image).__name__}")


def to_messages(record: dict) -> list[dict]:
    """Validate a record and return chat messages [{"role", "content"}]."""
    if not isinstance(record, dict):
        raise RecordError(f"schema: record is {type(record).__name__}, expected an object")
    if not isinstance(record.get("id"), (str, int)):
        raise RecordError("schema: missing or invalid 'id'")
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise RecordError("schema: 'conversations' must be a non-empty list")
    messages = []
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise RecordError(f"schema: conversations[{i}] needs a string 'value'")
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise RecordError(f"schema: conversations[{i}] has unknown role {turn.get('from')!r}")
        messages.append({"role": role, "content": turn["value"]})
    if messages[-1]["role"] != "assistant":
        raise RecordError("schema: the conversation must end with a gpt (assistant) turn")
    n_images = len(image_list(record))
    n_placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages if m["role"] == "user")
    if any(IMAGE_TOKEN in m["content"] for m in messages if m["role"] != "user"):
        raise RecordError("placeholder_mismatch: <image> appears outside a human turn")
    if n_placeholders != n_images:
        raise RecordError(
            f"placeholder_mismatch: {n_placeholders} <image> placeholder(s) for {n_images} image(s)"
        )
    return messages
