"""Tiny CLIP and tiny Llama LM with a locally trained tokenizer.

They stand in for CLIP ViT-L/14 and Vicuna in tests and on the CPU preset: saved with
`save_pretrained` in the Hugging Face layout, so code under test loads them with `from_pretrained`
exactly as it would load the real checkpoints. Nothing is downloaded.

As LLaVA's CLIP has learned to see before LLaVA ever trains, the tiny CLIP (vision and text
towers, `CLIPModel` layout, like openai/clip-vit-large-patch14) can be pre-trained contrastively
on image-caption pairs; the LLaVA builder then loads its vision tower with
`CLIPVisionModel.from_pretrained`, exactly as it loads the real CLIP. Without pairs its weights
stay random (the fast test fixtures).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

# Byte-level BPE never produces <unk>, so any text (unicode included) tokenizes losslessly,
# which the offset-based label masking relies on.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

# Vocabulary the BPE merges are learned from: the synthetic shapes domain, the chat templates and
# common English, so that typical sentences are a handful of tokens rather than bytes.
_CORPUS_WORDS = """
a an the this that these those is are was were be been there here it its of in on at to from with
and or but not no yes one two three four five six seven eight nine ten zero how many what which
where who why when does do can could would should image picture photo scene shows show shown
contains contain containing see seen visible color colour colors shape shapes object objects
red green blue yellow purple orange black white gray grey circle circles square squares triangle
triangles left right above below top bottom middle center centre corner next beside near far
between small large big tiny background foreground plain simple describe description detailed
detail briefly brief summary caption answer question reason reasoning because therefore so
A chat between a curious human and an artificial intelligence assistant. The assistant gives
helpful, detailed, and polite answers to the human's questions.
USER: ASSISTANT: system user assistant
Answer with the option's letter from the given choices directly. Context: Options: (A) (B) (C) (D)
The answer is
"""


def _corpus() -> list[str]:
    words = _CORPUS_WORDS.split()
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    # Repeat with variations so frequent words and their space-prefixed forms get merged.
    return lines * 20 + [f"There are {n} {c} {s}s." for n in ("two", "three") for c in
                         ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle")] * 10


def build_tiny_tokenizer(vocab_size: int = 800) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    # Llama-style: BOS prepended to every encoded text, no EOS appended.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=2048,
    )


def lm_step(lm, opt, sched, enc, labels: torch.Tensor) -> float:
    """One optimiser step of a causal LM on a tokenised batch (gradients clipped at 1); its loss."""
    loss = lm(**enc, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def pretrain_lm(lm: LlamaForCausalLM, tokenizer, corpus: list[str], *, steps: int, batch: int = 16,
                lr: float = 3e-3, seed: int = 0) -> list[float]:
    """A short causal-LM pre-training on plain text, so the tiny LM plays the part of a pretrained
    Vicuna: the LLaVA stages then teach vision, not English. Returns the loss per step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)
    losses = []
    lm.train()
    for _ in range(steps):
        pick = torch.randint(len(corpus), (batch,), generator=gen).tolist()
        enc = tokenizer([corpus[i] + tokenizer.eos_token for i in pick], return_tensors="pt", padding=True,
                        truncation=True, max_length=64)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        losses.append(lm_step(lm, opt, sched, enc, labels))
    lm.eval()
    return losses


# CLIP's text tower pools at the first end-of-text token. id 2 (`</s>` here) would select the old
# argmax pooling of transformers' CLIP (kept for checkpoints from before its fix), so captions end
# with another special token of the tiny vocabulary.
CLIP_TEXT_END = "<|im_end|>"
CLIP_TEXT_MAX = 64


def _caption_batch(tokenizer, captions: list[str]) -> dict[str, torch.Tensor]:
    end = tokenizer.convert_tokens_to_ids(CLIP_TEXT_END)
    rows = [tokenizer(c, add_special_tokens=True)["input_ids"][: CLIP_TEXT_MAX - 1] + [end] for c in captions]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), end, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def pretrain_clip(clip: CLIPModel, image_processor, tokenizer, pairs: list[tuple[Image.Image, list[str]]], *,
                  steps: int, batch: int = 64, lr: float = 2e-3, seed: int = 0) -> list[float]:
    """Contrastive image-caption pre-training (CLIP's symmetric InfoNCE over the batch), one random
    caption per image per step, so the frozen tower LLaVA later reads has learned what the captions
    name: colours, shapes, counts and places. Returns the loss per step."""
    from llava.data.images import prepare_image  # the same square pre-processing LLaVA training uses

    gen = torch.Generator().manual_seed(seed)
    pixels = image_processor([prepare_image(img, image_processor) for img, _ in pairs],
                             return_tensors="pt")["pixel_values"]
    opt = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) * (1.0 - i / steps))
    losses = []
    clip.train()
    for _ in range(steps):
        pick = torch.randperm(len(pairs), generator=gen)[:batch].tolist()
        captions = [pairs[i][1][int(torch.randint(len(pairs[i][1]), (1,), generator=gen))] for i in pick]
        loss = clip(**_caption_batch(tokenizer, captions), pixel_values=pixels[pick], return_loss=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    clip.eval()
    return losses


def grid_position_embeddings(side: int, dim: int) -> torch.Tensor:
    """2-D sine-cosine position embeddings for a `side` x `side` patch grid plus the class token
    (row 0, zeros), half the channels for the row and half for the column, as ViT-style towers are
    initialised. Scaled to unit RMS per channel, the size of the patch embeddings at
    initialisation: CLIP's default (std 0.02) is ~2% of a patch token, so a tower pre-trained from
    it hardly knows where a patch is, and "left of" or "above" cannot be read from its features."""
    if dim % 4:
        raise ValueError(f"hidden size must be a multiple of 4 for 2-D sine-cosine positions, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    coords = torch.arange(side, dtype=torch.float32)[:, None] * freqs[None]
    axis = torch.cat([coords.sin(), coords.cos()], dim=1)  # (side, dim / 2)
    rows = axis[:, None, :].expand(side, side, -1)
    cols = axis[None, :, :].expand(side, side, -1)
    grid = torch.cat([rows, cols], dim=-1).reshape(side * side, dim) * 2**0.5
    return torch.cat([torch.zeros(1, dim), grid])


def tiny_lm_config(tokenizer, *, hidden: int = 128, layers: int = 2) -> LlamaConfig:
    """The tiny Llama's shape (4 heads, MLP 3x wide, untied head) for `tokenizer`'s vocabulary."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def build_tiny_checkpoints(
    out_dir: str | Path,
    *,
    corpus: list[str] | None = None,
    pretrain_steps: int = 300,
    clip_pairs: list[tuple[Image.Image, list[str]]] | None = None,
    clip_steps: int = 300,
    image_size: int = 64,
    patch_size: int = 16,
    text_hidden: int = 128,
    text_layers: int = 2,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write `<out>/tiny-clip-vision` (a whole tiny CLIP: vision and text towers, processor,
    tokenizer) and `<out>/tiny-llama`; return both paths. With `clip_pairs` (image, captions), the
    CLIP is pre-trained contrastively on them for `clip_steps` steps; with a `corpus`, the LM is
    pre-trained on it for `pretrain_steps` steps; without, the weights stay random."""
    out = Path(out_dir)
    vision_dir, lm_dir = out / "tiny-clip-vision", out / "tiny-llama"
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    clip_cfg = CLIPConfig(
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
                       "num_attention_heads": 4, "image_size": image_size, "patch_size": patch_size},
        text_config={"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": CLIP_TEXT_MAX,
                     "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.convert_tokens_to_ids(CLIP_TEXT_END),
                     "eos_token_id": tokenizer.convert_tokens_to_ids(CLIP_TEXT_END)},
        projection_dim=64,
    )
    clip = CLIPModel(clip_cfg)
    with torch.no_grad():
        clip.vision_model.embeddings.position_embedding.weight.copy_(
            grid_position_embeddings(image_size // patch_size, clip_cfg.vision_config.hidden_size))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    if clip_pairs and clip_steps:
        pretrain_clip(clip, image_processor, tokenizer, clip_pairs, steps=clip_steps, seed=seed)
    clip.save_pretrained(vision_dir)
    image_processor.save_pretrained(vision_dir)
    tokenizer.save_pretrained(vision_dir)

    lm_cfg = tiny_lm_config(tokenizer, hidden=text_hidden, layers=text_layers)
    lm = LlamaForCausalLM(lm_cfg)
    if corpus:
        # Padding is needed only for this batched pre-training; the saved tokenizer has none,
        # like Llama's, and model assembly adds its own.
        tokenizer.pad_token = tokenizer.unk_token
        pretrain_lm(lm, tokenizer, corpus, steps=pretrain_steps, seed=seed)
        tokenizer.pad_token = None
    lm.save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    return vision_dir, lm_dir
