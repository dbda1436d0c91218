"""Tiny CLIP vision tower and tiny Llama LM with a locally trained tokenizer.

They stand in for CLIP ViT-L/14 and Vicuna in tests and on the CPU preset: saved with
`save_pretrained` in the Hugging Face layout, so code under test loads them with `from_pretrained`
exactly as it would load the real checkpoints. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
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
        loss = lm(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    lm.eval()
    return losses


def build_tiny_checkpoints(
    out_dir: str | Path,
    *,
    corpus: list[str] | None = None,
    pretrain_steps: int = 300,
    image_size: int = 64,
    patch_size: int = 16,
    text_hidden: int = 128,
    text_layers: int = 2,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write `<out>/tiny-clip-vision` and `<out>/tiny-llama`; return both paths. With a `corpus`,
    the LM is pre-trained on it for `pretrain_steps` steps; without, its weights stay random."""
    out = Path(out_dir)
    vision_dir, lm_dir = out / "tiny-clip-vision", out / "tiny-llama"
    torch.manual_seed(seed)
    vision_cfg = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=64,
    )
    CLIPVisionModel(vision_cfg).save_pretrained(vision_dir)
    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    ).save_pretrained(vision_dir)

    tokenizer = build_tiny_tokenizer()
    lm_cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=text_hidden * 3,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
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
