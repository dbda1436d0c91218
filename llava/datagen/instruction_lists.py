"""Instruction wordings sampled when a record's question is not written by the teacher.

Stage-1 pairs use a brief-description request; detailed-description records use a request for a
rich paragraph. The lists are short and regular on purpose: tiny test models must learn them.
"""

from __future__ import annotations

import random

BRIEF_PROMPTS: tuple[str, ...] = (
    "Describe the image briefly.",
    "Give a short description of the image.",
    "What is in this image? Answer in one sentence.",
    "Write a short caption for the image.",
    "Summarize the image in a few words.",
    "Say briefly what the picture shows.",
    "Provide a one-sentence description of the picture.",
    "Give a brief caption for this picture.",
    "What does the picture show? Be brief.",
    "Write a one-line summary of the image.",
)

DETAIL_PROMPTS: tuple[str, ...] = (
    "Describe the image in detail.",
    "Give a detailed description of the image.",
    "Explain everything you see in the picture.",
    "Describe the picture thoroughly, including where each object is.",
    "What can you see in this image? Give a detailed answer.",
    "Write a careful, detailed description of the scene.",
    "Describe each object in the image and where it is.",
    "Walk through the contents of the image in detail.",
)


def place_image_token(text: str, rng: random.Random) -> str:
    """Put the `<image>` placeholder before or after the text, as the reference data does."""
    return f"<image>\n{text}" if rng.random() < 0.5 else f"{text}\n<image>"
