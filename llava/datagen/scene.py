"""What a text-only teacher can know about an image: captions plus labelled, normalised boxes.

The paper's teacher never sees pixels; it reasons over `category: [x1, y1, x2, y2]` lines. This
module turns those boxes into the small set of facts the rule-based teacher and the synthetic
question writer both need (where an object is, which of two objects is left of / above the other,
how many of each kind there are), so the training data and the held-out questions use one
definition of "left", "above" and "top left".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

# Colour words recognised at the start of a category ("red circle" -> colour red, kind circle).
COLORS = ("red", "green", "blue", "yellow", "orange", "purple", "black", "white", "gray", "brown", "pink")

# Centres closer than this along an axis are not called left/right (or above/below) of each other:
# a definite answer needs a visible gap, as the paper asks of its teacher.
RELATION_MARGIN = 0.15


@dataclass(frozen=True)
class SceneObject:
    category: str
    bbox: tuple[float, float, float, float]

    @property
    def color(self) -> str | None:
        first = self.category.split(" ", 1)[0]
        return first if first in COLORS and " " in self.category else None

    @property
    def kind(self) -> str:
        """The category without a leading colour word ("red circle" -> "circle")."""
        return self.category.split(" ", 1)[1] if self.color else self.category

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.bbox
        return (x1 + x2) / 2, (y1 + y2) / 2

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.bbox
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


@dataclass(frozen=True)
class Scene:
    captions: tuple[str, ...]
    objects: tuple[SceneObject, ...]

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Scene:
        """Build from a captions+boxes record (the schema of caps_boxes_coco2014_val_80.jsonl)."""
        captions = record.get("captions")
        instances = record.get("instances")
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise ValueError("record field 'captions' must be a list of strings")
        if not isinstance(instances, list):
            raise ValueError("record field 'instances' must be a list")
        objects = []
        for i, inst in enumerate(instances):
            bbox = inst.get("bbox") if isinstance(inst, dict) else None
            if not isinstance(bbox, list | tuple) or len(bbox) != 4:
                raise ValueError(f"instance {i}: 'bbox' must be [x1, y1, x2, y2]")
            objects.append(SceneObject(str(inst.get("category", "object")), tuple(float(v) for v in bbox)))
        return cls(tuple(captions), tuple(objects))

    def counts(self) -> Counter[str]:
        return Counter(o.category for o in self.objects)

    def unique(self, obj: SceneObject) -> bool:
        """True when `the <category>` names exactly one object."""
        return self.counts()[obj.category] == 1


IRREGULAR_PLURALS = {"person": "people", "man": "men", "woman": "women", "child": "children",
                     "mouse": "mice", "sheep": "sheep", "knife": "knives", "skis": "skis", "scissors": "scissors"}


def plural(noun: str, n: int = 2) -> str:
    if n == 1:
        return noun
    head, _, last = noun.rpartition(" ")
    if last in IRREGULAR_PLURALS:
        return f"{head} {IRREGULAR_PLURALS[last]}".strip()
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def count_phrase(n: int, noun: str) -> str:
    return f"{n} {plural(noun, n)}"


def with_article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def join_words(items: list[str]) -> str:
    if not items:
        return ""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def region(obj: SceneObject) -> str:
    """Coarse location on a 3x3 grid: "top left", "center", "bottom", ..."""
    cx, cy = obj.center
    col = "left" if cx < 1 / 3 else ("right" if cx > 2 / 3 else "")
    row = "top" if cy < 1 / 3 else ("bottom" if cy > 2 / 3 else "")
    if row and col:
        return f"{row} {col}"
    return row or col or "center"


def region_phrase(obj: SceneObject) -> str:
    """"in the top left", "on the left", "at the top", "in the center"."""
    return place_phrase(region(obj))


def place_phrase(where: str) -> str:
    if where in ("left", "right"):
        return f"on the {where}"
    if where in ("top", "bottom"):
        return f"at the {where}"
    return f"in the {where}"


def horizontal_relation(a: SceneObject, b: SceneObject) -> str | None:
    """"left" / "right" when a is clearly to that side of b, else None."""
    dx = a.center[0] - b.center[0]
    if abs(dx) < RELATION_MARGIN:
        return None
    return "left" if dx < 0 else "right"


def vertical_relation(a: SceneObject, b: SceneObject) -> str | None:
    """"above" / "below" when a is clearly higher / lower than b (y grows downwards), else None."""
    dy = a.center[1] - b.center[1]
    if abs(dy) < RELATION_MARGIN:
        return None
    return "above" if dy < 0 else "below"


def relation_sentence(a: SceneObject, b: SceneObject) -> str | None:
    """One sentence relating two objects, preferring the horizontal axis."""
    side = horizontal_relation(a, b)
    if side:
        return f"The {a.category} is to the {side} of the {b.category}."
    level = vertical_relation(a, b)
    if level:
        return f"The {a.category} is {level} the {b.category}."
    return None
