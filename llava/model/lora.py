"""LoRA (and QLoRA) on the parts of a llava-hf model, through peft.

Adapters go on the linear layers of the parts whose mode is `lora` (all of them, or those whose
leaf name is listed), never on the LM head. Parts in `full` mode, and any extra modules asked
for, become peft `modules_to_save`, so the adapter directory alone (PEFT layout) holds every
trained weight and `PeftModel.from_pretrained(base, adapter_dir)` rebuilds the trained model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from llava.model.freezing import PartModes, apply_freezing, part_of

# Module path of each part inside LlavaForConditionalGeneration (llava-hf layout).
PART_MODULES = {"vision": ["model.vision_tower"], "projector": ["model.multi_modal_projector"],
                "language_model": ["model.language_model", "lm_head"]}
# The 4-bit QLoRA base quantizes the language model only: the vision tower and projector are small
# and may train in full; the LM head stays in 16 bits as in the QLoRA paper.
NOT_QUANTIZED = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None  # leaf names; None = every linear layer of a LoRA part
    modules_to_save: tuple[str, ...] = field(default_factory=tuple)  # extra modules trained in full


class LoraError(ValueError):
    """A LoRA setting that does not fit the model (no layer matched, a module that is not there)."""


def lora_targets(model: torch.nn.Module, modes: PartModes, targets: tuple[str, ...] | None) -> list[str]:
    """Full names of the linear layers that get adapters."""
    lora_parts = set(modes.parts("lora"))
    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and part_of(name) in lora_parts
             and not name.endswith("lm_head") and (targets is None or name.rsplit(".", 1)[-1] in targets)]
    if not names:
        raise LoraError(f"no linear layer of the LoRA parts ({', '.join(sorted(lora_parts))}) matches "
                        f"target_modules {list(targets) if targets else 'all-linear'}")
    return names


def _modules_to_save(model: torch.nn.Module, modes: PartModes, extra: tuple[str, ...]) -> list[str]:
    names = [m for part in modes.parts("full") for m in PART_MODULES[part]]
    present = {name for name, _ in model.named_modules()}
    for module in extra:
        found = [n for n in present if n == module or n.endswith("." + module)]
        if not found:
            raise LoraError(f"lora.modules_to_save: no module named {module!r} in the model")
        if any(modes.mode(part_of(n)) == "frozen" for n in found):
            raise LoraError(f"lora.modules_to_save: {module!r} belongs to a frozen part")
        names.append(module)
    return names


def apply_lora(model: torch.nn.Module, modes: PartModes, settings: LoraSettings):
    """Wrap `model` in a peft model with adapters on the LoRA parts; return it and the trainable
    parameter counts per part."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=lora_targets(model, modes, settings.target_modules),
                        modules_to_save=_modules_to_save(model, modes, settings.modules_to_save) or None,
                        bias="none")
    peft_model = get_peft_model(model, config)
    return peft_model, apply_freezing(peft_model, modes)


def quantization_config(compute_dtype: torch.dtype):
    """The QLoRA base: NF4 with double quantization (Dettmers et al. 2023), LM only."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=NOT_QUANTIZED)


def save_adapter(peft_model, out_dir: str | Path, base_reference: str) -> Path:
    """The adapter alone in PEFT layout (adapter_config.json + adapter_model.safetensors); the
    config names the base it belongs on, as the platform refers to it."""
    out = Path(out_dir)
    peft_model.peft_config["default"].base_model_name_or_path = base_reference
    peft_model.save_pretrained(out, save_embedding_layers=False)
    return out


def merged_from_adapter(base_dir: str | Path, adapter_dir: str | Path, dtype: torch.dtype | None = None):
    """A plain LlavaForConditionalGeneration with the adapter folded into the base weights.

    The base is reloaded unquantized from its checkpoint, so a QLoRA adapter merges into 16/32-bit
    weights rather than into the 4-bit copy it was trained against."""
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(base_dir, dtype=dtype)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
