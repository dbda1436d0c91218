"""Teacher replies -> LLaVA records; malformed replies fail with a reason code."""

from __future__ import annotations

import json
import random

import pytest

from llava.datagen.instruction_lists import DETAIL_PROMPTS
from llava.datagen.parse import ReplyParseError, parse_qa_pairs, reply_to_record
from llava.datagen.prompts import load_prompt_dir
from llava.datagen.rule_teacher import TASK_TYPES, RuleTeacher
from llava.datagen.scene import Scene
from tests.paths import REFERENCE

needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason="shared reference data not present")


def _parse(reply: str, task: str, seed: int = 0) -> dict:
    return reply_to_record(reply, task, record_id="r1", image="r1.jpg", rng=random.Random(seed))


@needs_reference
@pytest.mark.parametrize("task", TASK_TYPES)
def test_reference_shots_parse(task):
    for shot in load_prompt_dir(REFERENCE / "prompts")[task].shots:
        record = _parse(shot.conv, task)
        turns = record["conversations"]
        assert record["id"] == f"r1_{task}" and record["image"] == "r1.jpg"
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert sum(t["value"].count("<image>") for t in turns) == 1
        expected_pairs = 1 if task == "detail_description" else shot.conv.count("Question:")
        assert len(turns) == 2 * expected_pairs
        if task == "detail_description":
            assert turns[0]["value"].replace("<image>", "").strip() in DETAIL_PROMPTS
            assert turns[1]["value"] == shot.conv.strip()
        else:
            assert turns[1]["value"] == parse_qa_pairs(shot.conv)[0][1]


def test_one_line_labels_and_missing_final_separator_are_accepted():
    pairs = parse_qa_pairs("Question: How many?\n===\nAnswer: Two.\n===\nQuestion:\nWhere?\n===\nAnswer:\nLeft.")
    assert pairs == [("How many?", "Two."), ("Where?", "Left.")]


@pytest.mark.parametrize(("reply", "task", "code"), [
    ("", "conversation", "empty_reply"),
    ("   \n", "detail_description", "empty_reply"),
    ("Sure, here is a great conversation about the image!", "conversation", "unexpected_block"),
    ("Question:\nWhat is it?\n===\nQuestion:\nWhy?\n===\nAnswer:\nBecause.", "conversation", "unpaired_question"),
    ("Answer:\nA dog.\n===", "conversation", "unpaired_answer"),
    ("Question:\nWhat is it?\n===\nAnswer:\n\n===", "conversation", "empty_answer"),
    ("Question:\n\n===\nAnswer:\nA dog.\n===", "conversation", "empty_question"),
    ("Question:\nWhat is it?\n===", "complex_reasoning", "unpaired_question"),
    ("Question:\nA?\n===\nAnswer:\nB is here.\n===\nQuestion:\nC?\n===\nAnswer:\nD.\n===",
     "complex_reasoning", "wrong_pair_count"),
    ("A dog.", "detail_description", "too_short"),
    ("Question:\nWhat is shown?\n===", "detail_description", "unpaired_question"),
    ("The dog at bounding box [0.1, 0.2, 0.3, 0.4] sits on the left side of the grass.",
     "detail_description", "mentions_source"),
    ("Question:\nWhere is the dog?\n===\nAnswer:\nBased on the captions, it is on the left.\n===",
     "conversation", "mentions_source"),
])
def test_malformed_replies_have_reasons(reply, task, code):
    with pytest.raises(ReplyParseError) as info:
        _parse(reply, task)
    assert info.value.code == code
    assert ":" in info.value.reason and len(info.value.reason) > len(code) + 2


def test_image_token_placement_varies_with_rng():
    reply = "Question:\nHow many dogs?\n===\nAnswer:\nTwo dogs.\n==="
    firsts = {_parse(reply, "conversation", seed)["conversations"][0]["value"] for seed in range(20)}
    assert firsts == {"<image>\nHow many dogs?", "How many dogs?\n<image>"}


def test_text_only_record_has_no_image_key():
    record = reply_to_record("Question:\nQ?\n===\nAnswer:\nA.\n===", "conversation",
                             record_id="t", image=None, rng=random.Random(0))
    assert "image" not in record


@needs_reference
def test_rule_teacher_replies_parse_and_state_true_counts():
    teacher = RuleTeacher(noun="object")
    records = [json.loads(line) for line in (REFERENCE / "caps_boxes_coco2014_val_80.jsonl").read_text().splitlines()]
    for record in records:
        for task in TASK_TYPES:
            reply = teacher.reply(record, task)
            assert reply == teacher.reply(record, task), "rule teacher must be deterministic"
            parsed = _parse(reply, task)
            if task == "conversation":
                n = len(record["instances"])
                assert parsed["conversations"][1]["value"].startswith(f"There {'is' if n == 1 else 'are'} {n} ")
        scene = Scene.from_record(record)
        description = teacher.reply(record, "detail_description")
        for count in scene.counts().values():
            if count > 1:
                assert f"{count} " in description
