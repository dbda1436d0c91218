"""A teacher that writes the paper's three instruction types from boxes alone, without a model.

It answers in exactly the format a GPT teacher is asked for (`Question:` / `===` / `Answer:` blocks,
or a plain paragraph for detailed descriptions), so its replies go through the same parser as a
remote teacher's. Used for the synthetic shapes data and offline runs. Every statement is derived
from the boxes with the definitions in `scene.py`, so only questions with definite answers appear.

The short-answer templates here are shared with the held-out evaluation questions, so what the
model is trained to answer and what it is scored on use one wording.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from llava.datagen.scene import (
    Scene,
    count_phrase,
    horizontal_relation,
    join_words,
    place_phrase,
    plural,
    region,
    region_phrase,
    relation_sentence,
    vertical_relation,
    with_article,
)

TASK_TYPES: tuple[str, ...] = ("conversation", "detail_description", "complex_reasoning")
SHORT_ANSWER_SUFFIX = "Answer with one word."
MIRROR = {"left": "right", "right": "left"}


@dataclass(frozen=True)
class ShortQA:
    question: str
    answer: str
    question_type: str  # count | color | position
    detail: str = ""  # position: left/right/above/below
    subjects: tuple[str, ...] = ()  # position: the two categories compared, in question order


def format_qa(pairs: list[tuple[str, str]]) -> str:
    """Render Q/A pairs in the reply format the teacher prompts ask for."""
    return "\n".join(f"Question:\n{q}\n===\nAnswer:\n{a}\n===" for q, a in pairs)


def count_question(noun: str) -> str:
    return f"How many {plural(noun)} are in the image?"


def color_question(kind: str) -> str:
    return f"What color is the {kind}?"


def horizontal_question(a: str, b: str) -> str:
    return f"Is the {a} to the left or to the right of the {b}?"


def vertical_question(a: str, b: str) -> str:
    return f"Is the {a} above or below the {b}?"


def short_answer_items(scene: Scene, noun: str) -> list[ShortQA]:
    """Every question with a definite one-word answer this scene supports."""
    items = [ShortQA(f"{count_question(noun)} {SHORT_ANSWER_SUFFIX}", str(len(scene.objects)), "count")]
    kinds = [o.kind for o in scene.objects]
    for obj in scene.objects:
        if obj.color and kinds.count(obj.kind) == 1:
            items.append(ShortQA(f"{color_question(obj.kind)} {SHORT_ANSWER_SUFFIX}", obj.color, "color"))
    for a in scene.objects:
        for b in scene.objects:
            if a is b or not (scene.unique(a) and scene.unique(b)):
                continue
            side = horizontal_relation(a, b)
            if side:
                q = f"{horizontal_question(a.category, b.category)} {SHORT_ANSWER_SUFFIX}"
                items.append(ShortQA(q, side, "position", side, (a.category, b.category)))
            level = vertical_relation(a, b)
            if level:
                q = f"{vertical_question(a.category, b.category)} {SHORT_ANSWER_SUFFIX}"
                items.append(ShortQA(q, level, "position", level, (a.category, b.category)))
    return items


class RuleTeacher:
    """Deterministic replies: the same (record id, task type, seed) always gives the same text."""

    def __init__(self, noun: str = "object", seed: int = 0, background: str | None = None):
        self.noun = noun
        self.seed = seed
        self.background = background

    def rng_for(self, record_id: str, task_type: str) -> random.Random:
        return random.Random(f"{self.seed}:{record_id}:{task_type}")

    def reply(self, record: dict[str, Any], task_type: str) -> str:
        scene = Scene.from_record(record)
        rng = self.rng_for(str(record.get("id", "")), task_type)
        if task_type == "conversation":
            return format_qa(self.conversation(scene, rng))
        if task_type == "detail_description":
            return self.description(scene)
        if task_type == "complex_reasoning":
            return format_qa([self.reasoning(scene, rng)])
        raise ValueError(f"unknown task type {task_type!r}; expected one of {', '.join(TASK_TYPES)}")

    # -- conversation -------------------------------------------------------------------------
    def _count_answer(self, scene: Scene) -> str:
        n = len(scene.objects)
        verb = "is" if n == 1 else "are"
        return f"There {verb} {count_phrase(n, self.noun)} in the image."

    def conversation(self, scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
        pairs = [(count_question(self.noun), self._count_answer(scene))]
        kinds = [o.kind for o in scene.objects]
        extra: list[tuple[str, str]] = []
        for obj in scene.objects:
            if obj.color and kinds.count(obj.kind) == 1:
                extra.append((color_question(obj.kind), f"The {obj.kind} is {obj.color}."))
            if scene.unique(obj):
                extra.append((f"Where is the {obj.category}?", f"The {obj.category} is {region_phrase(obj)}."))
        for a in scene.objects:
            for b in scene.objects:
                if a is b or not (scene.unique(a) and scene.unique(b)):
                    continue
                if horizontal_relation(a, b):
                    extra.append((horizontal_question(a.category, b.category), relation_sentence(a, b) or ""))
                elif vertical_relation(a, b):
                    level = vertical_relation(a, b)
                    extra.append((vertical_question(a.category, b.category),
                                  f"The {a.category} is {level} the {b.category}."))
        rng.shuffle(extra)
        pairs.extend(extra[: rng.randint(2, 4)])
        return pairs

    # -- detailed description -----------------------------------------------------------------
    def description(self, scene: Scene) -> str:
        n = len(scene.objects)
        if n == 0:
            return f"The image is empty: there is no {self.noun} in it."
        where = f" on a {self.background} background" if self.background else ""
        verb = "is" if n == 1 else "are"
        counts = scene.counts()
        kinds = [count_phrase(c, cat) if c > 1 else with_article(cat) for cat, c in counts.items()]
        sentences = [f"There {verb} {count_phrase(n, self.noun)}{where}: {join_words(kinds)}."]
        for obj in scene.objects[:6]:
            if scene.unique(obj):
                sentences.append(f"The {obj.category} is {region_phrase(obj)}.")
        uniques = [o for o in scene.objects if scene.unique(o)]
        for a, b in zip(uniques, uniques[1:], strict=False):
            rel = relation_sentence(a, b)
            if rel:
                sentences.append(rel)
        return " ".join(sentences)

    # -- complex reasoning --------------------------------------------------------------------
    def reasoning(self, scene: Scene, rng: random.Random) -> tuple[str, str]:
        options = [self._mirror]
        if len(scene.objects) >= 2:
            options += [self._removal, self._largest]
            if all(o.color for o in scene.objects):
                options.append(self._same_color)
        rng.shuffle(options)
        for make in options:
            pair = make(scene, rng)
            if pair:
                return pair
        return self._mirror(scene, rng) or ("What is in the image?", self.description(scene))

    def _removal(self, scene: Scene, rng: random.Random) -> tuple[str, str] | None:
        target = rng.choice([o for o in scene.objects if scene.unique(o)] or [None])
        if target is None:
            return None
        n = len(scene.objects)
        rest = [o.category for o in scene.objects if o is not target]
        q = f"If the {target.category} were taken away, how many {plural(self.noun)} would be left?"
        a = (f"The image shows {count_phrase(n, self.noun)}. Taking away the {target.category} removes one "
             f"of them, so {count_phrase(n - 1, self.noun)} would be left: "
             f"{join_words(['the ' + r for r in rest])}.")
        return q, a

    def _largest(self, scene: Scene, rng: random.Random) -> tuple[str, str] | None:
        ranked = sorted(scene.objects, key=lambda o: o.area, reverse=True)
        big, second = ranked[0], ranked[1]
        if not scene.unique(big) or big.area < 1.3 * second.area:
            return None
        q = f"Which {self.noun} takes up the most space in the image, and where is it?"
        a = (f"The {big.category} is the largest. It covers more of the image than "
             f"{join_words(['the ' + o.category for o in ranked[1:]])}, and it is {region_phrase(big)}.")
        return q, a

    def _same_color(self, scene: Scene, rng: random.Random) -> tuple[str, str] | None:
        colors = {o.color for o in scene.objects}
        listed = join_words([f"the {o.kind} is {o.color}" for o in scene.objects])
        q = f"Do all the {plural(self.noun)} in the image have the same color?"
        verdict = "Yes" if len(colors) == 1 else "No"
        tail = "so they share one color." if len(colors) == 1 else "so they have different colors."
        return q, f"{verdict}. Looking at each one, {listed}, {tail}"

    def _mirror(self, scene: Scene, rng: random.Random) -> tuple[str, str] | None:
        uniques = [o for o in scene.objects if scene.unique(o) and region(o) != "center"]
        if not uniques:
            return None
        obj = rng.choice(uniques)
        now = region(obj)
        flipped = " ".join(MIRROR.get(w, w) for w in now.split())
        q = f"If the image were flipped from left to right, where would the {obj.category} be?"
        if flipped == now:
            a = (f"The {obj.category} is {place_phrase(now)}, which is neither left nor right, so after the "
                 f"flip it would stay {place_phrase(now)}.")
        else:
            a = (f"The {obj.category} is {place_phrase(now)} now. A left-to-right flip swaps left and right but "
                 f"keeps top and bottom, so it would end up {place_phrase(flipped)}.")
        return q, a
