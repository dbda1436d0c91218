"""Synthetic shapes data: the built-in dataset `make run` and the tests train and evaluate on.

Each image holds 1-3 coloured shapes (circle, square, triangle in red, green, blue, yellow) on a white
background, each in its own cell of a 3x3 grid so that counts, colours and left/right/above/below
relations are exact. Everything is a pure function of (seed, image id): the same call writes the
same bytes. Files written under `out_dir`:

    images/<id>.png          RGB PNGs (training and held-out images)
    captions.jsonl           {"id", "image", "captions": [5], "instances": [{"category", "bbox"}]}
                             (the schema of the reference caps_boxes_coco2014_val_80.jsonl)
    stage1.json              brief-description instruction + caption, one turn per image
    stage2.json              per image one rule-teacher record (conversation / detail_description /
                             complex_reasoning in turn), three conversations of short-answer
                             questions (as LLaVA-1.5 mixes grouped VQA data in) in the wording of
                             the held-out questions, and one ScienceQA-format item
    eval/captions.jsonl      captions + boxes of the held-out images
    eval/shapes_qa.jsonl     {"id", "image", "question", "answer", "question_type", "question_detail"}
    eval/scienceqa.jsonl     {"id", "question", "choices", "answer", "subject", "context", "image",
                              "solution"} in ScienceQA style

Image paths inside every file are relative to `out_dir` (pass it as the image root).
Vocabulary is deliberately small and sentences regular so a tiny LM learns it in minutes on CPU.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from llava.datagen.instruction_lists import BRIEF_PROMPTS, place_image_token
from llava.datagen.parse import reply_to_record
from llava.datagen.rule_teacher import TASK_TYPES, RuleTeacher, ShortQA, short_answer_items
from llava.datagen.scene import (
    Scene,
    SceneObject,
    horizontal_relation,
    join_words,
    region_phrase,
    relation_sentence,
    vertical_relation,
)

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
BACKGROUND = ("white", (255, 255, 255))
GRID = 3
# One-word question turns per short-answer conversation, and such conversations per image.
SHORT_ANSWER_TURNS = 6
SHORT_ANSWER_CONVERSATIONS = 3


@dataclass(frozen=True)
class ShapesDataset:
    root: Path

    @property
    def image_root(self) -> Path:
        return self.root

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def captions(self) -> Path:
        return self.root / "captions.jsonl"

    @property
    def stage1(self) -> Path:
        return self.root / "stage1.json"

    @property
    def stage2(self) -> Path:
        return self.root / "stage2.json"

    @property
    def eval_captions(self) -> Path:
        return self.root / "eval" / "captions.jsonl"

    @property
    def shapes_qa(self) -> Path:
        return self.root / "eval" / "shapes_qa.jsonl"

    @property
    def scienceqa(self) -> Path:
        return self.root / "eval" / "scienceqa.jsonl"


def sample_layout(rng: random.Random, image_size: int) -> list[dict[str, Any]]:
    """1-3 shapes with distinct (colour, shape) in distinct grid cells; boxes normalised to 0-1."""
    n = rng.randint(1, 3)
    cells = rng.sample(range(GRID * GRID), n)
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)
    cell = image_size / GRID
    out = []
    for index, (color, shape) in zip(cells, kinds, strict=True):
        row, col = divmod(index, GRID)
        side = int(cell * rng.uniform(0.55, 0.85))
        x1 = int(col * cell + rng.uniform(0, cell - side))
        y1 = int(row * cell + rng.uniform(0, cell - side))
        box_px = (x1, y1, x1 + side, y1 + side)
        bbox = [round(v / image_size, 3) for v in box_px]
        out.append({"category": f"{color} {shape}", "bbox": bbox, "box_px": box_px})
    return out


def draw_shapes(layout: list[dict[str, Any]], image_size: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND[1])
    draw = ImageDraw.Draw(image)
    for item in layout:
        color, shape = item["category"].split(" ")
        x1, y1, x2, y2 = item["box_px"]
        fill = COLORS[color]
        if shape == "circle":
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
        elif shape == "square":
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
        else:
            draw.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=fill)
    return image


def write_captions(scene_objects: list[SceneObject], rng: random.Random) -> list[str]:
    """Five regular captions of one image, in a shuffled order."""
    names = [f"a {o.category}" for o in scene_objects]
    listed = join_words(names)
    n = len(scene_objects)
    located = join_words([f"a {o.category} {region_phrase(o)}" for o in scene_objects])
    relation = relation_sentence(scene_objects[0], scene_objects[1]) if n >= 2 else None
    word = "shape" if n == 1 else "shapes"
    captions = [
        listed[0].upper() + listed[1:] + ".",
        f"There {'is' if n == 1 else 'are'} {n} {word} on a white background: {listed}.",
        f"A white picture with {listed}.",
        located[0].upper() + located[1:] + ".",
        relation or f"A single {scene_objects[0].category} {region_phrase(scene_objects[0])}.",
    ]
    rng.shuffle(captions)
    return captions


def make_caption_record(image_id: str, rng: random.Random, image_size: int):
    layout = sample_layout(rng, image_size)
    objects = [SceneObject(o["category"], tuple(o["bbox"])) for o in layout]
    record = {
        "id": image_id,
        "image": f"images/{image_id}.png",
        "captions": write_captions(objects, rng),
        "instances": [{"category": o["category"], "bbox": o["bbox"]} for o in layout],
    }
    return record, draw_shapes(layout, image_size)


def stage1_record(caps: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    prompt = place_image_token(rng.choice(BRIEF_PROMPTS), rng)
    return {"id": caps["id"], "image": caps["image"],
            "conversations": [{"from": "human", "value": prompt},
                              {"from": "gpt", "value": rng.choice(caps["captions"])}]}


def stage2_records(caps: dict[str, Any], teacher: RuleTeacher, seed: int, index: int) -> list[dict[str, Any]]:
    """The stage-2 records of the `index`-th training image: one rule-teacher record (the task type
    turns with the image, so each type covers a third of the images), SHORT_ANSWER_CONVERSATIONS
    short-answer conversations in different question orders and one ScienceQA-format item.
    The one-word answers get most of the records because binding a named shape to its image token
    is what a tiny LM learns slowest (benchmarks/README.md, Learning)."""
    task = TASK_TYPES[index % len(TASK_TYPES)]
    rng = random.Random(f"{seed}:{caps['id']}:{task}:parse")
    out = [reply_to_record(teacher.reply(caps, task), task, record_id=caps["id"], image=caps["image"], rng=rng)]
    for j in range(SHORT_ANSWER_CONVERSATIONS):
        out.append(short_answer_record(caps, random.Random(f"{seed}:{caps['id']}:short:{j}"), number=j))
    out.append(multiple_choice_record(caps, random.Random(f"{seed}:{caps['id']}:choice")))
    return out


def short_answer_record(caps: dict[str, Any], rng: random.Random, max_turns: int = SHORT_ANSWER_TURNS,
                        number: int = 0) -> dict[str, Any]:
    """Up to `max_turns` one-word questions about one image (count, colours, relations) in random
    order as one multi-turn conversation, image in the first turn: LLaVA-1.5 groups the VQA
    questions of an image the same way, and one image then supervises several answers for the
    cost of one sequence. The first question is of a random type, so every type is also trained
    as a single-turn question, which is how the held-out set asks."""
    items = short_answer_items(Scene.from_record(caps), "shape")
    rng.shuffle(items)
    turns = []
    for i, qa in enumerate(_without_mirrors(items)[:max_turns]):
        question = place_image_token(qa.question, rng) if i == 0 else qa.question
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": qa.answer}]
    return {"id": f"{caps['id']}_short_answer_{number}", "image": caps["image"], "conversations": turns}


def _without_mirrors(items: list[ShortQA]) -> list[ShortQA]:
    """Drops a relation question whose mirror ("is B left or right of A" after "is A left or right
    of B") came earlier: its answer follows from the earlier turn's without looking, and a model
    trained on both learns to flip the previous answer instead of reading the image (measured:
    held-out relations answered mirrored, below chance)."""
    seen, out = set(), []
    for qa in items:
        if qa.question_type == "position":
            key = (frozenset(qa.subjects), qa.detail in ("left", "right"))
            if key in seen:
                continue
            seen.add(key)
        out.append(qa)
    return out


def multiple_choice_record(caps: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """One ScienceQA-format item about a training image, in the evaluation's exact prompt, answered
    with the bare letter (the LLaVA-1.5 recipe teaches this format the same way)."""
    from llava.eval.scienceqa import answer_letter, build_prompt

    item = rng.choice(scienceqa_items(caps))
    prompt = build_prompt(item)
    record = {"id": f"{caps['id']}_multiple_choice"}
    if item["image"]:
        record["image"] = item["image"]
        prompt = "<image>\n" + prompt
    record["conversations"] = [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer_letter(item)}]
    return record


def eval_questions(caps: dict[str, Any]) -> list[ShortQA]:
    """Held-out questions for one image: one count, one colour and one position question when possible."""
    rng = random.Random(f"eval:{caps['id']}")
    items = short_answer_items(Scene.from_record(caps), "shape")
    chosen = []
    for qtype in ("count", "color", "position"):
        of_type = [q for q in items if q.question_type == qtype]
        if of_type:
            chosen.append(rng.choice(of_type))
    return chosen


def scienceqa_items(caps: dict[str, Any]) -> list[dict[str, Any]]:
    """Multiple-choice questions about one image, ScienceQA style (answer = choice index)."""
    rng = random.Random(f"sqa:{caps['id']}")
    scene = Scene.from_record(caps)
    n = len(scene.objects)
    items = []
    choices = ["1", "2", "3"]
    items.append({"question": "How many shapes are in the image?", "choices": choices,
                  "answer": choices.index(str(n)), "context": "",
                  "solution": f"Count the shapes one by one. There {'is' if n == 1 else 'are'} {n}."})
    kinds = [o.kind for o in scene.objects]
    named = [o for o in scene.objects if kinds.count(o.kind) == 1]
    if named:
        obj = rng.choice(named)
        options = sorted({obj.color, *rng.sample([c for c in COLORS if c != obj.color], 2)})
        items.append({"question": f"Which color is the {obj.kind}?", "choices": options,
                      "answer": options.index(obj.color), "context": "",
                      "solution": f"Look at the {obj.kind}. It is {obj.color}."})
    # A text-only item: the context holds all the facts, as ScienceQA's no-image questions do.
    if n >= 2:
        a, b = scene.objects[0], scene.objects[1]
        side, level = horizontal_relation(a, b), vertical_relation(a, b)
        rel = relation_sentence(a, b)
        if rel and (side or level):
            options = sorted([a.category, b.category])
            if side:
                question, winner = "Which shape is on the left?", a if side == "left" else b
            else:
                question, winner = "Which shape is higher up?", a if level == "above" else b
            items.append({"question": question, "choices": options, "answer": options.index(winner.category),
                          "context": rel, "solution": f"{rel} So the answer is the {winner.category}.",
                          "text_only": True})
    out = []
    for i, item in enumerate(items):
        text_only = item.pop("text_only", False)
        out.append({"id": f"{caps['id']}_sqa{i}", "subject": "natural science",
                    "image": None if text_only else caps["image"], **item})
    return out


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_shapes_dataset(out_dir: str | Path, n: int, *, seed: int = 0, image_size: int = 64,
                         n_eval: int | None = None) -> ShapesDataset:
    """Write `n` training images (+ `n_eval` held-out, default max(10, n // 10)) and their records."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if image_size < 24:
        raise ValueError(f"image_size must be >= 24 pixels, got {image_size}")
    n_eval = max(10, n // 10) if n_eval is None else n_eval
    ds = ShapesDataset(Path(out_dir))
    ds.images_dir.mkdir(parents=True, exist_ok=True)
    teacher = RuleTeacher(noun="shape", seed=seed, background="white")
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    for split, count in (("train", n), ("eval", n_eval)):
        for i in range(count):
            image_id = f"shapes_{i:06d}" if split == "train" else f"shapes_eval_{i:06d}"
            record, image = make_caption_record(image_id, random.Random(f"{seed}:{image_id}"), image_size)
            image.save(ds.root / record["image"], format="PNG")
            splits[split].append(record)
    train, held = splits["train"], splits["eval"]
    _write_jsonl(ds.captions, train)
    _write_jsonl(ds.eval_captions, held)
    stage1 = [stage1_record(c, random.Random(f"{seed}:{c['id']}:stage1")) for c in train]
    ds.stage1.write_text(json.dumps(stage1, indent=1))
    stage2 = [r for i, c in enumerate(train) for r in stage2_records(c, teacher, seed, i)]
    ds.stage2.write_text(json.dumps(stage2, indent=1))
    qa_rows = [{"id": f"{c['id']}_q{i}", "image": c["image"], "question": q.question, "answer": q.answer,
                "question_type": q.question_type, "question_detail": q.detail}
               for c in held for i, q in enumerate(eval_questions(c))]
    _write_jsonl(ds.shapes_qa, qa_rows)
    _write_jsonl(ds.scienceqa, [item for c in held for item in scienceqa_items(c)])
    return ds
