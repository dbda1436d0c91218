"""The evaluation report puts each question type's accuracy next to what needs no image: the
majority answer, and the same questions asked with a blank image."""

from __future__ import annotations

import pytest

from llava.eval.report import flat_metrics, majority_baseline, markdown_report
from llava.eval.shapes import score_shapes

ITEMS = [
    {"id": "a", "question_type": "count", "answer": "2"},
    {"id": "b", "question_type": "count", "answer": "2"},
    {"id": "c", "question_type": "count", "answer": "Three"},
    {"id": "d", "question_type": "count", "answer": "3"},
    {"id": "e", "question_type": "count", "answer": "two"},
    {"id": "f", "question_type": "color", "answer": "red"},
    {"id": "g", "question_type": "color", "answer": "blue"},
]


def test_majority_baseline_counts_normalised_answers_per_type():
    rows = score_shapes(ITEMS, ["x"] * len(ITEMS))["rows"]
    base = majority_baseline(rows)
    # "2", "2", "two" are one answer (3 of 5), as exact match would score them.
    assert base["count"] == pytest.approx(3 / 5)
    assert base["color"] == pytest.approx(1 / 2)
    assert base["all"] == pytest.approx((3 + 1) / 7)


def test_report_and_metrics_show_baseline_and_blank_image_control():
    real = score_shapes(ITEMS, ["2", "2", "3", "3", "2", "red", "blue"])
    real["blank_image"] = score_shapes(ITEMS, ["2"] * 5 + ["red", "red"])
    results = {"model": "m", "shapes": real}
    metrics = flat_metrics(results)
    assert metrics["shapes.accuracy.count"] == 1.0
    assert metrics["shapes.majority.count"] == pytest.approx(0.6)
    assert metrics["shapes.blank_image.accuracy.count"] == pytest.approx(0.6)
    assert metrics["shapes.blank_image.accuracy"] == pytest.approx(4 / 7)
    report = markdown_report(results)
    assert "| question type | n | correct | accuracy | majority answer | blank image |" in report
    assert "| count | 5 | 5 | 100.0% | 60.0% | 60.0% |" in report
    assert "| color | 2 | 2 | 100.0% | 50.0% | 50.0% |" in report


def test_report_without_blank_control_says_not_available():
    results = {"model": "m", "shapes": score_shapes(ITEMS, ["2"] * len(ITEMS))}
    assert "shapes.blank_image.accuracy" not in flat_metrics(results)
    assert "| color | 2 | 0 | 0.0% | 50.0% | n/a |" in markdown_report(results)
