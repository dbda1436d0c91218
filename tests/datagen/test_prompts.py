"""Prompt directories in the reference layout, and the chat messages built from them."""

from __future__ import annotations

import json

import pytest

from llava.datagen.prompts import (
    BOX_LINE,
    DEFAULT_PROMPT_DIR,
    PromptError,
    build_messages,
    format_query,
    load_prompt_dir,
)
from llava.datagen.rule_teacher import TASK_TYPES
from tests.paths import REFERENCE

needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason="shared reference data not present")


def _records() -> list[dict]:
    return [json.loads(line) for line in (REFERENCE / "caps_boxes_coco2014_val_80.jsonl").read_text().splitlines()]


@needs_reference
def test_loads_reference_prompts():
    prompts = load_prompt_dir(REFERENCE / "prompts")
    assert set(prompts) == set(TASK_TYPES)
    assert [len(prompts[t].shots) for t in TASK_TYPES] == [2, 3, 3]
    # the reference conversation shots show captions only; the other two also show boxes
    assert [prompts[t].include_boxes for t in TASK_TYPES] == [False, True, True]
    assert prompts["conversation"].system_message.startswith("You are an AI visual assistant")


def test_project_prompts_have_the_same_layout():
    prompts = load_prompt_dir(DEFAULT_PROMPT_DIR)
    assert set(prompts) == set(TASK_TYPES)
    for task in TASK_TYPES:
        assert len(prompts[task].shots) >= 2
        assert prompts[task].include_boxes == (task != "conversation")


@needs_reference
def test_query_is_formatted_like_the_reference_shots():
    """Rebuilding a record from a reference shot and formatting it gives back the shot text."""
    for task in ("detail_description", "complex_reasoning"):
        for shot in load_prompt_dir(REFERENCE / "prompts")[task].shots:
            captions, _, boxes = shot.caps.partition("\n\n")
            instances = []
            for line in boxes.splitlines():
                category, _, numbers = line.partition(": ")
                instances.append({"category": category, "bbox": json.loads(numbers)})
            record = {"captions": captions.splitlines(), "instances": instances}
            assert format_query(record, include_boxes=True) == shot.caps


@needs_reference
def test_messages_are_system_shots_query_and_deterministic_by_seed():
    prompts = load_prompt_dir(REFERENCE / "prompts")
    records = _records()
    messages = build_messages(prompts["complex_reasoning"], records[0], seed=1)
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert messages[-1]["content"].splitlines()[0] == records[0]["captions"][0]
    assert len(BOX_LINE.findall(messages[-1]["content"])) == len(records[0]["instances"])
    conv = build_messages(prompts["conversation"], records[0], seed=1)
    assert not BOX_LINE.search(conv[-1]["content"])
    assert build_messages(prompts["complex_reasoning"], records[0], seed=1) == messages
    orders = {tuple(m["content"] for m in build_messages(prompts["complex_reasoning"], r, seed=1)[1:-1:2])
              for r in records[:20]}
    assert len(orders) > 1, "few-shot order should vary across records"
    two = build_messages(prompts["complex_reasoning"], records[0], seed=1, num_shots=2)
    assert len(two) == 1 + 2 * 2 + 1


def test_broken_prompt_directories_name_the_file(tmp_path):
    task = tmp_path / "conversation"
    task.mkdir()
    with pytest.raises(PromptError, match="system_message.txt"):
        load_prompt_dir(tmp_path, ["conversation"])
    (task / "system_message.txt").write_text("be helpful")
    (task / "000_caps.txt").write_text("a caption")
    with pytest.raises(PromptError, match="000_conv.txt"):
        load_prompt_dir(tmp_path)
    with pytest.raises(PromptError, match="detail_description"):
        load_prompt_dir(tmp_path, ["detail_description"])
    with pytest.raises(PromptError, match="not found"):
        load_prompt_dir(tmp_path / "missing")


def test_query_needs_captions():
    with pytest.raises(ValueError, match="no captions"):
        format_query({"id": "x", "captions": [], "instances": []})
