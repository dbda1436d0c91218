"""Build a `LlavaForConditionalGeneration` from a CLIP-family vision checkpoint and a causal LM.

The result is in the llava-hf layout that plain transformers, vLLM and SGLang load: vision tower,
`multi_modal_projector` (linear_1 -> act -> linear_2) and language model, plus a `LlavaProcessor`
whose chat template is the training template.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipVisionModel,
)

from llava.data.templates import IMAGE_TOKEN, get_template
from llava.model.metadata import ModelMetadata, apply_metadata, stop_token_ids, write_metadata

log = logging.getLogger(__name__)

ProjectorType = Literal["mlp2x_gelu", "linear"]
FeatureSelect = Literal["patch", "cls_patch"]

PAD_TOKEN = "<pad>"
VOCAB_MULTIPLE = 64

# Vision-only model classes by config model_type; full CLIP/SigLIP checkpoints hold a vision_config.
_VISION_CLASSES = {"clip": CLIPVisionModel, "clip_vision_model": CLIPVisionModel,
                   "siglip": SiglipVisionModel, "siglip_vision_model": SiglipVisionModel}
# Vision towers that prepend a CLS token to the patch grid.
_HAS_CLS = {CLIPVisionModel}


def load_vision_tower(path: str | Path) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(path)
    cls = _VISION_CLASSES.get(config.model_type)
    if cls is None:
        raise ValueError(
            f"{path}: vision checkpoint of type {config.model_type!r} is not CLIP-family "
            f"(supported: {', '.join(sorted(_VISION_CLASSES))})"
        )
    return cls.from_pretrained(path)


def _add_special_tokens(tokenizer) -> None:
    """`<image>` and a pad token; Llama/Vicuna tokenizers ship without a pad token."""
    extra = {"additional_special_tokens": [IMAGE_TOKEN]}
    if tokenizer.pad_token is None:
        extra["pad_token"] = PAD_TOKEN
    tokenizer.add_special_tokens(extra, replace_extra_special_tokens=False)
    tokenizer.padding_side = "right"


def _init_projector(projector: torch.nn.Module, projector_type: ProjectorType) -> None:
    """Fresh stage-1 projector. `linear` (LLaVA v1) is stored in the llava-hf two-layer layout as
    W then an identity: act = "linear" and linear_2 = I with zero bias, kept frozen by the freezing
    rules, so the checkpoint is exactly one linear map and still loads with plain transformers."""
    projector.linear_1.reset_parameters()
    if projector_type == "linear":
        with torch.no_grad():
            projector.linear_2.weight.copy_(torch.eye(projector.linear_2.weight.shape[0]))
            projector.linear_2.bias.zero_()
    else:
        projector.linear_2.reset_parameters()


def build_llava(
    vision_path: str | Path,
    lm_path: str | Path,
    *,
    projector: ProjectorType = "mlp2x_gelu",
    vision_feature_layer: int = -2,
    feature_select: FeatureSelect = "patch",
    template: str = "vicuna_v1",
    torch_dtype: torch.dtype | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Assemble vision tower + fresh projector + LM. Paths may be local directories or hub ids."""
    if projector not in ("mlp2x_gelu", "linear"):
        raise ValueError(f"projector must be 'mlp2x_gelu' or 'linear', got {projector!r}")
    if feature_select not in ("patch", "cls_patch"):
        raise ValueError(f"feature_select must be 'patch' or 'cls_patch', got {feature_select!r}")
    vision = load_vision_tower(vision_path)
    lm = AutoModelForCausalLM.from_pretrained(lm_path, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(lm_path)
    image_processor = AutoImageProcessor.from_pretrained(vision_path)
    _add_special_tokens(tokenizer)

    has_cls = type(vision) in _HAS_CLS
    # Without a CLS token there is nothing to drop: "default" would cut a real patch.
    strategy = "default" if (feature_select == "patch" and has_cls) else "full"
    n_patches = (vision.config.image_size // vision.config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision.config,
        text_config=lm.config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=n_patches + (1 if has_cls and strategy == "full" else 0),
        projector_hidden_act="gelu" if projector == "mlp2x_gelu" else "linear",
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=strategy,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    config.projector_type = projector  # read back by the freezing rules after save/load

    # Build the shell on the meta device and plug the loaded parts in, so the LM's weights are
    # never held twice (matters at 7B/13B); only the projector is materialised fresh.
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head
    model.model.multi_modal_projector.to_empty(device="cpu")
    _init_projector(model.model.multi_modal_projector, projector)
    if torch_dtype is not None:
        model.model.multi_modal_projector.to(torch_dtype)
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=VOCAB_MULTIPLE)
    model.config.text_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmpl = get_template(template, eos_token=tokenizer.eos_token)
    model.generation_config.eos_token_id = list(stop_token_ids(tokenizer, template))
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.config.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1 if has_cls else 0,
        chat_template=tmpl.chat_template,
        image_token=IMAGE_TOKEN,
    )
    return model, processor


def save_llava(model: LlavaForConditionalGeneration, processor: LlavaProcessor, out_dir: str | Path,
               metadata: ModelMetadata | None = None) -> Path:
    """Write the llava-hf directory (safetensors + processor + chat template). With `metadata`, the
    chat template and stop tokens saved are the record's, and the record is saved beside them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if metadata is not None:
        apply_metadata(model, processor, metadata)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if metadata is not None:
        write_metadata(out, metadata)
    return out


def num_image_tokens(processor: LlavaProcessor) -> int:
    """Image placeholder tokens per image, as LlavaProcessor expands them."""
    crop = processor.image_processor.crop_size or processor.image_processor.size
    height = crop.get("height") or crop.get("shortest_edge")
    width = crop.get("width") or crop.get("shortest_edge")
    n = (height // processor.patch_size) * (width // processor.patch_size) + processor.num_additional_image_tokens
    return n - 1 if processor.vision_feature_select_strategy == "default" else n
