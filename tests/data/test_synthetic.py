"""The synthetic shapes data: deterministic, self-consistent, and in the reference schemas."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava.data.synthetic import COLORS, write_shapes_dataset
from llava.datagen.rule_teacher import TASK_TYPES
from tests.paths import REFERENCE as SHARED_REFERENCE

REFERENCE = SHARED_REFERENCE / "caps_boxes_coco2014_val_80.jsonl"


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), 40, seed=3, n_eval=12)


def test_same_seed_same_bytes_other_seed_differs(shapes, tmp_path):
    again = write_shapes_dataset(tmp_path / "again", 40, seed=3, n_eval=12)
    other = write_shapes_dataset(tmp_path / "other", 40, seed=4, n_eval=12)
    assert _tree_digest(shapes.root) == _tree_digest(again.root)
    assert _tree_digest(shapes.root) != _tree_digest(other.root)


def test_captions_follow_reference_schema(shapes):
    reference = json.loads(REFERENCE.read_text().splitlines()[0]) if REFERENCE.exists() else None
    rows = _jsonl(shapes.captions)
    assert len(rows) == 40 and len({r["id"] for r in rows}) == 40
    for row in rows:
        if reference is not None:
            assert set(row) == set(reference)
            assert set(row["instances"][0]) == set(reference["instances"][0])
        assert len(row["captions"]) == 5 and all(isinstance(c, str) and c for c in row["captions"])
        assert 1 <= len(row["instances"]) <= 3
        for inst in row["instances"]:
            x1, y1, x2, y2 = inst["bbox"]
            assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1


def test_boxes_match_drawn_pixels(shapes):
    """Each box must enclose its shape's colour and the colour must appear nowhere else."""
    for row in _jsonl(shapes.captions)[:15]:
        image = Image.open(shapes.root / row["image"])
        assert image.mode == "RGB" and image.size == (64, 64)
        pixels = np.asarray(image)
        for inst in row["instances"]:
            color = inst["category"].split()[0]
            mask = np.all(pixels == np.array(COLORS[color]), axis=-1)
            others = [i for i in row["instances"] if i["category"].split()[0] == color]
            inside = np.zeros_like(mask)
            for other in others:
                x1, y1, x2, y2 = (round(v * 64) for v in other["bbox"])
                inside[y1:y2, x1:x2] = True
            assert mask.sum() > 10, f"{row['id']}: {inst['category']} not drawn"
            assert not (mask & ~inside).any(), f"{row['id']}: {color} pixels outside its boxes"


def test_stage1_and_stage2_records(shapes):
    stage1 = json.loads(shapes.stage1.read_text())
    assert len(stage1) == 40
    captions = {r["id"]: r["captions"] for r in _jsonl(shapes.captions)}
    for rec in stage1:
        human, gpt = rec["conversations"]
        assert human["value"].count("<image>") == 1
        assert human["value"].startswith("<image>\n") or human["value"].endswith("\n<image>")
        assert gpt["value"] in captions[rec["id"]]
        assert (shapes.root / rec["image"]).is_file()
    placements = {r["conversations"][0]["value"].startswith("<image>") for r in stage1}
    assert placements == {True, False}, "the image token must be placed both before and after"

    stage2 = json.loads(shapes.stage2.read_text())
    kinds = {re.sub(r"_\d+$", "", rec["id"].split("_", 2)[-1]) for rec in stage2}
    assert set(TASK_TYPES) <= kinds and {"short_answer", "multiple_choice"} <= kinds
    for rec in stage2:
        turns = rec["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert sum(t["value"].count("<image>") for t in turns) == (1 if rec.get("image") else 0)
    for rec in (r for r in stage2 if r["id"].endswith("_multiple_choice")):
        human, gpt = rec["conversations"]
        assert "Options: (A)" in human["value"] and gpt["value"] in {"A", "B", "C"}
        assert all(t["value"].strip() for t in turns)


def test_eval_questions_have_exact_answers_on_held_out_images(shapes):
    qa = _jsonl(shapes.shapes_qa)
    held = {r["id"]: r for r in _jsonl(shapes.eval_captions)}
    train_images = {r["image"] for r in _jsonl(shapes.captions)}
    assert {q["question_type"] for q in qa} == {"count", "color", "position"}
    for q in qa:
        assert q["image"] not in train_images
        image_id = q["id"].rsplit("_q", 1)[0]
        instances = held[image_id]["instances"]
        if q["question_type"] == "count":
            assert q["answer"] == str(len(instances))
        elif q["question_type"] == "color":
            kind = q["question"].split("the ")[1].split("?")[0]
            assert [i["category"] for i in instances if i["category"].endswith(kind)] == [f"{q['answer']} {kind}"]
        else:
            assert q["answer"] in {"left", "right", "above", "below"} and q["answer"] == q["question_detail"]
            a, b = re.match(r"Is the (.+?) (?:to the left or to the right of|above or below) the (.+?)\?",
                            q["question"]).groups()
            box = {i["category"]: i["bbox"] for i in instances}
            axis = 0 if q["answer"] in ("left", "right") else 1
            ca = (box[a][axis] + box[a][axis + 2]) / 2
            cb = (box[b][axis] + box[b][axis + 2]) / 2
            assert (ca < cb) == (q["answer"] in ("left", "above"))


def test_short_answer_conversations_ask_every_type_first_with_true_answers(shapes):
    """One grouped conversation of one-word questions per image; each answer is what the scene
    says, every question type also opens a conversation (how the held-out set asks it), and no
    relation question follows its own mirror (whose answer would give it away without the image)."""
    from llava.data.synthetic import SHORT_ANSWER_TURNS
    from llava.datagen.rule_teacher import short_answer_items
    from llava.datagen.scene import Scene

    def axis_key(q):
        return frozenset(q.subjects), q.detail in ("left", "right")

    captions = {r["id"]: r for r in _jsonl(shapes.captions)}
    from llava.data.synthetic import SHORT_ANSWER_CONVERSATIONS

    grouped = [r for r in json.loads(shapes.stage2.read_text()) if "_short_answer_" in r["id"]]
    assert len(grouped) == SHORT_ANSWER_CONVERSATIONS * len(captions)
    first_types, mirrors_possible = set(), 0
    for rec in grouped:
        truth = {(q.question, q.answer): q
                 for q in short_answer_items(Scene.from_record(captions[rec["id"].rsplit("_short_answer_", 1)[0]]), "shape")}
        turns = rec["conversations"]
        pairs = [(turns[i]["value"].replace("<image>", "").strip(), turns[i + 1]["value"]) for i in range(0, len(turns), 2)]
        assert 1 <= len(pairs) <= SHORT_ANSWER_TURNS and len(set(pairs)) == len(pairs)
        assert all(p in truth for p in pairs), pairs
        relations = [axis_key(truth[p]) for p in pairs if truth[p].question_type == "position"]
        assert len(set(relations)) == len(relations), pairs
        distinct = {axis_key(q) if q.question_type == "position" else key for key, q in truth.items()}
        mirrors_possible += len(truth) - len(distinct)
        assert len(pairs) == min(SHORT_ANSWER_TURNS, len(distinct))
        first_types.add(truth[pairs[0]].question_type)
    assert first_types == {"count", "color", "position"}
    assert mirrors_possible > 0  # the scenes do offer mirrored pairs: the check above is not vacuous


def test_scienceqa_items(shapes):
    items = _jsonl(shapes.scienceqa)
    assert items and any(i["image"] is None for i in items) and any(i["image"] for i in items)
    for item in items:
        assert {"question", "choices", "answer", "subject", "context"} <= set(item)
        assert 0 <= item["answer"] < len(item["choices"]) and len(set(item["choices"])) == len(item["choices"])
        if item["image"] is None:
            assert item["context"], "text-only questions must carry their facts in the context"
            assert item["choices"][item["answer"]] in item["solution"]


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n must be"):
        write_shapes_dataset(tmp_path, 0)
    with pytest.raises(ValueError, match="image_size"):
        write_shapes_dataset(tmp_path, 2, image_size=8)
