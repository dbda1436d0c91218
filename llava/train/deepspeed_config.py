"""The DeepSpeed config for a stage, derived from the global batch and the world size.

The global batch is the recipe's invariant (256 / 128 in LLaVA-1.5); micro-batch x accumulation x
world size must equal it, so accumulation is recomputed when the world size changes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    micro_batch: int
    world_size: int

    @property
    def accumulation(self) -> int:
        per_step = self.micro_batch * self.world_size
        if self.global_batch % per_step:
            raise ValueError(
                f"global_batch {self.global_batch} is not a multiple of micro_batch {self.micro_batch} "
                f"x world_size {self.world_size}"
            )
        return self.global_batch // per_step


def deepspeed_config(
    plan: BatchPlan,
    *,
    zero_stage: int,
    precision: str,
    grad_clip: float = 1.0,
    offload_optimizer: bool = False,
) -> dict:
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    zero: dict = {"stage": zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if zero_stage == 3:
        # Gather full 16-bit weights when saving so the export is an ordinary HF checkpoint.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # The optimizer is torch AdamW built by us (param groups with a projector rate).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
