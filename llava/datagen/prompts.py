"""Teacher prompts: load a prompt directory and build the chat messages for one record.

A prompt directory has the reference layout, one sub-directory per instruction type:

    <type>/system_message.txt
    <type>/NNN_caps.txt     few-shot input: captions, optionally a blank line and box lines
    <type>/NNN_conv.txt     few-shot output in the reply format the parser expects

The message list is [system, (user shot, assistant shot)..., user query], as in the paper. The
query is formatted like the shots of that type: captions, and box lines `category: [x1, y1, x2, y2]`
only when that type's shots show boxes (the reference conversation shots carry captions only).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_PROMPT_DIR = Path(__file__).parent / "prompts"
BOX_LINE = re.compile(r"^[^:\n]+: \[\s*-?[\d.]+\s*,\s*-?[\d.]+\s*,\s*-?[\d.]+\s*,\s*-?[\d.]+\s*\]\s*$", re.MULTILINE)
SHOT_FILE = re.compile(r"^(\d+)_(caps|conv)\.txt$")


class PromptError(ValueError):
    """A prompt directory that does not have the expected layout; the message names the file."""


@dataclass(frozen=True)
class FewShot:
    name: str
    caps: str
    conv: str


@dataclass(frozen=True)
class TaskPrompt:
    task_type: str
    system_message: str
    shots: tuple[FewShot, ...]

    @property
    def include_boxes(self) -> bool:
        return any(BOX_LINE.search(shot.caps) for shot in self.shots)


def load_task_prompt(directory: str | Path) -> TaskPrompt:
    directory = Path(directory)
    system_file = directory / "system_message.txt"
    if not system_file.is_file():
        raise PromptError(f"{system_file}: missing system message")
    system = system_file.read_text().strip()
    if not system:
        raise PromptError(f"{system_file}: system message is empty")
    found: dict[str, dict[str, str]] = {}
    for path in sorted(directory.iterdir()):
        match = SHOT_FILE.match(path.name)
        if match:
            found.setdefault(match.group(1), {})[match.group(2)] = path.read_text().strip()
    shots = []
    for number, parts in sorted(found.items()):
        for part in ("caps", "conv"):
            if not parts.get(part):
                raise PromptError(f"{directory / f'{number}_{part}.txt'}: missing or empty (shot {number})")
        shots.append(FewShot(number, parts["caps"], parts["conv"]))
    return TaskPrompt(directory.name, system, tuple(shots))


def load_prompt_dir(path: str | Path | None = None, task_types: list[str] | None = None) -> dict[str, TaskPrompt]:
    """Load every `<type>/` sub-directory (or just `task_types`) of a prompt directory."""
    root = Path(path) if path is not None else DEFAULT_PROMPT_DIR
    if not root.is_dir():
        raise PromptError(f"{root}: prompt directory not found")
    names = task_types or sorted(p.name for p in root.iterdir() if (p / "system_message.txt").is_file())
    prompts = {}
    for name in names:
        if not (root / name).is_dir():
            raise PromptError(f"{root / name}: no prompts for task type {name!r}")
        prompts[name] = load_task_prompt(root / name)
    if not prompts:
        raise PromptError(f"{root}: holds no <type>/system_message.txt")
    return prompts


def _number(value: float) -> str:
    return repr(round(float(value), 3))


def format_query(record: dict[str, Any], include_boxes: bool = True) -> str:
    """Captions one per line; then, after a blank line, `category: [x1, y1, x2, y2]` per object."""
    captions = record.get("captions") or []
    if not captions:
        raise ValueError(f"record {record.get('id')!r} has no captions")
    text = "\n".join(str(c).strip() for c in captions)
    if include_boxes:
        lines = [f"{inst['category']}: [{', '.join(_number(v) for v in inst['bbox'])}]"
                 for inst in record.get("instances") or []]
        if lines:
            text += "\n\n" + "\n".join(lines)
    return text


def build_messages(prompt: TaskPrompt, record: dict[str, Any], *, seed: int = 0,
                   num_shots: int | None = None) -> list[dict[str, str]]:
    """System message, few-shot pairs sampled deterministically from (seed, record id, type), query."""
    rng = random.Random(f"{seed}:{record.get('id')}:{prompt.task_type}:shots")
    count = len(prompt.shots) if num_shots is None else min(num_shots, len(prompt.shots))
    shots = rng.sample(list(prompt.shots), count)
    messages = [{"role": "system", "content": prompt.system_message}]
    for shot in shots:
        messages.append({"role": "user", "content": shot.caps})
        messages.append({"role": "assistant", "content": shot.conv})
    messages.append({"role": "user", "content": format_query(record, prompt.include_boxes)})
    return messages
