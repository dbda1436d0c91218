"""generate_batch / stream_generate on the tiny llava-hf model, loaded from disk as in serving."""

from __future__ import annotations

import pytest
from PIL import Image

from llava.data.images import mean_colour, pad_to_square
from llava.infer.generate import PromptError, apply_stop, generate_batch, render_prompt, stream_generate
from llava.infer.load import load_for_inference


@pytest.fixture(scope="module")
def tiny(tiny_llava_dir):
    return load_for_inference(str(tiny_llava_dir), device="cpu")


def _img(colour=(200, 30, 30), size=(80, 40)) -> Image.Image:
    return Image.new("RGB", size, colour)


def _req(text: str, image: Image.Image | None = None, **extra) -> dict:
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image", "image": image})
    return {"messages": [{"role": "user", "content": content}], **extra}


REQS = [
    _req("What colour is the shape?", _img()),
    _req("how many circles are there"),
    _req("describe the picture in detail", _img((10, 200, 40), (32, 96))),
]


def test_batch_matches_one_by_one_greedy(tiny):
    """Left padding and the attention mask must make a row's answer independent of its neighbours."""
    model, processor = tiny
    batched = generate_batch(model, processor, REQS, max_new_tokens=12)
    alone = [generate_batch(model, processor, [r], max_new_tokens=12)[0] for r in REQS]
    assert [b.text for b in batched] == [a.text for a in alone]
    assert [b.prompt_tokens for b in batched] == [a.prompt_tokens for a in alone]
    assert all(b.finish_reason in ("stop", "length") for b in batched)


def test_prompt_tokens_count_image_expansion(tiny):
    model, processor = tiny
    with_image, text_only = generate_batch(
        model, processor, [_req("same words", _img()), _req("same words")], max_new_tokens=2
    )
    ids = processor(text=render_prompt(processor, _req("same words")["messages"]).text)["input_ids"]
    assert text_only.prompt_tokens == len(ids[0])
    # "<image>\n" becomes image_seq_length image tokens plus the newline token(s).
    assert with_image.prompt_tokens - text_only.prompt_tokens >= model.config.image_seq_length


def test_per_row_budgets_and_length_finish(tiny):
    model, processor = tiny
    short, long = generate_batch(
        model, processor, [_req("two red circles", max_new_tokens=3), _req("two red circles")], max_new_tokens=10
    )
    assert short.completion_tokens <= 3 and long.completion_tokens <= 10
    if short.finish_reason == "length":
        assert short.completion_tokens == 3
    # The short row is a prefix of the long one: same prompt, greedy decoding.
    assert long.text.startswith(short.text)


def test_stop_string_cuts_text_and_generation(tiny):
    model, processor = tiny
    full = generate_batch(model, processor, [REQS[0]], max_new_tokens=20)[0]
    assert len(full.text) > 6, "need some text to pick a stop string from"
    stop = full.text[3:6]
    cut = generate_batch(model, processor, [REQS[0]], max_new_tokens=20, stop=[stop])[0]
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop"
    assert cut.completion_tokens < full.completion_tokens or full.finish_reason == "stop"


def test_stream_matches_batch(tiny):
    model, processor = tiny
    ref = generate_batch(model, processor, [REQS[0]], max_new_tokens=15)[0]
    events = list(stream_generate(model, processor, REQS[0], max_new_tokens=15))
    assert "".join(e.delta for e in events) == ref.text
    last = events[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == (
        ref.finish_reason, ref.prompt_tokens, ref.completion_tokens)
    assert all(e.finish_reason is None for e in events[:-1])


def test_stream_with_stop_never_leaks_the_stop_string(tiny):
    model, processor = tiny
    full = generate_batch(model, processor, [REQS[1]], max_new_tokens=20)[0]
    stop = full.text[4:7]
    events = list(stream_generate(model, processor, REQS[1], max_new_tokens=20, stop=[stop]))
    text = "".join(e.delta for e in events)
    assert text == full.text[: full.text.find(stop)]
    assert events[-1].finish_reason == "stop"


def test_seed_makes_sampling_reproducible(tiny):
    model, processor = tiny
    a = generate_batch(model, processor, [REQS[1]], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)[0]
    b = generate_batch(model, processor, [REQS[1]], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)[0]
    assert a.text == b.text


def test_images_are_padded_to_square_with_mean_colour(tiny):
    """Non-square input == the same image padded by hand: the pre-processing training uses."""
    model, processor = tiny
    img = _img((30, 30, 220), (90, 30))
    padded = pad_to_square(img, mean_colour(processor.image_processor))
    raw, manual = generate_batch(model, processor, [_req("what is it", img), _req("what is it", padded)],
                                 max_new_tokens=10)
    assert raw.text == manual.text


def test_bad_messages_raise_prompt_error(tiny):
    model, processor = tiny
    with pytest.raises(PromptError, match="PIL image"):
        generate_batch(model, processor, [{"messages": [{"role": "user", "content": [
            {"type": "image", "image": "not-an-image"}]}]}], max_new_tokens=2)
    with pytest.raises(PromptError, match="unknown content part"):
        render_prompt(processor, [{"role": "user", "content": [{"type": "audio"}]}])


def test_apply_stop_picks_earliest():
    assert apply_stop("abc STOP def END", ["END", "STOP"]) == ("abc ", True)
    assert apply_stop("nothing here", ["X"]) == ("nothing here", False)


def test_greedy_loop_gives_the_same_tokens_as_generate(tiny):
    """The serving fast path must be a pure speed-up: token for token what `model.generate` answers,
    on a left-padded batch mixing prompts with and without images."""
    import torch

    from llava.infer.generate import (
        RowStop,
        encode_prompts,
        eos_ids,
        greedy_decode,
        model_inputs,
        plain_greedy_ok,
    )

    model, processor = tiny
    assert plain_greedy_ok(model)
    encoded = encode_prompts(processor, [render_prompt(processor, r["messages"]) for r in REQS])
    prompt_len = int(encoded["input_ids"].shape[1])
    assert len(set(encoded["attention_mask"].sum(dim=1).tolist())) > 1  # really padded
    inputs = model_inputs(model, encoded)
    reference = model.generate(**inputs, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                               pad_token_id=processor.tokenizer.pad_token_id)
    criteria = RowStop(processor.tokenizer, prompt_len, [20] * len(REQS), [[]] * len(REQS), set())  # no EOS: full length
    ours = greedy_decode(model, inputs, 20, criteria)
    assert torch.equal(ours, reference)
    assert [f[1] for f in criteria.finished] == ["length"] * len(REQS)
    assert eos_ids(model, processor)  # the EOS rule exists and is exercised by the batch tests above
