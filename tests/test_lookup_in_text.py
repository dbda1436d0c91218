"""benchmarks/lookup_in_text.py, the text-only control for issue 19: its cell tokens must say
exactly what the image would show (each shape in its grid cell, row-major), or its verdict on
whether the tiny LM can learn the lookup would mean nothing; and the script runs end to end."""

from __future__ import annotations

import importlib.util
import random
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "lookup_in_text.py"


def _module():
    spec = importlib.util.spec_from_file_location("lookup_in_text", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cells(prompt: str) -> list[str]:
    return re.findall(r"<[a-z_]+>", prompt.split("\n", 1)[0])


def test_cell_tokens_place_each_shape_where_the_answers_say_it_is():
    mod = _module()
    rng = random.Random(7)
    checked = {"count": 0, "color": 0, "position": 0}
    for qtype in checked:
        for _ in range(60):
            prompt, qa, layout = mod.example(rng, qtype)
            cells = _cells(prompt)
            assert len(cells) == 9 and all(c in mod.cell_tokens() for c in cells)
            where = {c.strip("<>").replace("_", " "): i for i, c in enumerate(cells) if c != mod.EMPTY}
            assert sorted(where) == sorted(o["category"] for o in layout)
            if qtype == "count":
                assert qa.answer == str(len(where))
            elif qtype == "color":
                kind = qa.question.split("color is the ")[1].split("?")[0]
                assert [cat.split()[0] for cat in where if cat.endswith(" " + kind)] == [qa.answer]
            else:
                (row_a, col_a), (row_b, col_b) = (divmod(where[s], 3) for s in qa.subjects)
                expected = {"left": col_a < col_b, "right": col_a > col_b, "above": row_a < row_b,
                            "below": row_a > row_b}
                assert expected[qa.answer], (prompt, qa)
            checked[qtype] += 1
    assert checked == {"count": 60, "color": 60, "position": 60}


def test_lookup_in_text_runs_and_reports_accuracy_next_to_its_baselines():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--steps", "6", "--evals", "1", "--eval-questions", "8"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = dict(kv.split("=") for kv in proc.stdout.strip().splitlines()[-1].removeprefix("RESULT ").split())
    for key in ("count", "color", "position", "majority.count", "majority.color", "majority.position",
                "present_colour"):
        assert 0.0 <= float(result[key]) <= 1.0, key
    # Naming a colour of the scene beats always naming the most frequent colour.
    assert float(result["present_colour"]) > float(result["majority.color"])
    assert "[lookup] step 6/6" in proc.stdout
