"""Batches: right-padded ids/labels/attention mask plus the batch's images as pixel_values."""

from __future__ import annotations

import torch

from llava.data.encode import IGNORE_INDEX, EncodedSample


def pixel_values(images, image_processor) -> torch.Tensor | None:
    if not images:
        return None
    return image_processor(images, return_tensors="pt")["pixel_values"]


def collate_padded(samples: list[EncodedSample], pad_id: int, image_processor) -> dict[str, torch.Tensor]:
    width = max(s.length for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        ids[row, : s.length] = torch.tensor(s.input_ids)
        labels[row, : s.length] = torch.tensor(s.labels)
        mask[row, : s.length] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    pv = pixel_values([img for s in samples for img in s.images], image_processor)
    if pv is not None:
        batch["pixel_values"] = pv
    return batch


def padding_fraction(batch: dict[str, torch.Tensor]) -> float:
    """Share of positions that carry no sample token (what packing removes)."""
    return 1.0 - batch["attention_mask"].float().mean().item()
