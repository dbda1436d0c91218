"""AdamW without weight decay, one learning rate per part, cosine schedule with warm-up."""

from __future__ import annotations

import math

import torch

from llava.model.freezing import PARTS, part_of


def param_groups(model: torch.nn.Module, lrs: dict[str, float]) -> list[dict]:
    """One group per part that trains, at that part's rate (LLaVA-1.5 uses one rate; LoRA recipes
    run the projector 10x below the adapters; LLaVA-NeXT unfreezes the vision tower at 1/5 to 1/10
    of the LM's). Frozen parameters are left out."""
    groups: dict[str, list] = {part: [] for part in PARTS}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[part_of(name)].append(param)
    out = [{"params": params, "lr": lrs[part], "name": part} for part, params in groups.items() if params]
    if not out:
        raise ValueError("no trainable parameters: check the method's per-part modes")
    return out


def build_optimizer(model, lrs: dict[str, float], betas=(0.9, 0.999), eps=1e-8):
    return torch.optim.AdamW(param_groups(model, lrs), betas=betas, eps=eps, weight_decay=0.0)


def cosine_with_warmup(total_steps: int, warmup_ratio: float):
    """LR multiplier: linear warm-up over ceil(ratio * total) steps, then cosine to zero."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_scheduler(optimizer, total_steps: int, warmup_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, warmup_ratio))
