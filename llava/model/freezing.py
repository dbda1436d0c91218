"""Which parameters train, as data: one mode per part (vision tower, projector, language model).

Each part is `frozen`, `full` (every weight trains) or `lora` (its weights stay frozen and low-rank
adapters train), as torchtune's per-part `*_trainable` settings; the two LLaVA stages are two
settings of the same three modes (stage 1 = projector full, stage 2 = projector + LM full).

For the v1 `linear` projector, stored in the llava-hf two-layer layout, linear_2 is the fixed
identity and never trains. Once peft wraps the model, parameters of a `full` part live in a
`modules_to_save` copy (so the adapter export holds them) and the original copy stays frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PARTS = ("vision", "projector", "language_model")
MODES = ("frozen", "full", "lora")


@dataclass(frozen=True)
class PartModes:
    vision: str = "frozen"
    projector: str = "full"
    language_model: str = "frozen"

    def __post_init__(self):
        for part in PARTS:
            if self.mode(part) not in MODES:
                raise ValueError(f"{part}: mode must be one of {', '.join(MODES)}, got {self.mode(part)!r}")

    @classmethod
    def for_stage(cls, stage: int) -> PartModes:
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        return cls(projector="full", language_model="full" if stage == 2 else "frozen")

    def mode(self, part: str) -> str:
        return getattr(self, part)

    def parts(self, mode: str) -> list[str]:
        return [p for p in PARTS if self.mode(p) == mode]



def _numel(param) -> int:
    """Elements of a parameter, also when ZeRO-3 partitioned it at load (its local tensor is empty)."""
    return getattr(param, "ds_numel", None) or param.numel()

def part_of(name: str) -> str:
    """Map a parameter name of LlavaForConditionalGeneration (peft-wrapped or not) to a part."""
    if "vision_tower" in name:
        return "vision"
    if "multi_modal_projector" in name:
        return "projector"
    return "language_model"  # decoder, embeddings and lm_head


def is_adapter_param(name: str) -> bool:
    return ".lora_" in name


def _trains(name: str, mode: str, linear_identity: bool) -> bool:
    if ".original_module." in name:  # peft's frozen twin of a modules_to_save copy
        return False
    if linear_identity and "multi_modal_projector." in name and ".linear_2." in name:
        return False
    if mode == "lora":
        return is_adapter_param(name) or ".modules_to_save." in name
    return mode == "full"


def apply_freezing(model: torch.nn.Module, modes: PartModes) -> dict[str, int]:
    """Set requires_grad per part; return trainable parameter counts per part (and total)."""
    linear_identity = getattr(model.config, "projector_type", "mlp2x_gelu") == "linear"
    counts = dict.fromkeys(PARTS, 0)
    for name, param in model.named_parameters():
        part = part_of(name)
        train = _trains(name, modes.mode(part), linear_identity)
        param.requires_grad_(train)
        if train:
            counts[part] += _numel(param)
    counts["total"] = sum(counts[p] for p in PARTS)
    return counts


def total_parameters(model: torch.nn.Module) -> int:
    """Parameters of the model as trained: the base weights once (peft's frozen original twins of
    modules_to_save copies are not counted again), plus the adapters."""
    return sum(_numel(p) for n, p in model.named_parameters() if ".original_module." not in n)


def describe_trainable(counts: dict[str, int], model: torch.nn.Module) -> str:
    total = total_parameters(model)
    parts = ", ".join(f"{p}={counts[p]:,}" for p in PARTS)
    return f"trainable {counts['total']:,} of {total:,} parameters ({100 * counts['total'] / total:.2f}%; {parts})"


# The name before per-part modes (stage-only freezing); tests/train/test_grad_norm.py still uses it.
TrainableParts = PartModes
