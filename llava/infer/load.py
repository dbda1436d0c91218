"""Load a saved llava-hf directory for inference with plain transformers, on the requested device."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # Half precision only pays off on an accelerator; CPU matmuls in bf16 are slower than fp32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_for_inference(model_dir: str, *, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    """(model, processor) from a llava-hf directory, in eval mode on `device`."""
    dev = pick_device(device)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=pick_dtype(dtype, dev))
    model.to(dev).eval()
    return model, processor
