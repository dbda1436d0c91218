"""Can the tiny LM learn to look a named shape up in its context, with no image at all?

    python benchmarks/lookup_in_text.py                          # 2-layer LM, 2000 steps
    python benchmarks/lookup_in_text.py --layers 4 --steps 4000

The control for issue 19 (colour and position answers of the `make run` champion): the same
scenes (`sample_layout`), questions (`short_answer_items`) and tiny Llama shape (`tiny_lm_config`)
as the LLaVA recipe, but the image is replaced by nine cell tokens in row-major order, one per
3x3 grid cell: `<red_circle>`, ..., or `<empty>`. They take the nine consecutive positions the
nine image tokens take, and they hold exactly what the question needs as clean symbols, so
nothing here depends on the vision tower, the projector or stage 1. Every step draws fresh
scenes (no example repeats, so the accuracy on the evaluation scenes is a held-out figure).
Answers a model can give without the lookup, and their accuracy on the evaluation questions:
`majority.<type>` (the most frequent answer of each type) and `present_colour` (a colour that
occurs in the scene, chosen at random: a bag of the cell tokens gets this far).

Prints per-type accuracy at `--evals` points; last line `RESULT key=value ...` with the final
accuracy per type, both baselines and the training seconds.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "platform")]

from llava.data.synthetic import COLORS, GRID, SHAPES, sample_layout  # noqa: E402
from llava.datagen.rule_teacher import ShortQA, short_answer_items  # noqa: E402
from llava.datagen.scene import Scene  # noqa: E402
from llava.eval.report import majority_baseline  # noqa: E402
from llava.eval.shapes import score_shapes  # noqa: E402
from llava.model.tiny import build_tiny_tokenizer, lm_step, tiny_lm_config  # noqa: E402

EMPTY = "<empty>"
QUESTION_TYPES = ("count", "color", "position")


def cell_token(category: str) -> str:
    return "<" + category.replace(" ", "_") + ">"


def cell_tokens() -> list[str]:
    return [EMPTY] + [cell_token(f"{c} {s}") for c in COLORS for s in SHAPES]


def scene_text(layout: list[dict]) -> str:
    """The nine cells of a layout as tokens, row-major, each shape in the cell its box centre is in."""
    cells = [EMPTY] * (GRID * GRID)
    for obj in layout:
        x1, y1, x2, y2 = obj["bbox"]
        cells[int((y1 + y2) / 2 * GRID) * GRID + int((x1 + x2) / 2 * GRID)] = cell_token(obj["category"])
    return "".join(cells)


def example(rng: random.Random, question_type: str | None = None) -> tuple[str, ShortQA, list[dict]]:
    """A scene and one of its questions (of `question_type`, else of a type drawn uniformly)."""
    wanted = question_type or rng.choice(QUESTION_TYPES)
    while True:
        layout = sample_layout(rng, 48)
        items = [q for q in short_answer_items(Scene.from_record({"captions": [], "instances": layout}), "shape")
                 if q.question_type == wanted]
        if items:
            qa = rng.choice(items)
            return f"{scene_text(layout)}\n{qa.question} ASSISTANT:", qa, layout


def present_colour_guess(rows: list[tuple[ShortQA, list[dict]]]) -> float:
    """Expected accuracy on the colour questions of naming a colour of the scene at random."""
    odds = [1 / len({o["category"].split()[0] for o in layout}) for qa, layout in rows if qa.question_type == "color"]
    return sum(odds) / max(len(odds), 1)


def evaluate(model, tok, rows: list[tuple[str, ShortQA, list[dict]]]) -> dict[str, float]:
    model.eval()
    answers = []
    with torch.no_grad():
        for prompt, _, _ in rows:
            ids = tok(prompt, return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
            answers.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    model.train()
    scored = score_shapes([{"question": qa.question, "answer": qa.answer, "question_type": qa.question_type}
                           for _, qa, _ in rows], answers)
    return {t: p["accuracy"] for t, p in scored["per_type"].items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--evals", type=int, default=4, help="evaluation points over the run")
    parser.add_argument("--eval-questions", type=int, default=100, help="per question type")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = build_tiny_tokenizer()
    tok.add_tokens(cell_tokens(), special_tokens=True)
    tok.pad_token = tok.unk_token
    model = LlamaForCausalLM(tiny_lm_config(tok, hidden=args.hidden, layers=args.layers))
    eval_rng = random.Random(f"eval:{args.seed}")
    rows = [example(eval_rng, t) for t in QUESTION_TYPES for _ in range(args.eval_questions)]
    majority = majority_baseline([{"answer": qa.answer, "question_type": qa.question_type} for _, qa, _ in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(args.steps // 40, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) * (1.0 - i / args.steps))
    rng, started, acc = random.Random(f"train:{args.seed}"), time.perf_counter(), {}
    every = max(args.steps // max(args.evals, 1), 1)
    model.train()
    for step in range(1, args.steps + 1):
        batch = [example(rng) for _ in range(args.batch)]
        enc = tok([p + " " + qa.answer + tok.eos_token for p, qa, _ in batch], return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        for i, (prompt, _, _) in enumerate(batch):  # the answer and its end token are the targets
            labels[i, : len(tok(prompt)["input_ids"])] = -100
        loss = lm_step(model, opt, sched, enc, labels)
        if step % every == 0 or step == args.steps:
            acc = evaluate(model, tok, rows)
            print(f"[lookup] step {step}/{args.steps} loss {loss:.3f} "
                  + " ".join(f"{t}={acc[t]:.3f}" for t in QUESTION_TYPES)
                  + f" ({time.perf_counter() - started:.0f}s)", flush=True)
    seconds = time.perf_counter() - started
    result = {**{t: acc[t] for t in QUESTION_TYPES}, **{f"majority.{t}": majority[t] for t in QUESTION_TYPES},
              "present_colour": present_colour_guess([(qa, layout) for _, qa, layout in rows]),
              "layers": args.layers, "steps": args.steps, "train_s": seconds}
    print("RESULT " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
