"""Which parameters train in a stage, as data: stage 1 = projector, stage 2 = projector + LM.

The vision encoder is always frozen (both LLaVA stages). For the v1 `linear` projector, stored in
the llava-hf two-layer layout, linear_2 is the fixed identity and never trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PARTS = ("vision", "projector", "language_model")


@dataclass(frozen=True)
class TrainableParts:
    projector: bool = True
    language_model: bool = False

    @classmethod
    def for_stage(cls, stage: int) -> TrainableParts:
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        return cls(projector=True, language_model=stage == 2)


def part_of(name: str) -> str:
    """Map a parameter name of LlavaForConditionalGeneration to vision / projector / language_model."""
    if "vision_tower" in name:
        return "vision"
    if "multi_modal_projector" in name:
        return "projector"
    return "language_model"  # decoder, embeddings and lm_head


def apply_freezing(model: torch.nn.Module, parts: TrainableParts) -> dict[str, int]:
    """Set requires_grad per part; return trainable parameter counts per part (and total)."""
    linear_identity = getattr(model.config, "projector_type", "mlp2x_gelu") == "linear"
    wanted = {"vision": False, "projector": parts.projector, "language_model": parts.language_model}
    counts = dict.fromkeys(PARTS, 0)
    for name, param in model.named_parameters():
        part = part_of(name)
        train = wanted[part] and not (linear_identity and "multi_modal_projector.linear_2" in name)
        param.requires_grad_(train)
        if train:
            counts[part] += param.numel()
    counts["total"] = sum(counts[p] for p in PARTS)
    return counts


def describe_trainable(counts: dict[str, int], model: torch.nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    parts = ", ".join(f"{p}={counts[p]:,}" for p in PARTS)
    return f"trainable {counts['total']:,} of {total:,} parameters ({parts})"
