"""Scorers for evaluation: pure functions over model outputs (no I/O beyond reading rule files).

- `shapes`: exact-match accuracy on the synthetic shapes held-out questions, per question type;
- `scienceqa`: ScienceQA-format multiple choice: prompt, answer-letter extraction, accuracies;
- `judge`: LLaVA-Bench-style judging: rule files, judge prompts, score parsing, relative scores.
"""
