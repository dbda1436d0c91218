"""The chat-template table: every entry's training renderer and Jinja chat template agree, its
supervised spans are the answers with their end of turn, and configs take their names from it.
A new template added to TEMPLATES is covered here without editing the tests."""

from __future__ import annotations

import pytest

from llava.data.templates import TEMPLATE_NAMES, TEMPLATES, TemplateError, get_template

CONVERSATION = [
    {"role": "user", "content": "<image>\nWhat shape is it?"},
    {"role": "assistant", "content": "A red circle."},
    {"role": "user", "content": "And its size?"},
    {"role": "assistant", "content": "Small."},
]


def _conversation(name: str) -> list[dict]:
    return CONVERSATION[:2] if name == "plain" else CONVERSATION  # plain: one caption turn


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_jinja_and_training_renderer_agree(tiny_processor, monkeypatch, name):
    tmpl = get_template(name, eos_token=tiny_processor.tokenizer.eos_token)
    messages = _conversation(name)
    monkeypatch.setattr(tiny_processor, "chat_template", tmpl.chat_template)
    assert tiny_processor.apply_chat_template(messages, tokenize=False) == tmpl.render(messages).text
    if name != "plain":
        prompt = tiny_processor.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        assert prompt == tmpl.generation_prompt(messages[:-1])


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_supervised_spans_are_the_answers_with_their_end_of_turn(name):
    tmpl = get_template(name, eos_token="</s>")
    messages = _conversation(name)
    rendered = tmpl.render(messages)
    spans = [rendered.text[a:b] for a, b in rendered.supervised]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(spans) == len(answers)
    for span, answer in zip(spans, answers):
        assert span.strip().startswith(answer) and span.endswith(tmpl.eos)
        assert "USER" not in span and "user" not in span  # no question text is trained on


def test_llama3_renders_its_headers_and_stops_at_eot():
    tmpl = get_template("llama3")
    text = tmpl.generation_prompt([{"role": "system", "content": "Be brief."}, CONVERSATION[0]])
    assert text == ("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat shape is it?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tmpl.eos == "<|eot_id|>"


def test_stop_tokens_follow_the_template_end_of_turn(tiny_processor):
    """chatml's <|im_end|> is a stop token of the tiny vocabulary; vicuna_v1 stops at the tokenizer's EOS."""
    from llava.model.metadata import stop_token_ids

    tok = tiny_processor.tokenizer
    assert stop_token_ids(tok, "chatml") == tuple(sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}))
    assert stop_token_ids(tok, "vicuna_v1") == (tok.eos_token_id,)


def test_configs_accept_every_table_name_and_reject_others_by_name():
    from jobs.train_config import DataSection

    for name in TEMPLATES:
        assert DataSection(records="r.json", template=name).template == name
    with pytest.raises(ValueError, match="template"):
        DataSection(records="r.json", template="alpaca")
    with pytest.raises(TemplateError, match="choose one of plain, vicuna_v1, chatml, llama3"):
        get_template("alpaca")
