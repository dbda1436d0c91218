"""Evaluation results -> flat metrics, a markdown report and a PNG chart.

`results` is the dict the evaluation job assembles: `model`, and for each benchmark that ran its
scorer's output (`shapes`, `scienceqa`, `judge`). Flat metric names are what MLflow records and the
promotion gate reads (`shapes.accuracy`, `scienceqa.accuracy`, `judge.relative_score`, ...).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any


def majority_baseline(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Accuracy of always giving each question type's most frequent answer, per type and overall
    (`all`): what a model that reads the question but not the image can reach on these items."""
    from collections import Counter, defaultdict

    from llava.eval.shapes import normalise_answer

    by_type: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        by_type[row["question_type"]].append(normalise_answer(row["answer"]))
    top = {t: Counter(answers).most_common(1)[0][1] for t, answers in by_type.items()}
    out = {t: top[t] / len(answers) for t, answers in sorted(by_type.items())}
    out["all"] = sum(top.values()) / len(rows) if rows else 0.0
    return out


def _key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text.strip()).strip("_").lower() or "unknown"


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    shapes = results.get("shapes")
    if shapes:
        out["shapes.accuracy"] = shapes["accuracy"]
        out["shapes.n"] = shapes["n"]
        for qtype, part in shapes["per_type"].items():
            out[f"shapes.accuracy.{_key(qtype)}"] = part["accuracy"]
        for qtype, acc in majority_baseline(shapes["rows"]).items():
            out["shapes.majority" + ("" if qtype == "all" else f".{_key(qtype)}")] = acc
        blank = shapes.get("blank_image")
        if blank:
            out["shapes.blank_image.accuracy"] = blank["accuracy"]
            for qtype, part in blank["per_type"].items():
                out[f"shapes.blank_image.accuracy.{_key(qtype)}"] = part["accuracy"]
    sqa = results.get("scienceqa")
    if sqa:
        out["scienceqa.accuracy"] = sqa["accuracy"]
        out["scienceqa.n"] = sqa["n"]
        out["scienceqa.unparseable"] = sqa["unparseable"]
        out["scienceqa.unparseable_rate"] = sqa["unparseable_rate"]
        if sqa["image"]["n"]:
            out["scienceqa.accuracy_image"] = sqa["image"]["accuracy"]
        if sqa["text_only"]["n"]:
            out["scienceqa.accuracy_text"] = sqa["text_only"]["accuracy"]
        for subject, part in sqa["per_subject"].items():
            out[f"scienceqa.accuracy.subject.{_key(subject)}"] = part["accuracy"]
    judge = results.get("judge")
    if judge:
        overall = judge["scores"]["overall"]
        out["judge.n"] = overall["n"]
        out["judge.unparseable"] = overall["unparseable"]
        out["judge.unparseable_rate"] = overall["unparseable"] / overall["n"] if overall["n"] else 0.0
        out["judge.errors"] = judge.get("errors", 0)
        if overall["relative"] is not None:
            out["judge.relative_score"] = overall["relative"]
        for cat, part in judge["scores"]["per_category"].items():
            if part["relative"] is not None:
                out[f"judge.relative_score.{_key(cat)}"] = part["relative"]
    return {k: float(v) for k, v in out.items()}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def markdown_report(results: dict[str, Any]) -> str:
    lines = [f"# Evaluation of `{results.get('model', '?')}`", ""]
    if results.get("model_version"):
        lines += [f"Registry version: {results['model_version']}", ""]
    shapes = results.get("shapes")
    if shapes:
        majority = majority_baseline(shapes["rows"])
        blank = shapes.get("blank_image") or {}
        blank_types = blank.get("per_type", {})
        lines += ["## Shapes held-out (exact match)", "",
                  "| question type | n | correct | accuracy | majority answer | blank image |",
                  "|---|---:|---:|---:|---:|---:|"]
        for qtype, part in shapes["per_type"].items():
            blank_acc = blank_types[qtype]["accuracy"] if qtype in blank_types else None
            lines.append(f"| {qtype} | {part['n']} | {part['correct']} | {_pct(part['accuracy'])} | "
                         f"{_pct(majority.get(qtype))} | {_pct(blank_acc)} |")
        lines += [f"| **all** | {shapes['n']} | {shapes['correct']} | **{_pct(shapes['accuracy'])}** | "
                  f"{_pct(majority['all'])} | {_pct(blank.get('accuracy'))} |", "",
                  "Majority answer: always the most frequent answer of the question type (reads the question, "
                  "not the image). Blank image: the same questions with a blank image instead; a model that "
                  "answers from the image falls to the majority baseline or below there.", ""]
    sqa = results.get("scienceqa")
    if sqa:
        lines += ["## ScienceQA format (multiple choice)", "", "| subset | n | correct | accuracy |",
                  "|---|---:|---:|---:|"]
        for subject, part in sqa["per_subject"].items():
            lines.append(f"| subject: {subject} | {part['n']} | {part['correct']} | {_pct(part['accuracy'])} |")
        for label, part in (("with image", sqa["image"]), ("text only", sqa["text_only"])):
            lines.append(f"| {label} | {part['n']} | {part['correct']} | {_pct(part['accuracy'])} |")
        lines += [f"| **all** | {sqa['n']} | {sqa['correct']} | **{_pct(sqa['accuracy'])}** |", "",
                  f"Unparseable replies (counted as wrong): {sqa['unparseable']} of {sqa['n']}.", ""]
    judge = results.get("judge")
    if judge:
        lines += ["## LLaVA-Bench-style judge", "", f"Judge: `{judge.get('judge_model', '?')}`; rules: "
                  f"`{judge.get('rules', 'shipped default')}`.", "",
                  "| category | n | parsed | unparseable | reference mean | candidate mean | relative |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        rows = [*judge["scores"]["per_category"].items(), ("**all**", judge["scores"]["overall"])]
        for cat, part in rows:
            rel = "n/a" if part["relative"] is None else f"{part['relative']:.1f}%"
            lines.append(f"| {cat} | {part['n']} | {part['parsed']} | {part['unparseable']} | "
                         f"{_num(part['reference_mean'])} | {_num(part['candidate_mean'])} | {rel} |")
        lines += ["", f"Judge calls that failed: {judge.get('errors', 0)} (counted as unparseable).", ""]
    return "\n".join(lines)


def render_chart(results: dict[str, Any], path: str | Path) -> Path:
    """Bar chart: accuracies (shapes per type, ScienceQA subsets) and judge relative scores, in percent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, colors = [], [], []
    shapes = results.get("shapes")
    if shapes:
        for qtype, part in shapes["per_type"].items():
            labels.append(f"shapes\n{qtype}")
            values.append(100 * part["accuracy"])
            colors.append("#4c72b0")
        labels.append("shapes\nall")
        values.append(100 * shapes["accuracy"])
        colors.append("#1f3f7a")
    sqa = results.get("scienceqa")
    if sqa:
        for label, part in (("image", sqa["image"]), ("text", sqa["text_only"]), ("all", sqa)):
            if part["n"]:
                labels.append(f"sqa\n{label}")
                values.append(100 * part["accuracy"])
                colors.append("#55a868" if label != "all" else "#2d6b3c")
    judge = results.get("judge")
    if judge:
        for cat, part in [*judge["scores"]["per_category"].items(), ("all", judge["scores"]["overall"])]:
            if part["relative"] is not None:
                labels.append(f"judge\n{cat}")
                values.append(part["relative"])
                colors.append("#c44e52")
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(labels) + 1), 3.6))
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set_ylabel("percent (accuracy / relative score)")
    ax.set_title(f"Evaluation: {results.get('model', '')}"[:80], fontsize=9)
    for i, v in enumerate(values):
        ax.text(i, v + 1, f"{v:.0f}", ha="center", fontsize=7)
    ax.set_ylim(0, max([100.0, *values]) * 1.1)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
