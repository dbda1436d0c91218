"""Prompt templates: one Python renderer (for training, with character spans of the supervised
text) and one Jinja chat template (saved with the processor, for inference) per template.

Both describe the same string; tests assert that they agree. The supervised spans are what the
label mask is computed from: they cover each assistant answer *and* its end-of-turn token, and
start at the separator that precedes the answer, because byte-level and sentencepiece tokenizers
glue that space onto the answer's first token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

IMAGE_TOKEN = "<image>"

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


class TemplateError(ValueError):
    """A conversation that the template cannot render (wrong role order, unknown role...)."""


@dataclass
class RenderedPrompt:
    text: str
    # Half-open character ranges [start, end) of supervised text.
    supervised: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class Template:
    name: str
    eos: str  # end-of-turn token text appended after each answer
    chat_template: str  # Jinja, for LlavaProcessor / tokenizer.apply_chat_template

    def render(self, messages: list[dict]) -> RenderedPrompt:
        return TEMPLATES[self.name].render([images_first(m) for m in messages], self.eos)

    def generation_prompt(self, messages: list[dict]) -> str:
        """Rendered history followed by the opening of an assistant turn."""
        return self.render(messages).text + TEMPLATES[self.name].generation_prompt


def images_first(message: dict) -> dict:
    """Every `<image>` of a user turn moved to the turn's start, one per line, as the reference
    code does before tokenising: records write the placeholder before or after the question and
    clients send the image part first or last, and a model trained on one order and asked in the
    other sees a sequence it never learned. The chat template below applies the same rule."""
    content = message.get("content")
    if message.get("role") != "user" or not isinstance(content, str) or IMAGE_TOKEN not in content:
        return message
    n = content.count(IMAGE_TOKEN)
    return {**message, "content": (IMAGE_TOKEN + "\n") * n + content.replace(IMAGE_TOKEN, "").strip()}


def _split_system(messages: list[dict], default: str) -> tuple[str, list[dict]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return default, messages


def _check_alternation(turns: list[dict]) -> None:
    for i, msg in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != want:
            raise TemplateError(f"turn {i} has role {msg['role']!r}, expected {want!r} (turns must alternate)")


def _render_vicuna(messages: list[dict], eos: str) -> RenderedPrompt:
    system, turns = _split_system(messages, VICUNA_SYSTEM)
    _check_alternation(turns)
    out = RenderedPrompt(system + " ")
    for msg in turns:
        if msg["role"] == "user":
            out.text += "USER: " + msg["content"] + " "
        else:
            out.text += "ASSISTANT:"
            start = len(out.text)
            out.text += " " + msg["content"] + eos
            out.supervised.append((start, len(out.text)))
    return out


def _render_chatml(messages: list[dict], eos: str) -> RenderedPrompt:
    system, turns = _split_system(messages, "You are a helpful assistant.")
    _check_alternation(turns)
    out = RenderedPrompt(f"<|im_start|>system\n{system}{eos}\n")
    for msg in turns:
        out.text += f"<|im_start|>{msg['role']}\n"
        if msg["role"] == "user":
            out.text += msg["content"] + eos + "\n"
        else:
            start = len(out.text)
            out.text += msg["content"] + eos
            out.supervised.append((start, len(out.text)))
            out.text += "\n"
    return out


def _render_plain(messages: list[dict], eos: str) -> RenderedPrompt:
    """Stage-1 alignment: the image(s), then the caption; the instruction text is not shown."""
    _, turns = _split_system(messages, "")
    _check_alternation(turns)
    if len(turns) != 2:
        raise TemplateError(f"plain template takes one user turn and one answer, got {len(turns)} turns")
    n_images = turns[0]["content"].count(IMAGE_TOKEN)
    out = RenderedPrompt(IMAGE_TOKEN * n_images)
    start = len(out.text)
    out.text += turns[1]["content"] + eos
    out.supervised.append((start, len(out.text)))
    return out


LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)


def _llama3_header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def _render_llama3(messages: list[dict], eos: str) -> RenderedPrompt:
    """Llama-3 instruct turns (LLaVA-NeXT's llava_llama_3); the tokenizer adds <|begin_of_text|>."""
    system, turns = _split_system(messages, LLAMA3_SYSTEM)
    _check_alternation(turns)
    out = RenderedPrompt(_llama3_header("system") + system + eos)
    for msg in turns:
        out.text += _llama3_header(msg["role"])
        start = len(out.text)
        out.text += msg["content"] + eos
        if msg["role"] == "assistant":
            out.supervised.append((start, len(out.text)))
    return out

# Content may be a string (may hold <image> placeholders) or a list of OpenAI-style parts. As in
# `images_first`, a user turn's images (parts or placeholders, wherever they are) render first, one
# "<image>\n" each, then its text stripped: the form training renders ("<image>\nWhat is ...").
# Every literal is a {{ '...' }} expression, so no whitespace outside the tags reaches the output.
_CONTENT_MACRO = (
    "{% macro content(m) %}"
    "{% set ns = namespace(text='', n=0) %}"
    "{% if m['content'] is string %}{% set ns.text = m['content'] %}"
    "{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' or p['type'] == 'image_url' %}{% set ns.n = ns.n + 1 %}"
    "{% elif p['type'] == 'text' %}{% set ns.text = ns.text + p['text'] %}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% set n = ns.n + ns.text.count('<image>') %}"
    "{% if n and m['role'] == 'user' %}{{ '<image>\\n' * n }}{{ ns.text.replace('<image>', '') | trim }}"
    "{% else %}{{ '<image>\\n' * ns.n }}{{ ns.text }}{% endif %}"
    "{% endmacro %}"
)


def _lit(text: str) -> str:
    return "{{ " + repr(text) + " }}"


def _system_block(default: str) -> str:
    return (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system = content(messages[0]) %}{% set turns = messages[1:] %}"
        "{% else %}"
        "{% set system = " + repr(default) + " %}{% set turns = messages %}"
        "{% endif %}"
    )


def _vicuna_jinja(eos: str) -> str:
    return (
        _CONTENT_MACRO + _system_block(VICUNA_SYSTEM) + "{{ system }}" + _lit(" ")
        + "{% for m in turns %}"
        "{% if m['role'] == 'user' %}" + _lit("USER: ") + "{{ content(m) }}" + _lit(" ")
        + "{% else %}" + _lit("ASSISTANT: ") + "{{ content(m) }}" + _lit(eos) + "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}" + _lit("ASSISTANT:") + "{% endif %}"
    )


def _chatml_jinja(eos: str) -> str:
    return (
        _CONTENT_MACRO + _system_block("You are a helpful assistant.")
        + _lit("<|im_start|>system\n") + "{{ system }}" + _lit(eos + "\n")
        + "{% for m in turns %}"
        + _lit("<|im_start|>") + "{{ m['role'] }}" + _lit("\n") + "{{ content(m) }}" + _lit(eos + "\n")
        + "{% endfor %}"
        "{% if add_generation_prompt %}" + _lit("<|im_start|>assistant\n") + "{% endif %}"
    )


def _plain_jinja(eos: str) -> str:
    return (
        _CONTENT_MACRO + "{% for m in messages %}"
        "{% if m['role'] == 'user' %}{{ '<image>' * (content(m).count('<image>')) }}"
        "{% elif m['role'] == 'assistant' %}{{ content(m) }}" + _lit(eos) + "{% endif %}"
        "{% endfor %}"
    )


def _llama3_jinja(eos: str) -> str:
    return (
        _CONTENT_MACRO + _system_block(LLAMA3_SYSTEM)
        + _lit(_llama3_header("system")) + "{{ system }}" + _lit(eos)
        + "{% for m in turns %}"
        + _lit("<|start_header_id|>") + "{{ m['role'] }}" + _lit("<|end_header_id|>\n\n")
        + "{{ content(m) }}" + _lit(eos)
        + "{% endfor %}"
        "{% if add_generation_prompt %}" + _lit(_llama3_header("assistant")) + "{% endif %}"
    )


@dataclass(frozen=True)
class TemplateStyle:
    """Everything that defines one template. `end_of_turn` is the text that ends an answer (and
    is a stop token at inference); None means the tokenizer's own EOS."""

    render: Callable[[list[dict], str], RenderedPrompt]
    jinja: Callable[[str], str]
    generation_prompt: str
    end_of_turn: str | None


# The one table of chat templates: adding a template is an entry here (plus its tests). Configs,
# the CLI and the model metadata take their names from it.
TEMPLATES: dict[str, TemplateStyle] = {
    "plain": TemplateStyle(_render_plain, _plain_jinja, "", "\n"),
    "vicuna_v1": TemplateStyle(_render_vicuna, _vicuna_jinja, "ASSISTANT:", None),
    "chatml": TemplateStyle(_render_chatml, _chatml_jinja, "<|im_start|>assistant\n", "<|im_end|>"),
    "llama3": TemplateStyle(_render_llama3, _llama3_jinja, _llama3_header("assistant"), "<|eot_id|>"),
}
TEMPLATE_NAMES = tuple(TEMPLATES)
# For typed configs: Literal[("a", "b")] is Literal["a", "b"].
TemplateName = Literal[TEMPLATE_NAMES]  # type: ignore[valid-type]


def get_template(name: str, *, eos_token: str = "</s>") -> Template:
    """`eos_token` is the tokenizer's end-of-sequence text, which ends turns in templates without
    an end-of-turn token of their own (vicuna_v1); chatml ends them with <|im_end|>, llama3 <|eot_id|>."""
    style = TEMPLATES.get(name)
    if style is None:
        raise TemplateError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATE_NAMES)}")
    eos = style.end_of_turn if style.end_of_turn is not None else eos_token
    return Template(name, eos, style.jinja(eos))
