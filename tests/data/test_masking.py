"""Golden label-masking tests: for each template, hand-written expected prompt text and the exact
supervised pieces (each assistant answer with its end-of-turn token, nothing else)."""

from __future__ import annotations

import pytest

from llava.data.encode import IGNORE_INDEX, SampleRejected, encode_record
from llava.data.templates import VICUNA_SYSTEM, get_template

SYS = VICUNA_SYSTEM


def rec(*turns, image=None, rid="r"):
    convs = [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]
    out = {"id": rid, "conversations": convs}
    if image is not None:
        out["image"] = image
    return out


def supervised_pieces(sample, tokenizer) -> list[str]:
    """Decode each maximal run of supervised tokens."""
    pieces, run = [], []
    for tok, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE_INDEX:
            assert label == tok, "a supervised label must be the token itself"
            run.append(tok)
        elif run:
            pieces.append(tokenizer.decode(run))
            run = []
    if run:
        pieces.append(tokenizer.decode(run))
    return pieces


def encode(record, processor, template):
    return encode_record(record, processor, template, max_length=4096, load_pixels=False)


GOLDEN = [
    # (case, template, record, expected rendered text (before image expansion), expected supervised pieces)
    ("multi_turn", "vicuna_v1", rec("<image>\nWhat is it?", "A red circle.", "How many?", "One.", image="a.png"),
     f"{SYS} USER: <image>\nWhat is it? ASSISTANT: A red circle.</s>USER: How many? ASSISTANT: One.</s>",
     [" A red circle.</s>", " One.</s>"]),
    ("multi_turn", "chatml", rec("<image>\nWhat is it?", "A red circle.", "How many?", "One.", image="a.png"),
     "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n"
     "<|im_start|>assistant\nA red circle.<|im_end|>\n<|im_start|>user\nHow many?<|im_end|>\n"
     "<|im_start|>assistant\nOne.<|im_end|>\n",
     ["A red circle.<|im_end|>", "One.<|im_end|>"]),
    ("caption", "plain", rec("<image>\nDescribe briefly.", "A blue square.", image="a.png"),
     "<image>A blue square.\n", ["A blue square.\n"]),
    ("text_only", "vicuna_v1", rec("Say hi.", "Hi!"),
     f"{SYS} USER: Say hi. ASSISTANT: Hi!</s>", [" Hi!</s>"]),
    ("several_images", "vicuna_v1", rec("<image>\n<image>\nSame shape?", "Yes.", image=["a.png", "b.png"]),
     f"{SYS} USER: <image>\n<image>\nSame shape? ASSISTANT: Yes.</s>", [" Yes.</s>"]),
    # The placeholder moves to the turn's start wherever the record put it (the reference's rule).
    ("image_mid_turn", "vicuna_v1", rec("Look at <image> and count.", "Two.", image="a.png"),
     f"{SYS} USER: <image>\nLook at  and count. ASSISTANT: Two.</s>", [" Two.</s>"]),
    ("separator_in_answer", "vicuna_v1", rec("Quote the log.", "USER: hi ASSISTANT: ok"),
     f"{SYS} USER: Quote the log. ASSISTANT: USER: hi ASSISTANT: ok</s>", [" USER: hi ASSISTANT: ok</s>"]),
    ("empty_answer", "vicuna_v1", rec("Say nothing.", ""),
     f"{SYS} USER: Say nothing. ASSISTANT: </s>", [" </s>"]),
    ("unicode", "vicuna_v1", rec("Café? 日本", "Oui — très «bien» ✓."),
     f"{SYS} USER: Café? 日本 ASSISTANT: Oui — très «bien» ✓.</s>", [" Oui — très «bien» ✓.</s>"]),
    ("unicode", "chatml", rec("Café? 日本", "Oui — ✓"),
     "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nCafé? 日本<|im_end|>\n"
     "<|im_start|>assistant\nOui — ✓<|im_end|>\n", ["Oui — ✓<|im_end|>"]),
]


@pytest.mark.parametrize("case,template,record,text,pieces", GOLDEN, ids=[f"{g[1]}-{g[0]}" for g in GOLDEN])
def test_golden_mask(tiny_processor, case, template, record, text, pieces):
    tok = tiny_processor.tokenizer
    from llava.data.records import to_messages

    rendered = get_template(template, eos_token=tok.eos_token).render(to_messages(record))
    assert rendered.text == text
    sample = encode(record, tiny_processor, template)
    assert supervised_pieces(sample, tok) == pieces
    # Everything not supervised is the prompt: BOS, system, user turns, role tags and image tokens.
    image_id = tok.convert_tokens_to_ids("<image>")
    n_images = len(record.get("image") or []) if isinstance(record.get("image"), list) else int("image" in record)
    assert sample.input_ids.count(image_id) == 16 * n_images
    assert all(label == IGNORE_INDEX for t, label in zip(sample.input_ids, sample.labels) if t == image_id)
    assert sample.input_ids[0] == tok.bos_token_id and sample.labels[0] == IGNORE_INDEX


@pytest.mark.parametrize("template", ["vicuna_v1", "chatml", "plain"])
def test_jinja_chat_template_matches_training_renderer(tiny_processor, monkeypatch, template):
    """The processor's chat template (used at inference) renders the same string as training."""
    tok = tiny_processor.tokenizer
    tmpl = get_template(template, eos_token=tok.eos_token)
    for _, t, record, _, _ in GOLDEN:
        if t != template:
            continue
        from llava.data.records import to_messages

        messages = to_messages(record)
        monkeypatch.setattr(tiny_processor, "chat_template", tmpl.chat_template)
        jinja = tiny_processor.apply_chat_template(messages, tokenize=False)
        assert jinja == tmpl.render(messages).text
        if template != "plain":
            prompt = tiny_processor.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            assert prompt == tmpl.generation_prompt(messages[:-1])


def test_image_part_renders_as_record_placeholder(tiny_processor, monkeypatch):
    tmpl = get_template("vicuna_v1", eos_token="</s>")
    monkeypatch.setattr(tiny_processor, "chat_template", tmpl.chat_template)
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = tiny_processor.apply_chat_template(parts, tokenize=False, add_generation_prompt=True)
    assert text == f"{SYS} USER: <image>\nWhat is it? ASSISTANT:"


@pytest.mark.parametrize("record,code", [
    (rec("Hi", "a </s> b"), "special_token_in_text"),
    (rec("<image>\nHi", "ok"), "placeholder_mismatch"),  # placeholder, no image
    (rec("Hi", "ok", image="a.png"), "placeholder_mismatch"),  # image, no placeholder
    (rec("Hi", "see <image>", image="a.png"), "placeholder_mismatch"),
    (rec("Hi"), "schema"),  # a user turn with no answer
    (rec("Hi", "ok", "again"), "schema"),  # ends on an unanswered user turn
    ({"id": "x", "conversations": [{"from": "gpt", "value": "hello"}]}, "schema"),  # answer first
    ({"id": "x", "conversations": [{"from": "robot", "value": "beep"}]}, "schema"),
    ({"conversations": [{"from": "human", "value": "x"}]}, "schema"),
])
def test_bad_records_are_rejected_with_a_reason(tiny_processor, record, code):
    with pytest.raises(SampleRejected) as err:
        encode(record, tiny_processor, "vicuna_v1")
    assert err.value.code == code, err.value.reason


def test_over_long_sample_is_rejected_not_truncated(tiny_processor):
    record = rec("<image>\nDescribe.", "word " * 50, image="a.png")
    with pytest.raises(SampleRejected) as err:
        encode_record(record, tiny_processor, "vicuna_v1", max_length=60, load_pixels=False)
    assert err.value.code == "too_long"


def test_token_straddling_the_answer_boundary_rejects_the_sample(tiny_processor):
    """A template whose answer is glued to the prompt without a separator ("ASSISTANT:ok") lets BPE
    merge across the boundary: the mask cannot be exact, so the sample is refused."""
    from llava.data.encode import mask_from_offsets

    with pytest.raises(SampleRejected) as err:
        mask_from_offsets([5, 6], [(0, 4), (4, 9)], [(6, 9)], ["ab", "cdefg"])
    assert err.value.code == "mask_boundary"
