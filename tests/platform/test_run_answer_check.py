"""`llavactl run` checks the demo answer against the image's true shape count."""

from __future__ import annotations

import json

import pytest

from llava_platform.commands.run import _true_count, answer_verdict


@pytest.mark.parametrize("answer,verdict", [
    ("There are 3 shapes in the image.", "right"),
    ("Three.", "right"),
    ("3", "right"),
    ("There are 2 shapes in the image.", "wrong"),
    ("2 or 3", "wrong"),  # hedging between counts is not an answer
    ("", "wrong"),
])
def test_answer_verdict(answer, verdict):
    assert answer_verdict(answer, 3).startswith(verdict + ": the image holds 3 shapes")


def test_true_count_reads_the_held_out_record(tmp_path):
    (tmp_path / "data" / "eval").mkdir(parents=True)
    rows = [{"id": "e0", "image": "images/shapes_eval_000000.png", "instances": [{"category": "red circle"}]},
            {"id": "e1", "image": "images/shapes_eval_000001.png", "instances": [{}, {}]}]
    (tmp_path / "data" / "eval" / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _true_count(tmp_path, tmp_path / "data" / "images" / "shapes_eval_000001.png") == 2
    assert _true_count(tmp_path, tmp_path / "data" / "images" / "other.png") is None
    assert answer_verdict("1", 1) == "right: the image holds 1 shape"
