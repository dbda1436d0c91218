"""Per-part training modes and LoRA through peft on the tiny llava-hf model: what trains, the
per-part learning rates, the adapter and merged exports, and QLoRA's 4-bit base on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llava.model.freezing import PartModes, apply_freezing
from llava.model.lora import LoraError, LoraSettings, apply_lora, merged_from_adapter, save_adapter
from llava.train.optim import build_optimizer


def load(path) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    return LlavaForConditionalGeneration.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def batch(tiny_llava_dir):
    """One image-text training example in the model's own format (image placeholders expanded)."""
    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}]
    prompt = processor.apply_chat_template(messages)
    inputs = processor(text=prompt, images=[Image.new("RGB", (64, 64), "red")], return_tensors="pt")
    return {**inputs, "labels": inputs["input_ids"].clone()}


def train_steps(model, batch, lrs, steps=3):
    model.train()
    opt = build_optimizer(model, lrs)
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_lora_on_the_language_model_trains_adapters_and_the_projector_only(tiny_llava_dir):
    model, counts = apply_lora(load(tiny_llava_dir), PartModes(projector="full", language_model="lora"),
                               LoraSettings(r=4, alpha=8))
    names = trainable(model)
    assert names and all(".lora_" in n or "multi_modal_projector.modules_to_save" in n for n in names)
    assert any("language_model" in n and ".lora_A." in n for n in names)
    assert not any("vision_tower" in n or "lm_head" in n or "embed_tokens" in n for n in names)
    assert counts["vision"] == 0 and counts["projector"] > 0 and counts["language_model"] > 0
    assert counts["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    base_lm = sum(p.numel() for n, p in load(tiny_llava_dir).named_parameters()
                  if "language_model" in n or n.startswith("lm_head"))
    assert counts["language_model"] < 0.1 * base_lm


def test_target_modules_restrict_adapters_to_named_layers(tiny_llava_dir):
    model, _ = apply_lora(load(tiny_llava_dir), PartModes(projector="frozen", language_model="lora"),
                          LoraSettings(r=2, target_modules=("q_proj", "v_proj")))
    layers = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable(model)}
    assert layers == {"q_proj", "v_proj"}
    with pytest.raises(LoraError, match="no linear layer"):
        apply_lora(load(tiny_llava_dir), PartModes(language_model="lora"), LoraSettings(target_modules=("nope",)))
    with pytest.raises(LoraError, match="belongs to a frozen part"):
        apply_lora(load(tiny_llava_dir), PartModes(language_model="lora"),
                   LoraSettings(modules_to_save=("vision_tower",)))


def test_unfrozen_vision_tower_trains_at_its_own_rate(tiny_llava_dir, batch):
    """LLaVA-NeXT style: vision tower trained (full here, LoRA below) at a smaller rate than the LM."""
    model = load(tiny_llava_dir)
    counts = apply_freezing(model, PartModes(vision="full", projector="full", language_model="full"))
    assert counts["vision"] == sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n)
    opt = build_optimizer(model, {"vision": 2e-6, "projector": 1e-3, "language_model": 2e-5})
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {"vision": 2e-6, "projector": 1e-3,
                                                              "language_model": 2e-5}
    before = load(tiny_llava_dir).state_dict()
    vision_key = next(k for k in before if "vision_tower" in k and k.endswith("q_proj.weight"))
    train_steps(model, batch, {"vision": 1e-3, "projector": 1e-3, "language_model": 1e-3}, steps=1)
    assert not torch.equal(model.state_dict()[vision_key], before[vision_key])

    lora_model, counts = apply_lora(load(tiny_llava_dir), PartModes(vision="lora", projector="full",
                                                                    language_model="frozen"), LoraSettings(r=2))
    assert counts["vision"] > 0 and counts["language_model"] == 0
    assert all("vision_tower" in n for n in trainable(lora_model) if ".lora_" in n)


def test_adapter_loads_on_its_base_and_merges_to_the_same_logits(tiny_llava_dir, batch, tmp_path):
    model, _ = apply_lora(load(tiny_llava_dir), PartModes(projector="full", language_model="lora"),
                          LoraSettings(r=4, alpha=8, dropout=0.0))
    train_steps(model, batch, {"vision": 1e-3, "projector": 1e-3, "language_model": 1e-2})
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        trained = model(**inputs).logits
        untouched = load(tiny_llava_dir)(**inputs).logits
    assert (trained - untouched).abs().max() > 1e-3, "the adapter changed nothing: the test would prove nothing"

    adapter = save_adapter(model, tmp_path / "adapter", "models:/llava-tiny@champion")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "models:/llava-tiny@champion" and config["r"] == 4
    on_base = PeftModel.from_pretrained(load(tiny_llava_dir), str(adapter)).eval()
    merged_dir = tmp_path / "merged"
    merged_from_adapter(tiny_llava_dir, adapter).save_pretrained(merged_dir)
    merged = load(merged_dir)  # a plain llava-hf model: no peft wrapper, no lora weights
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        via_peft = on_base(**inputs).logits
        via_merge = merged(**inputs).logits
    torch.testing.assert_close(via_peft, trained, rtol=0, atol=1e-6)
    torch.testing.assert_close(via_merge, via_peft, rtol=1e-5, atol=1e-5)


def test_qlora_base_is_4bit_and_trains_on_cpu(tiny_llava_dir, batch):
    """bitsandbytes >= 0.50 runs NF4 layers on CPU, so QLoRA is exercised here, not only on GPU."""
    from peft import prepare_model_for_kbit_training

    from llava.model.lora import quantization_config

    base = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir,
                                                         quantization_config=quantization_config(torch.float32))
    kinds = {n: type(m).__name__ for n, m in base.named_modules()}
    assert kinds["model.language_model.layers.0.self_attn.q_proj"] == "Linear4bit"
    vision_q = next(n for n in kinds if "vision_tower" in n and n.endswith("q_proj"))
    assert kinds[vision_q] == "Linear", "the vision tower stays unquantized (it may train in full)"
    assert kinds["lm_head"] == "Linear" and kinds["model.multi_modal_projector.linear_1"] == "Linear"
    model, counts = apply_lora(prepare_model_for_kbit_training(base, use_gradient_checkpointing=False),
                               PartModes(projector="full", language_model="lora"), LoraSettings(r=4, dropout=0.0))
    model.train()
    opt = build_optimizer(model, {"vision": 1e-3, "projector": 1e-3, "language_model": 2e-2})
    first = None
    for _ in range(4):
        loss = model(**batch).loss
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert model(**batch).loss.item() < first


def test_gradient_checkpointing_gives_lora_the_same_gradients(tiny_llava_dir, batch):
    """Non-reentrant checkpointing (model.gradient_checkpointing) recomputes activations under
    frozen base weights without losing the adapters' gradients."""
    grads = []
    for checkpointing in (False, True):
        base = load(tiny_llava_dir)
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model, _ = apply_lora(base, PartModes(projector="full", language_model="lora"), LoraSettings(r=4, dropout=0.0))
        for name, param in model.named_parameters():
            if ".lora_B." in name:  # B starts at zero; nonzero makes A's gradient nonzero too
                torch.nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(len(name)))
        model.train()
        model(**batch, use_cache=False).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g.abs().sum() > 0 for g in grads[1].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
