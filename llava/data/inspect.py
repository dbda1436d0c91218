"""Human-readable view of one encoded sample: which tokens the loss sees.

Supervised runs are shown between ⟦ and ⟧ in the decoded text, and a token table lists every
token with `S` (supervised) or `.`; runs of image placeholder tokens are folded to one line.
"""

from __future__ import annotations

from llava.data.encode import IGNORE_INDEX, EncodedSample
from llava.data.templates import IMAGE_TOKEN


def _runs(sample: EncodedSample) -> list[tuple[bool, list[int]]]:
    runs: list[tuple[bool, list[int]]] = []
    for tok, label in zip(sample.input_ids, sample.labels):
        sup = label != IGNORE_INDEX
        if runs and runs[-1][0] == sup:
            runs[-1][1].append(tok)
        else:
            runs.append((sup, [tok]))
    return runs


def _fold_images(text: str) -> str:
    run = IMAGE_TOKEN * 2
    while run in text:
        start = text.index(run)
        end = start
        while text.startswith(IMAGE_TOKEN, end):
            end += len(IMAGE_TOKEN)
        n = (end - start) // len(IMAGE_TOKEN)
        text = text[:start] + f"<image×{n}>" + text[end:]
    return text


def marked_text(sample: EncodedSample, tokenizer) -> str:
    parts = []
    for sup, ids in _runs(sample):
        text = tokenizer.decode(ids, skip_special_tokens=False)
        parts.append(f"⟦{text}⟧" if sup else _fold_images(text))
    return "".join(parts)


def token_table(sample: EncodedSample, tokenizer) -> list[str]:
    tokens = tokenizer.convert_ids_to_tokens(sample.input_ids)
    lines, i = [], 0
    while i < len(tokens):
        if tokens[i] == IMAGE_TOKEN:
            j = i
            while j < len(tokens) and tokens[j] == IMAGE_TOKEN:
                j += 1
            lines.append(f"{i:5d}-{j - 1:<5d} {sample.input_ids[i]:>7d}  .  {IMAGE_TOKEN} x{j - i}")
            i = j
            continue
        mark = "S" if sample.labels[i] != IGNORE_INDEX else "."
        lines.append(f"{i:11d} {sample.input_ids[i]:>7d}  {mark}  {tokens[i]!r}")
        i += 1
    return lines


def summary_line(sample: EncodedSample) -> str:
    return (f"id={sample.id} tokens={sample.length} supervised={sample.num_supervised} "
            f"modality={sample.modality}")
