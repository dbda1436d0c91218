"""Batched and streaming generation for a llava-hf model: the one code path used by evaluation and serving.

A request is `{"messages": [...]}` with OpenAI-style chat messages whose content is a string or a list
of parts `{"type": "text", "text": ...}` / `{"type": "image", "image": PIL.Image}`. It may also carry
per-request `max_new_tokens` and `stop`, which override the batch-wide values: serving batches
requests that asked for different lengths and stop strings, and a per-row stopping criterion ends
each row on its own terms while the rest of the batch keeps going.

Images are padded to a square with the processor's mean colour before the processor sees them,
exactly as training does (LLaVA-1.5 pre-processing), via `llava.data.images.prepare_image`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from llava.data.images import prepare_image, to_rgb

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    logprobs: list[dict[str, Any]] | None = None  # per generated token, when asked for (OpenAI's shape)


@dataclass
class StreamEvent:
    """One step of a streamed generation: a text delta, and on the last event the finish reason and counts."""

    delta: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class PreparedPrompt:
    text: str
    images: list[Image.Image]


class PromptError(ValueError):
    """A request that cannot be turned into a prompt (bad message structure, image count mismatch...)."""


# --------------------------------------------------------------------------------------------- prompts


def _normalise_messages(messages: Sequence[dict]) -> tuple[list[dict], list[Image.Image]]:
    """Split images out of the parts (the template only needs to know where they go) and keep their order."""
    out: list[dict] = []
    images: list[Image.Image] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            raise PromptError(f"message {i} must be an object with a 'role'")
        content = msg.get("content", "")
        if content is None:
            content = ""
        if isinstance(content, str):
            out.append({"role": msg["role"], "content": content})
            continue
        parts: list[dict] = []
        for part in content:
            kind = part.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind == "image":
                image = part.get("image")
                if not isinstance(image, Image.Image):
                    raise PromptError(f"message {i}: an image part must carry a PIL image")
                images.append(image)
                parts.append({"type": "image"})
            else:
                raise PromptError(f"message {i}: unknown content part type {kind!r}")
        out.append({"role": msg["role"], "content": parts})
    return out, images


def render_prompt(processor: Any, messages: Sequence[dict], *, image_mode: str = "pad") -> PreparedPrompt:
    """Chat-template text (with `<image>` placeholders) and the pre-processed images, in placeholder order."""
    normalised, images = _normalise_messages(messages)
    try:
        text = processor.apply_chat_template(normalised, add_generation_prompt=True, tokenize=False)
    except Exception as err:  # jinja errors, role-order errors raised by the template
        raise PromptError(f"chat template could not render the messages: {err}") from err
    image_token = getattr(processor, "image_token", "<image>")
    if text.count(image_token) != len(images):
        raise PromptError(f"prompt has {text.count(image_token)} {image_token} placeholders for {len(images)} images")
    return PreparedPrompt(text, [prepare_image(to_rgb(img), processor.image_processor, image_mode) for img in images])


def encode_prompts(processor: Any, prompts: Sequence[PreparedPrompt]) -> Any:
    """Tokenise a left-padded batch; the processor expands each `<image>` into the image's feature tokens."""
    images = [img for p in prompts for img in p.images]
    return processor(
        text=[p.text for p in prompts],
        images=images or None,
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )


def count_prompt_tokens(processor: Any, prompt: PreparedPrompt) -> int:
    """Token count of a prompt after image expansion: what the context-length check needs."""
    return int(encode_prompts(processor, [prompt])["input_ids"].shape[1])


def context_length(model: Any) -> int:
    cfg = getattr(model.config, "text_config", model.config)
    return int(getattr(cfg, "max_position_embeddings", 2048))


# --------------------------------------------------------------------------------------------- stopping


def eos_ids(model: Any, processor: Any) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = processor.tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


class RowStop(StoppingCriteria):
    """Ends each row at its own EOS, stop string or token budget, and records why and when.

    `generate` only knows one max length and one EOS rule per batch; this lets requests with
    different budgets and stop strings share a batch without one waiting on the others' rules.
    """

    def __init__(self, tokenizer: Any, prompt_len: int, budgets: list[int], stops: list[list[str]], eos: set[int]):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.budgets = budgets
        self.stops = stops
        self.eos = eos
        self.finished: list[tuple[int, str] | None] = [None] * len(budgets)  # (n generated, reason)
        self.cancelled = threading.Event()
        # A stop string of n characters spans at most n tokens, plus a margin for byte-level pieces.
        self._tail = [max((len(s) for s in row), default=0) + 4 for row in stops]

    def _row_done(self, row: int, input_ids: torch.Tensor, last: int, n_new: int) -> str | None:
        if n_new <= 0:
            return None
        if last in self.eos:
            return FINISH_STOP
        if self.stops[row]:
            tail = self.tokenizer.decode(input_ids[row, -min(n_new, self._tail[row]):], skip_special_tokens=True)
            if any(s in tail for s in self.stops[row]):
                return FINISH_STOP
        if n_new >= self.budgets[row]:
            return FINISH_LENGTH
        return None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
        n_new = input_ids.shape[1] - self.prompt_len
        # One tensor -> list conversion per step instead of one small tensor op per row: this runs
        # after every generated token, and with a tiny model its Python cost is a visible share.
        last_tokens = input_ids[:, -1].tolist()
        for row, last in enumerate(last_tokens):
            if self.finished[row] is None:
                reason = self._row_done(row, input_ids, last, n_new)
                if reason is None and self.cancelled.is_set():
                    reason = FINISH_STOP
                if reason is not None:
                    self.finished[row] = (n_new, reason)
        done = [f is not None for f in self.finished]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def apply_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` at the earliest stop string; return (text, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


# --------------------------------------------------------------------------------------------- generation


def _sampling_kwargs(temperature: float, top_p: float) -> dict[str, Any]:
    if temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p)}


def _row_rules(requests: Sequence[dict], max_new_tokens: int, stop: Sequence[str] | None):
    budgets = [int(r.get("max_new_tokens") or max_new_tokens) for r in requests]
    stops = [[s for s in (r.get("stop") if r.get("stop") is not None else (stop or [])) if s] for r in requests]
    return budgets, stops


def model_inputs(model: Any, encoded: Any) -> dict[str, Any]:
    inputs = {k: v.to(model.device) for k, v in encoded.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


# Generation-config fields that make `generate` alter greedy logits; with any of them set, the plain
# greedy loop below would answer differently, so `generate` is used instead.
_LOGIT_RULES = ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "min_length", "min_new_tokens",
                "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens",
                "sequence_bias", "encoder_repetition_penalty", "exponential_decay_length_penalty",
                "forced_decoder_ids", "num_beams", "guidance_scale", "watermarking_config")
_NEUTRAL = (None, 0, 1, 1.0, [], {})


def plain_greedy_ok(model: Any) -> bool:
    """Whether greedy decoding is just argmax per step for this model (no logits processors configured)."""
    gen = getattr(model, "generation_config", None)
    return gen is not None and all(getattr(gen, name, None) in _NEUTRAL for name in _LOGIT_RULES)


@torch.inference_mode()
def greedy_decode(model: Any, inputs: dict[str, Any], max_new_tokens: int, criteria: StoppingCriteria) -> torch.Tensor:
    """Greedy decoding with a KV cache: the same tokens as `model.generate(do_sample=False)`, without
    its per-step machinery (logits processors, generic cache bookkeeping, output containers).

    With a small model on CPU that machinery costs about as much as the forward pass itself, and
    serving pays it on every token of every batch. Returns prompt + generated ids like `generate`.
    """
    from transformers import DynamicCache

    attn = inputs["attention_mask"]
    # Left padding: each row's positions count only its real tokens, as `generate` computes them.
    positions = (attn.long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(**inputs, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
    ids = inputs["input_ids"]
    last = positions[:, -1:]
    ones = attn.new_ones(attn.shape[0], 1)
    for _ in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        if bool(criteria(ids, out.logits[:, -1]).all()):
            break
        attn = torch.cat([attn, ones], dim=1)
        last = last + 1
        out = model(input_ids=token, attention_mask=attn, position_ids=last, past_key_values=cache, use_cache=True)
    return ids


def _generate_sampled(model: Any, tokenizer: Any, encoded: Any, budgets: list[int], criteria: RowStop,
                      temperature: float, top_p: float) -> torch.Tensor:
    """`model.generate` for everything the greedy loop does not cover (sampling, logits processors)."""
    return model.generate(
        **model_inputs(model, encoded),
        max_new_tokens=max(budgets),
        stopping_criteria=StoppingCriteriaList([criteria]),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(criteria.eos or {0}),
        **_sampling_kwargs(temperature, top_p),
    )


@torch.inference_mode()
def generate_batch(
    model: Any,
    processor: Any,
    requests: Sequence[dict],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] | None = None,
    seed: int | None = None,
    image_mode: str = "pad",
    prompts: Sequence[PreparedPrompt] | None = None,
) -> list[GenerationResult]:
    """Generate one answer per request in a single left-padded batch: `greedy_decode` for greedy
    requests (same tokens as `model.generate`, less overhead per step), `model.generate` otherwise.

    `prompts`, when given, are the requests' already rendered prompts (serving renders them once to
    check the context length and passes them on rather than pre-processing the images twice).
    """
    if not requests:
        return []
    if prompts is None:
        prompts = [render_prompt(processor, r["messages"], image_mode=image_mode) for r in requests]
    encoded = encode_prompts(processor, prompts)
    prompt_len = int(encoded["input_ids"].shape[1])
    prompt_counts = encoded["attention_mask"].sum(dim=1).tolist()
    budgets, stops = _row_rules(requests, max_new_tokens, stop)
    tokenizer = processor.tokenizer
    criteria = RowStop(tokenizer, prompt_len, budgets, stops, eos_ids(model, processor))
    if seed is not None:
        torch.manual_seed(int(seed))
    if temperature <= 0 and plain_greedy_ok(model):
        out = greedy_decode(model, model_inputs(model, encoded), max(budgets), criteria)
    else:
        out = _generate_sampled(model, tokenizer, encoded, budgets, criteria, temperature, top_p)
    results = []
    for row in range(len(requests)):
        n_new, reason = criteria.finished[row] or (int(out.shape[1]) - prompt_len, FINISH_LENGTH)
        ids = out[row, prompt_len : prompt_len + n_new]
        text, hit = apply_stop(tokenizer.decode(ids, skip_special_tokens=True), stops[row])
        results.append(GenerationResult(text, int(prompt_counts[row]), int(n_new), FINISH_STOP if hit else reason))
    return results


def safe_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of `text` that can be sent: hold back any suffix that could be the start of a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold


@torch.inference_mode()
def _generate_into(model: Any, kwargs: dict[str, Any], errors: list[BaseException]) -> None:
    try:
        model.generate(**kwargs)
    except BaseException as err:  # surfaced to the consumer, which re-raises it
        errors.append(err)
        kwargs["streamer"].end()


def stream_generate(
    model: Any,
    processor: Any,
    request: dict,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] | None = None,
    seed: int | None = None,
    image_mode: str = "pad",
    prompt: PreparedPrompt | None = None,
) -> Iterator[StreamEvent]:
    """Yield text deltas as they are generated, then a final event with finish reason and token counts.

    Closing the generator early (client went away) cancels the generation at the next token.
    `prompt`, when given, is the request's already rendered prompt (as in `generate_batch`).
    """
    if prompt is None:
        prompt = render_prompt(processor, request["messages"], image_mode=image_mode)
    encoded = encode_prompts(processor, [prompt])
    prompt_len = int(encoded["input_ids"].shape[1])
    budgets, stops = _row_rules([request], max_new_tokens, stop)
    tokenizer = processor.tokenizer
    criteria = RowStop(tokenizer, prompt_len, budgets, stops, eos_ids(model, processor))
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if seed is not None:
        torch.manual_seed(int(seed))
    kwargs = dict(
        **model_inputs(model, encoded),
        max_new_tokens=budgets[0],
        stopping_criteria=StoppingCriteriaList([criteria]),
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(criteria.eos or {0}),
        **_sampling_kwargs(temperature, top_p),
    )
    errors: list[BaseException] = []
    worker = threading.Thread(target=_generate_into, args=(model, kwargs, errors), daemon=True)
    worker.start()
    text, sent, hit = "", 0, False
    try:
        for piece in streamer:
            text += piece
            cut, hit = apply_stop(text, stops[0])
            upto = len(cut) if hit else safe_prefix_len(text, stops[0])
            if upto > sent:
                yield StreamEvent(cut[sent:upto] if hit else text[sent:upto])
                sent = upto
            if hit:
                criteria.cancelled.set()
                break
        worker.join()
        if errors:
            raise errors[0]
        if not hit and sent < len(text):
            yield StreamEvent(text[sent:])
        n_new, reason = criteria.finished[0] or (budgets[0], FINISH_LENGTH)
        yield StreamEvent("", FINISH_STOP if hit else reason, int(encoded["attention_mask"].sum()), int(n_new))
    finally:
        # The streamer's queue is unbounded, so the worker never blocks on it; cancelling is enough.
        criteria.cancelled.set()
        worker.join(timeout=30)
