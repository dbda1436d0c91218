"""The global gradient norm of one optimizer step, computed by the loop where DeepSpeed keeps none.

DeepSpeed records the pre-clipping global norm inside its optimizer wrappers (ZeRO 1-3, bf16/fp16);
with ZeRO-0 in fp32 the engine steps the client optimizer directly and discards the norm it clips
with, so `get_global_grad_norm()` is None there. The loop then computes it from the reduced
gradients, before the step clips and clears them.

The result stays a device tensor: the caller reads it together with the step's other metrics, in
one host transfer per step, instead of one sync per parameter.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def global_grad_norm(parameters: Iterable[torch.nn.Parameter], *, sharded: bool = False) -> torch.Tensor:
    """2-norm over every gradient of `parameters`, viewed as one vector.

    `sharded`: each rank holds a disjoint part of the gradients, so the squared norms are summed
    over ranks (one all-reduce). Without it every rank must hold the whole, already reduced
    gradient (plain data parallel after DeepSpeed's all-reduce), and no communication happens.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    # A fused kernel per dtype/device group instead of one norm per parameter; fp32 norms even for
    # bf16 gradients, and their squares summed in fp64.
    norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
    squares = torch.stack(norms).double().square().sum()
    if sharded and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(squares)
    return squares.sqrt()
