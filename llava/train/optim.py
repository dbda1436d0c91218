"""AdamW without weight decay, a separate projector learning rate, cosine schedule with warm-up."""

from __future__ import annotations

import math

import torch

from llava.model.freezing import part_of


def param_groups(model: torch.nn.Module, lr: float, projector_lr: float | None) -> list[dict]:
    """Two groups so the projector can run at its own rate (LLaVA-1.5 uses one rate; stage-2
    recipes elsewhere often raise the projector's). Frozen parameters are left out."""
    groups = {"projector": [], "rest": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups["projector" if part_of(name) == "projector" else "rest"].append(param)
    out = []
    if groups["projector"]:
        out.append({"params": groups["projector"], "lr": projector_lr or lr, "name": "projector"})
    if groups["rest"]:
        out.append({"params": groups["rest"], "lr": lr, "name": "language_model"})
    if not out:
        raise ValueError("no trainable parameters: check the stage's freezing settings")
    return out


def build_optimizer(model, lr: float, projector_lr: float | None, betas=(0.9, 0.999), eps=1e-8):
    return torch.optim.AdamW(param_groups(model, lr, projector_lr), betas=betas, eps=eps, weight_decay=0.0)


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
