"""Training and inference put the image in the same place, whatever order a record or a request uses.

The synthetic records (like LLaVA-Instruct) write `<image>` before or after the question, and
clients send the image part first or last. A model trained on `question\\n<image>` and asked with
`<image>\\nquestion` (what the saved chat template and every llava-hf client send) sees a sequence
it never trained on; the reference code avoids that by moving the placeholder to the turn start
before tokenising, and so do training (`Template.render`) and the saved chat template here.
"""

from __future__ import annotations

import pytest

from llava.data.encode import encode_record
from llava.data.templates import get_template

QUESTION = "How many shapes are in the image?"
ORDERS = [f"<image>\n{QUESTION}", f"{QUESTION}\n<image>", f"{QUESTION} <image>", f"  <image>{QUESTION}\n"]


def _record(prompt: str) -> dict:
    return {"id": "r", "image": "a.png",
            "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": "3"}]}


@pytest.mark.parametrize("template", ["vicuna_v1", "chatml"])
def test_any_record_order_trains_on_the_same_tokens(tiny_processor, template):
    encoded = [encode_record(_record(p), tiny_processor, template, max_length=512, load_pixels=False) for p in ORDERS]
    assert all(e.input_ids == encoded[0].input_ids and e.labels == encoded[0].labels for e in encoded)
    image_id = tiny_processor.tokenizer.convert_tokens_to_ids("<image>")
    ids = encoded[0].input_ids
    first = ids.index(image_id)
    # The image tokens come right after the user-turn opening, before any question token.
    question_ids = tiny_processor.tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    assert ids[first : first + 16] == [image_id] * 16
    assert first < next(i for i in range(len(ids)) if ids[i : i + len(question_ids)] == question_ids)


@pytest.mark.parametrize("template", ["vicuna_v1", "chatml"])
def test_inference_prompt_equals_the_training_prompt_for_any_request_order(tiny_processor, monkeypatch, template):
    """What the evaluation/serving path renders (the processor's chat template, image parts in any
    position, or a string with the placeholder anywhere) is the training prompt up to the answer."""
    tmpl = get_template(template, eos_token=tiny_processor.tokenizer.eos_token)
    monkeypatch.setattr(tiny_processor, "chat_template", tmpl.chat_template)
    trained = tmpl.render([{"role": "user", "content": ORDERS[1]}, {"role": "assistant", "content": "3"}]).text
    requests = [
        [{"type": "image"}, {"type": "text", "text": QUESTION}],
        [{"type": "text", "text": QUESTION}, {"type": "image"}],
        [{"type": "text", "text": QUESTION + "\n"}, {"type": "image_url", "image_url": {"url": "data:,"}}],
        *ORDERS,
    ]
    for content in requests:
        prompt = tiny_processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                    add_generation_prompt=True)
        assert trained.startswith(prompt), (content, prompt)
        assert prompt.count("<image>") == 1


def test_text_only_turns_are_untouched(tiny_processor, monkeypatch):
    tmpl = get_template("vicuna_v1", eos_token="</s>")
    monkeypatch.setattr(tiny_processor, "chat_template", tmpl.chat_template)
    messages = [{"role": "user", "content": "  Say hi.  "}]
    assert tiny_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tmpl.generation_prompt(messages)
    assert "USER:   Say hi.   ASSISTANT:" in tmpl.generation_prompt(messages)
