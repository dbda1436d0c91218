"""The image path end to end: the same pixels reach the vision tower in training and at inference,
and the LM sees the projected penultimate-layer patch features exactly where the image tokens are."""

from __future__ import annotations

import json

import torch
from PIL import Image

from llava.data.collate import collate_padded
from llava.data.encode import encode_record
from llava.infer.generate import encode_prompts, render_prompt


def _first_image_record(shapes_data) -> dict:
    return next(r for r in json.loads(shapes_data.stage2.read_text()) if "_short_answer_" in r["id"])


def test_training_and_inference_feed_the_tower_the_same_pixels(tiny_processor, shapes_data):
    record = _first_image_record(shapes_data)
    sample = encode_record(record, tiny_processor, "vicuna_v1", max_length=1024, image_root=shapes_data.root)
    trained = collate_padded([sample], tiny_processor.tokenizer.pad_token_id, tiny_processor.image_processor)
    image = Image.open(shapes_data.root / record["image"])
    question = record["conversations"][0]["value"].replace("<image>", "").strip()
    prompt = render_prompt(tiny_processor, [{"role": "user", "content": [{"type": "text", "text": question},
                                                                         {"type": "image", "image": image}]}])
    asked = encode_prompts(tiny_processor, [prompt])
    assert torch.equal(trained["pixel_values"], asked["pixel_values"])
    # Normalised with CLIP's statistics: the white background is well above 1, shapes are not.
    assert trained["pixel_values"].max() > 1.5 and trained["pixel_values"].min() < 0
    # The prompt asked is the training sequence up to the first answer, image tokens included.
    n = asked["input_ids"].shape[1]
    assert trained["input_ids"][0, :n].tolist() == asked["input_ids"][0].tolist()


def _embeddings_the_lm_sees(model, batch) -> torch.Tensor:
    seen = []

    def grab(_module, _args, kwargs):
        seen.append(kwargs["inputs_embeds"])

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        hook.remove()
    return seen[0][0]


def test_image_tokens_carry_the_projected_penultimate_patch_features(tiny_llava_dir, tiny_processor, shapes_data):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
    record = _first_image_record(shapes_data)
    sample = encode_record(record, tiny_processor, "vicuna_v1", max_length=1024, image_root=shapes_data.root)
    batch = collate_padded([sample], tiny_processor.tokenizer.pad_token_id, tiny_processor.image_processor)
    seen = _embeddings_the_lm_sees(model, batch)
    with torch.no_grad():
        hidden = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states
        expected = model.model.multi_modal_projector(hidden[-2][:, 1:])[0]  # layer -2, CLS dropped
        text_embeds = model.get_input_embeddings()(batch["input_ids"])[0]
    positions = (batch["input_ids"][0] == model.config.image_token_index).nonzero().squeeze(1)
    assert model.config.vision_feature_layer == -2 and len(positions) == expected.shape[0] == 16
    assert torch.allclose(seen[positions], expected, atol=1e-5)
    # Another image changes exactly those positions, nothing else.
    other = _embeddings_the_lm_sees(model, dict(batch, pixel_values=torch.zeros_like(batch["pixel_values"])))
    changed = (other != seen).any(dim=-1).nonzero().squeeze(1)
    assert changed.tolist() == positions.tolist()
    unchanged = torch.ones(len(seen), dtype=torch.bool)
    unchanged[positions] = False
    assert torch.equal(seen[unchanged], text_embeds[unchanged])
