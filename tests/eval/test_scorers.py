"""Scorers against hand-written cases; every expected number below was counted by hand."""

from __future__ import annotations

import pytest

from llava.eval import judge, scienceqa, shapes
from tests.paths import REFERENCE as SHARED_REFERENCE

REFERENCE_RULES = SHARED_REFERENCE / "rule.json"

# ----------------------------------------------------------------------------- shapes exact match


@pytest.mark.parametrize(("prediction", "answer", "expected"), [
    ("3", "3", True),
    ("Three.", "3", True),  # number word + case + punctuation
    ("  RED ", "red", True),
    ("the left", "left", True),  # article
    ("Above!", "above", True),
    ("3 shapes", "3", False),  # extra words are wrong
    ("reddish", "red", False),
    ("", "red", False),
    ("four", "3", False),
    ("twenty", "20", True),
])
def test_exact_match_normalisation(prediction, answer, expected):
    assert shapes.exact_match(prediction, answer) is expected


def test_shapes_accuracy_per_type():
    items = [
        {"id": "a", "answer": "3", "question_type": "count"},
        {"id": "b", "answer": "2", "question_type": "count"},
        {"id": "c", "answer": "red", "question_type": "color"},
        {"id": "d", "answer": "blue", "question_type": "color"},
        {"id": "e", "answer": "left", "question_type": "position"},
    ]
    preds = ["three", "3", "Red.", "blue", "right"]
    result = shapes.score_shapes(items, preds)
    # correct: a, c, d -> 3 of 5
    assert (result["n"], result["correct"]) == (5, 3)
    assert result["accuracy"] == pytest.approx(0.6)
    assert result["per_type"]["count"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert result["per_type"]["color"] == {"n": 2, "correct": 2, "accuracy": 1.0}
    assert result["per_type"]["position"] == {"n": 1, "correct": 0, "accuracy": 0.0}
    with pytest.raises(ValueError, match="5 items but 4"):
        shapes.score_shapes(items, preds[:4])


# ----------------------------------------------------------------------------- ScienceQA


def test_scienceqa_prompt_format():
    item = {"question": "Which shape is on the left?", "context": "The circle is left of the square.",
            "choices": ["circle", "square"], "answer": 0}
    assert scienceqa.build_prompt(item) == (
        "Which shape is on the left?\n"
        "Context: The circle is left of the square.\n"
        "Options: (A) circle (B) square\n"
        "Answer with the option's letter from the given choices directly."
    )
    no_context = scienceqa.build_prompt({**item, "context": ""})
    assert "Context:" not in no_context and no_context.startswith("Which shape is on the left?\nOptions: (A)")


@pytest.mark.parametrize(("reply", "n", "expected"), [
    ("B", 3, "B"),
    (" C \n", 3, "C"),
    ("A.", 3, "A"),
    ("A. circle", 3, "A"),
    ("The answer is B.", 3, "B"),
    ("The circle is red, so it matches. The answer is C.", 3, "C"),
    ("The answer is A", 2, "A"),
    ("D", 3, None),  # not an offered letter
    ("The answer is D.", 3, None),
    ("b", 3, None),  # lower case is not one of the accepted forms
    ("(B)", 3, None),
    ("B) circle", 3, None),
    ("circle", 3, None),
    ("The answer is A. No wait. The answer is B.", 3, None),  # two different letters
    ("The answer is A. So: The answer is A.", 3, "A"),
    ("the answer is B.", 3, None),  # the phrase is matched as written
    ("Answer: B", 3, None),
    ("", 3, None),
])
def test_scienceqa_answer_extraction(reply, n, expected):
    assert scienceqa.extract_answer(reply, n) == expected


def test_scienceqa_accuracy_by_hand():
    items = [
        {"id": "1", "choices": ["1", "2", "3"], "answer": 2, "subject": "natural science", "image": "i1.png"},
        {"id": "2", "choices": ["red", "blue"], "answer": 0, "subject": "natural science", "image": "i2.png"},
        {"id": "3", "choices": ["x", "y"], "answer": 1, "subject": "language science", "image": None},
        {"id": "4", "choices": ["x", "y", "z"], "answer": 0, "subject": "language science", "image": None},
        {"id": "5", "choices": ["p", "q"], "answer": "B", "subject": "social science", "image": "i5.png"},
    ]
    replies = ["C", "The answer is B.", "B. y", "I think x", "B"]
    # 1 correct; 2 parsed wrong; 3 correct; 4 unparseable (wrong); 5 correct
    result = scienceqa.score_scienceqa(items, replies)
    assert (result["n"], result["correct"], result["unparseable"]) == (5, 3, 1)
    assert result["accuracy"] == pytest.approx(0.6)
    assert result["unparseable_rate"] == pytest.approx(0.2)
    assert result["per_subject"]["natural science"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert result["per_subject"]["language science"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert result["per_subject"]["social science"] == {"n": 1, "correct": 1, "accuracy": 1.0}
    assert result["image"] == {"n": 3, "correct": 2, "accuracy": pytest.approx(2 / 3)}
    assert result["text_only"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert [r["extracted"] for r in result["rows"]] == ["C", "B", "B", None, "B"]


# ----------------------------------------------------------------------------- judge


@pytest.mark.parametrize(("reply", "expected"), [
    ("8 7\nAssistant 1 is more detailed.", (8.0, 7.0)),
    ("8,7\nbecause", (8.0, 7.0)),
    ("8, 7", (8.0, 7.0)),
    ("(9, 6)\nThe first is better.", (9.0, 6.0)),
    ("\n  7.5 8\nwhy", (7.5, 8.0)),
    ("10 1", (10.0, 1.0)),
    ("Scores: 8 7", None),
    ("8\n7", None),
    ("8 7 6", None),
    ("11 7", None),  # outside 1-10
    ("0 5", None),
    ("I cannot judge this.", None),
    ("", None),
    (None, None),
])
def test_parse_judge_scores(reply, expected):
    assert judge.parse_scores(reply) == expected


def test_relative_scores_by_hand():
    rows = [
        {"category": "conv", "reply": "8 6\n..."},
        {"category": "conv", "reply": "10 9"},
        {"category": "conv", "reply": "no scores here"},  # counted, not dropped
        {"category": "detail", "reply": "6, 3"},
        {"category": "complex", "reply": "5 5"},
        {"category": "complex", "reply": None},  # the judge call failed
    ]
    result = judge.relative_scores(rows)
    conv = result["per_category"]["conv"]
    # conv: reference mean (8+10)/2=9, candidate (6+9)/2=7.5 -> 83.33
    assert (conv["n"], conv["parsed"], conv["unparseable"]) == (3, 2, 1)
    assert conv["relative"] == pytest.approx(7.5 / 9 * 100)
    assert result["per_category"]["detail"]["relative"] == pytest.approx(50.0)
    assert result["per_category"]["complex"]["relative"] == pytest.approx(100.0)
    assert result["per_category"]["complex"]["unparseable"] == 1
    # overall pools the 4 parsed: reference 8+10+6+5=29, candidate 6+9+3+5=23
    overall = result["overall"]
    assert (overall["n"], overall["parsed"], overall["unparseable"]) == (6, 4, 2)
    assert overall["relative"] == pytest.approx(23 / 29 * 100)


def test_relative_scores_with_nothing_parsed():
    result = judge.relative_scores([{"category": "conv", "reply": "?"}])
    assert result["overall"]["relative"] is None and result["overall"]["unparseable"] == 1


@pytest.mark.skipif(not REFERENCE_RULES.is_file(), reason="reference rule.json not present")
def test_judge_prompt_from_reference_rule_file():
    rules = judge.load_rules(REFERENCE_RULES)
    assert {"conv", "detail", "complex", "default"} <= set(rules)
    messages = judge.build_judge_messages("What is red?", "A red circle.", "The circle.", "A circle.",
                                          judge.rule_for(rules, "conv"))
    assert [m["role"] for m in messages] == ["system", "user"]
    body = messages[1]["content"]
    order = ["[Context]\nA red circle.", "[Question]\nWhat is red?", "[Assistant 1]\nThe circle.",
             "[End of Assistant 1]", "[Assistant 2]\nA circle.", "[End of Assistant 2]", "[System]\n"]
    positions = [body.index(part) for part in order]
    assert positions == sorted(positions)
    assert rules["conv"].prompt in body
    # unknown categories fall back to the file's default rule
    assert judge.rule_for(rules, "something_else") == rules["default"]


def test_shipped_rules_and_bad_rule_files(tmp_path):
    rules = judge.load_rules()
    for category in ("conv", "detail", "complex", "default"):
        assert "first line" in rules[category].prompt
    bad = tmp_path / "rules.json"
    bad.write_text('{"conv": {"role": "Assistant"}}')
    with pytest.raises(judge.RuleFileError, match="'conv'.*'prompt'"):
        judge.load_rules(bad)
    bad.write_text("not json")
    with pytest.raises(judge.RuleFileError):
        judge.load_rules(bad)
    with pytest.raises(judge.RuleFileError, match="no judge rule"):
        judge.rule_for({"conv": rules["conv"]}, "detail")


def test_bench_items_cover_three_categories():
    record = {"id": "img1", "image": "images/img1.png",
              "captions": ["A red circle and a blue square.", "Two shapes.", "A red circle.", "A blue square.",
                           "The red circle is to the left of the blue square."],
              "instances": [{"category": "red circle", "bbox": [0.1, 0.1, 0.3, 0.3]},
                            {"category": "blue square", "bbox": [0.6, 0.1, 0.8, 0.3]}]}
    items = judge.bench_items_from_captions([record])
    assert sorted(i["category"] for i in items) == ["complex", "conv", "detail"]
    for item in items:
        assert item["question"] and item["reference"] and item["image"] == "images/img1.png"
        assert "red circle: [0.100, 0.100, 0.300, 0.300]" in item["context"]
    assert judge.bench_items_from_captions([record]) == items  # deterministic
