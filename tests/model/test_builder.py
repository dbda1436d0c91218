"""llava-hf round trip and freezing rules."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from llava.model.builder import build_llava, num_image_tokens, save_llava
from llava.model.freezing import PartModes, apply_freezing


@pytest.fixture(scope="module", params=["mlp2x_gelu", "linear"])
def saved(request, tiny_checkpoints, tmp_path_factory):
    vision, lm = tiny_checkpoints
    model, processor = build_llava(vision, lm, projector=request.param)
    out = save_llava(model, processor, tmp_path_factory.mktemp(request.param) / "model")
    return request.param, model, out


def test_round_trip_loads_with_plain_transformers_and_generates(saved):
    projector, built, path = saved
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert isinstance(model, LlavaForConditionalGeneration)
    # Same weights as assembled, projector in the llava-hf layout.
    ref = built.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, ref[key]), key
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"
    assert model.config.text_config.vocab_size % 64 == 0
    assert model.get_input_embeddings().weight.shape[0] % 64 == 0
    tok = processor.tokenizer
    assert tok.pad_token is not None and tok.convert_tokens_to_ids("<image>") == model.config.image_token_index
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[Image.new("RGB", (80, 50), "red")], return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_index).sum() == num_image_tokens(processor) == 16
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4 or tok.eos_token_id in out[0].tolist()


def test_linear_projector_is_one_linear_map(saved):
    projector, _, path = saved
    model = LlavaForConditionalGeneration.from_pretrained(path)
    proj = model.model.multi_modal_projector
    x = torch.randn(3, proj.linear_1.in_features)
    if projector == "linear":
        assert torch.equal(proj.linear_2.weight, torch.eye(proj.linear_2.weight.shape[0]))
        torch.testing.assert_close(proj(x), proj.linear_1(x))
    else:
        assert model.config.projector_hidden_act == "gelu"
        assert not torch.allclose(proj(x), proj.linear_1(x))


@pytest.mark.parametrize("stage", [1, 2])
def test_freezing_per_stage(saved, stage):
    projector, _, path = saved
    model = LlavaForConditionalGeneration.from_pretrained(path)
    counts = apply_freezing(model, PartModes.for_stage(stage))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("vision_tower" in n for n in trainable), "the vision encoder is always frozen"
    assert any("multi_modal_projector.linear_1" in n for n in trainable)
    assert ("multi_modal_projector.linear_2.weight" in {n.split("model.", 1)[-1] for n in trainable}) == (
        projector != "linear")
    lm_params = [n for n in trainable if "language_model" in n or n.startswith("lm_head")]
    if stage == 1:
        assert lm_params == [] and counts["language_model"] == 0
    else:
        assert "lm_head.weight" in trainable and counts["language_model"] > 0
        assert any("embed_tokens" in n for n in trainable)
    assert counts["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_rejects_a_non_clip_vision_checkpoint(tiny_checkpoints):
    _, lm = tiny_checkpoints
    with pytest.raises(ValueError, match="not CLIP-family"):
        build_llava(lm, lm)
