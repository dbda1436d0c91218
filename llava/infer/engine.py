"""Continuous batching for a llava-hf model: requests join the running batch at the next decode step.

Batching whole requests (collect N, generate, answer N) leaves the model idle while answers travel
back and the next requests arrive, and every row waits for the longest one. Here one thread owns
the model and runs decode steps: before each step it prefills whatever arrived (as one left-padded
batch) and splices those rows into the running KV cache; after each step, rows that finished
(EOS, stop string, token budget, cancelled) leave at once and their callers get the answer. So the
model is busy as long as anyone is waiting, and a short answer never waits for a long one.

Row layout: all rows share one KV cache, left-padded to a common length; each row keeps its own
attention mask and position counter, so padding never changes what a row sees (a test checks
that a row's tokens equal those of decoding it alone). Columns that became padding for every row
(after long rows left) are trimmed.

Isolation: one request must never hurt another. Sampling runs per row and a row whose sampling
fails (or whose callback raises) leaves alone with its error; a decode forward that fails is rolled
back (the cache columns it appended are cut) and retried once, eagerly, so the running rows keep
their KV cache; a prefill that fails is retried row by row, so only the row that cannot be
prefilled gets the error. A compiled decode step that fails sends the engine to eager decoding for
a cool-down (doubling on each new failure), then the compiled step is tried again. Failures are
counted per kind (`failures`) for /metrics. Every request taken off the queue is answered.

Admission is bounded per step: one prefill takes rows while their prompt tokens and images fit
`prefill_tokens` / `prefill_images` (a single row always fits: the API refuses prompts larger
than the token budget). Rows that share an `encoded` object (the n answers of one request) are
prefilled once and their KV cache copied.

Models whose generation config sets logit rules (repetition penalty and the like, see
`generate.plain_greedy_ok`) are served by `SequentialEngine`: one request at a time through
`model.generate`, which applies those rules exactly. Which engine serves a model is decided in
one table, `llava.infer.engines.ENGINES`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from llava.infer import json_prefix
from llava.infer.generate import (
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationResult,
    PreparedPrompt,
    apply_stop,
    eos_ids,
    generate_batch,
    model_inputs,
    safe_prefix_len,
    stream_generate,
)

log = logging.getLogger("llava.infer")


class EngineClosed(RuntimeError):
    """The engine was closed (its model was swapped out); submit to the current one."""


# OpenAI's floor for a logprob: -inf has no JSON spelling.
MIN_LOGPROB = -9999.0


@dataclass
class TextDelta:
    """Text that became final, the completion tokens generated so far, and their logprobs (if asked)."""

    text: str
    completion_tokens: int
    logprobs: list[dict[str, Any]] | None = None


@dataclass(eq=False)
class DecodeRequest:
    """One request for an engine. Callbacks run on the engine thread and must not block.

    `encoded` is the processor's output for this prompt alone (batch of one); requests that share
    one `encoded` object are prefilled once. `on_text` (optional) receives `TextDelta`s as text
    becomes final (a possible stop-string prefix is held back); the text of the last step is not
    sent there but is part of the result. `on_done` receives the `GenerationResult` or the
    exception that ended the request. `top_logprobs` None = no logprobs, k = logprobs with the k
    most likely alternatives per token. `logit_bias` is added to the token's logit before choosing;
    `min_tokens` forbids end-of-sequence before that many tokens; `json_object` constrains the
    answer to one JSON object (the row ends when it closes).
    """

    prompt: PreparedPrompt
    encoded: Any
    max_new_tokens: int
    on_done: Callable[[GenerationResult | BaseException], None]
    stops: list[str] = field(default_factory=list)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    top_logprobs: int | None = None
    json_object: bool = False
    on_text: Callable[[TextDelta], None] | None = None
    cancelled: bool = False  # set from any thread; the row leaves at the next step without an answer
    submitted: float = 0.0  # time.monotonic() when handed to the engine
    steps: int = 0  # decode steps this request took part in
    rows_seen: int = 0  # sum over those steps of the batch size: rows_seen / steps = mean batch

    @property
    def prompt_tokens(self) -> int:
        return int(self.encoded["attention_mask"].sum())

    @property
    def plain(self) -> bool:
        """Greedy with no logit rules and no logprobs: the batch-wide argmax is this row's token."""
        return (self.temperature <= 0 and not self.logit_bias and not self.min_tokens and self.top_logprobs is None
                and not self.json_object)

    def cancel(self) -> None:
        self.cancelled = True


class _EngineThread:
    """The thread, queue and lifecycle shared by both engines; subclasses implement `_step`."""

    features: frozenset[str] = frozenset()  # optional request features beyond text, stop, sampling

    def __init__(self, name: str):
        self.failures: Counter[str] = Counter()  # failures by kind, for /metrics
        self._pending: deque[DecodeRequest] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, request: DecodeRequest) -> None:
        with self._wake:
            if self._closing:
                raise EngineClosed("engine is closed")
            request.submitted = time.monotonic()
            self._pending.append(request)
            self._wake.notify()

    def close(self, timeout: float | None = None) -> None:
        """Finish what was submitted, then stop the thread; later submits raise EngineClosed."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)

    def release(self) -> None:
        """After `close`: drop the references to the model, so its weights can be freed while this
        (closed) engine object is still around, e.g. for metrics."""
        self.model = None
        if hasattr(self, "compiled_fn"):
            self.compiled_fn = None

    @property
    def load(self) -> int:
        """Requests submitted and not yet answered."""
        return len(self._pending) + self._active()

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet decoding."""
        return len(self._pending)

    @property
    def decoding(self) -> int:
        """Requests decoding now (rows of the running batch)."""
        return self._active()

    def _take_pending(self, limit: int) -> list[DecodeRequest]:
        taken: list[DecodeRequest] = []
        with self._wake:
            while self._pending and len(taken) < limit:
                req = self._pending.popleft()
                if not req.cancelled:
                    taken.append(req)
        return taken

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._active() and not self._closing:
                    self._wake.wait()
                if self._closing and not self._pending and not self._active():
                    return
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as err:  # what isolation did not contain: the step's rows get the error, the engine lives on
                log.exception("engine step failed")
                self.failures["step"] += 1
                self._fail_all(err)

    def _note_failure(self, kind: str, err: BaseException) -> None:
        self.failures[kind] += 1
        log.warning("%s failed (%s: %s)", kind, type(err).__name__, err)

    def _answer(self, req: DecodeRequest, outcome: GenerationResult | BaseException) -> None:
        """Deliver an outcome; a callback that raises must not take the engine or other rows with it."""
        try:
            req.on_done(outcome)
        except Exception as err:
            self._note_failure("callback", err)

    def _active(self) -> int:
        raise NotImplementedError

    def _step(self) -> None:
        raise NotImplementedError

    def _fail_all(self, err: BaseException) -> None:
        raise NotImplementedError


@dataclass(eq=False)
class _Row:
    req: DecodeRequest
    generator: torch.Generator | None
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # (token ids, values) of logit_bias
    generated: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None
    sent: int = 0  # characters already streamed
    lp_sent: int = 0  # tokens whose logprobs were streamed
    json_state: json_prefix.State | None = None  # where a json_object answer stands
    json_blank: bool = False  # the last token was whitespace (no runs of it: they could go on forever)


def _left_pad(t: torch.Tensor, width: int, value: float = 0) -> torch.Tensor:
    """Pad dim 1 (sequence for masks) or dim 2 (sequence for [B, H, L, D] caches) on the left."""
    dim = 1 if t.dim() == 2 else 2
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_full(shape, value), t], dim=dim)


def _collate(encoded: list[Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Single-prompt processor outputs -> one left-padded batch (what the processor would build)."""
    width = max(int(e["input_ids"].shape[1]) for e in encoded)
    batch = {
        "input_ids": torch.cat([_left_pad(e["input_ids"], width, pad_id) for e in encoded]),
        "attention_mask": torch.cat([_left_pad(e["attention_mask"], width, 0) for e in encoded]),
    }
    for key in encoded[0]:
        if key not in batch:
            parts = [e[key] for e in encoded if key in e]
            batch[key] = torch.cat(parts)
    return batch


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        # Non-finite logits (or a temperature the API should have refused): the most likely token
        # is still well defined, a NaN distribution is not, and multinomial would throw.
        return int(logits.argmax())
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p. The first token always stays, also for
        # a top_p below float32's smallest number (1e-320 rounds to 0 and would drop every token).
        drop = (sorted_p.cumsum(0) - sorted_p) >= top_p
        drop[0] = False
        sorted_p[drop] = 0
        return int(order[torch.multinomial(sorted_p, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


class ContinuousEngine(_EngineThread):
    """Iteration-level batching over a shared, left-padded KV cache (see the module docstring)."""

    features = frozenset({"logprobs", "logit_bias", "min_tokens", "json_object"})
    # Steps decoded eagerly after the compiled step first fails; doubles on each further failure.
    COMPILED_COOLDOWN_STEPS = 256

    def __init__(self, model: Any, processor: Any, *, max_rows: int = 32, admit_wait_s: float = 0.0,
                 compile_decode: bool = False, prefill_tokens: int = 16384, prefill_images: int = 64):
        if max_rows < 1 or prefill_tokens < 1 or prefill_images < 1:
            raise ValueError("max_rows, prefill_tokens and prefill_images must be >= 1")
        self.model = model
        self.admit_wait_s = admit_wait_s
        self.tokenizer = processor.tokenizer
        self.max_rows = max_rows
        self.prefill_tokens = prefill_tokens
        self.prefill_images = prefill_images
        self.eos = eos_ids(model, processor)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.eos or {0}))
        # Prefills run eagerly (they vary in shape and carry images); the decode step, which runs
        # once per generated token, can be compiled.
        compiled = compiled_decode_step(model, self.pad_id) if compile_decode else model
        self.compiled_fn = compiled if compiled is not model else None
        self._cooldown = self.COMPILED_COOLDOWN_STEPS
        self._eager_until = 0  # step count before which decoding stays eager after a compiled failure
        self._steps = 0
        self._pieces: dict[int, str] = {}
        self._special: set[int] | None = None  # never part of a JSON answer
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._attn: torch.Tensor | None = None  # [B, L] 1 = real token
        self._pos: torch.Tensor | None = None  # [B, 1] position of each row's last token
        self._logits: torch.Tensor | None = None  # [B, V] next-token logits
        self.batch_sizes: deque[int] = deque(maxlen=1024)  # rows per decode step, for metrics and tests
        super().__init__("llava-decode")

    def _active(self) -> int:
        return len(self._rows)

    @property
    def decoding_eagerly(self) -> bool:
        """Whether the next step runs eagerly although a compiled step exists (a failure's cool-down)."""
        return self.compiled_fn is not None and self._steps < self._eager_until

    # ------------------------------------------------------------------------------------ one step

    def _step(self) -> None:
        self._drop_cancelled()
        if self._admission_due():
            fresh = self._take_admissible()
            if fresh:
                self._admit_isolated(fresh)
        if not self._rows:
            return
        tokens = self._choose_tokens()
        self.batch_sizes.append(len(self._rows))
        keep = []
        for i, (row, token) in enumerate(zip(self._rows, tokens, strict=True)):
            if isinstance(token, BaseException):
                self._answer(row.req, token)
            elif not self._advance_isolated(row, token):
                keep.append(i)
        if len(keep) < len(self._rows):
            self._select(keep)
            tokens = [tokens[i] for i in keep]
        if not self._rows:
            return
        assert self._attn is not None and self._pos is not None
        self._attn = torch.cat([self._attn, self._attn.new_ones(len(self._rows), 1)], dim=1)
        self._pos = self._pos + 1
        ids = torch.tensor(tokens, dtype=torch.long, device=self.model.device).unsqueeze(1)
        self._logits = self._decode(ids)[:, -1]
        self._steps += 1

    def _decode(self, ids: torch.Tensor) -> torch.Tensor:
        """One decode forward; on failure, cut what it appended to the cache and retry once eagerly."""
        assert self._cache is not None
        lengths = [layer.keys.shape[2] for layer in self._cache.layers]
        compiled = self.compiled_fn is not None and not self.decoding_eagerly
        fn = self.compiled_fn if compiled else self.model
        try:
            return self._forward(fn, ids)
        except Exception as err:
            self._note_failure("compiled_decode" if compiled else "decode", err)
            if compiled:
                self._eager_until = self._steps + self._cooldown
                self._cooldown *= 2
            for layer, length in zip(self._cache.layers, lengths, strict=True):
                layer.keys = layer.keys[:, :, :length]
                layer.values = layer.values[:, :, :length]
            return self._forward(self.model, ids)  # a second failure fails this step's rows

    def _forward(self, fn: Any, ids: torch.Tensor) -> torch.Tensor:
        out = fn(input_ids=ids, attention_mask=self._attn, position_ids=self._pos, past_key_values=self._cache,
                 use_cache=True)
        return out.logits

    def _admission_due(self) -> bool:
        """Whether to prefill the waiting requests now or let them gather for a few more steps.

        A prefill is a whole extra forward (vision tower included), and its fixed cost is paid per
        call, not per row: admitting each arrival on its own spent a quarter of the engine's time
        on prefills at 8 concurrent clients. So while rows are decoding, arrivals are admitted once
        they are as many as the rows running (or fill the batch), or the oldest has waited
        `admit_wait_s`; with nothing running they go at once.
        """
        waiting = len(self._pending)
        room = self.max_rows - len(self._rows)
        if not waiting or not room:
            return False
        if not self._rows or waiting >= min(room, len(self._rows)):
            return True
        return time.monotonic() - self._pending[0].submitted >= self.admit_wait_s

    def _take_admissible(self) -> list[DecodeRequest]:
        """Waiting requests, in order, while the batch has room and the prefill budget holds."""
        taken: list[DecodeRequest] = []
        seen: set[int] = set()
        tokens = images = 0
        with self._wake:
            while self._pending and len(taken) < self.max_rows - len(self._rows):
                req = self._pending[0]
                if req.cancelled:
                    self._pending.popleft()
                    continue
                fresh = id(req.encoded) not in seen  # the n answers of a request share one prefill
                more_tokens = req.prompt_tokens if fresh else 0
                more_images = len(req.prompt.images) if fresh else 0
                if taken and (tokens + more_tokens > self.prefill_tokens or images + more_images > self.prefill_images):
                    break
                self._pending.popleft()
                taken.append(req)
                seen.add(id(req.encoded))
                tokens += more_tokens
                images += more_images
        return taken

    def _admit_isolated(self, requests: list[DecodeRequest]) -> None:
        """Admit; if the prefill fails, retry each prompt alone once, so only a failing one is refused."""
        try:
            self._admit(requests)
            return
        except Exception as err:
            self._note_failure("prefill", err)
            groups: dict[int, list[DecodeRequest]] = {}
            for req in requests:
                groups.setdefault(id(req.encoded), []).append(req)
            if len(groups) == 1:
                for req in requests:
                    self._answer(req, err)
                return
        for group in groups.values():
            try:
                self._admit(group)
            except Exception as err:
                self._note_failure("prefill", err)
                for req in group:
                    self._answer(req, err)

    def _admit(self, requests: list[DecodeRequest]) -> None:
        """Prefill the new rows as one batch, then splice them into the running state.

        Nothing of the running state changes until the prefill succeeded."""
        rows = [self._new_row(r) for r in requests]  # a bad seed or bias fails here, before any compute
        sources: dict[int, int] = {}
        for r in requests:
            sources.setdefault(id(r.encoded), len(sources))
        unique = {id(r.encoded): r.encoded for r in requests}
        inputs = model_inputs(self.model, _collate(list(unique.values()), self.pad_id))
        attn = inputs["attention_mask"]
        positions = (attn.long().cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.model(**inputs, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
        if len(unique) < len(requests):  # copy the shared prompts' cache to each of their rows
            index = torch.tensor([sources[id(r.encoded)] for r in requests], device=attn.device)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
            attn, positions, logits = attn[index], positions[index], logits[index]
        if not self._rows:
            self._rows, self._cache, self._attn = rows, cache, attn
            self._pos, self._logits = positions[:, -1:], logits
            return
        assert self._cache is not None and self._attn is not None and self._pos is not None
        assert self._logits is not None
        width = max(self._attn.shape[1], attn.shape[1])
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)])
            old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])
        self._attn = torch.cat([_left_pad(self._attn, width), _left_pad(attn, width)])
        self._pos = torch.cat([self._pos, positions[:, -1:]])
        self._logits = torch.cat([self._logits, logits])
        self._rows.extend(rows)

    def _new_row(self, req: DecodeRequest) -> _Row:
        bias = None
        if req.logit_bias:
            ids = torch.tensor(list(req.logit_bias), dtype=torch.long, device=self.model.device)
            values = torch.tensor(list(req.logit_bias.values()), dtype=torch.float32, device=self.model.device)
            bias = (ids, values)
        return _Row(req, self._generator(req), bias, logprobs=[] if req.top_logprobs is not None else None,
                    json_state=json_prefix.START if req.json_object else None)

    def _generator(self, req: DecodeRequest) -> torch.Generator | None:
        if req.temperature <= 0:
            return None
        # One generator per row: a seeded request gets the same sample whatever it is batched with.
        # It lives where the logits do (multinomial refuses a CPU generator for CUDA tensors).
        g = torch.Generator(device=self.model.device)
        if req.seed is not None:
            g.manual_seed(int(req.seed) % 2**64)  # torch's seeds are unsigned 64-bit; negatives map onto them
        else:
            g.seed()
        return g

    def _choose_tokens(self) -> list[int | BaseException]:
        """The next token of every row; a row whose choice fails gets its exception instead."""
        assert self._logits is not None
        tokens: list[int | BaseException] = list(self._logits.argmax(-1).tolist())
        for i, row in enumerate(self._rows):
            if row.req.plain:
                continue
            try:
                tokens[i] = self._choose(row, self._logits[i])
            except Exception as err:
                self._note_failure("sampling", err)
                tokens[i] = err
        return tokens

    def _choose(self, row: _Row, logits: torch.Tensor) -> int:
        req = row.req
        scores = logits.float().clone()
        raw = scores.clone() if row.logprobs is not None else None
        if row.bias is not None:
            scores.index_add_(0, *row.bias)
        if len(row.generated) < req.min_tokens and self.eos:
            scores[list(self.eos)] = float("-inf")
        if row.json_state is not None:
            token = self._json_choice(row, scores)
        elif row.generator is None:
            token = int(scores.argmax())
        else:
            token = _sample(scores, req.temperature, req.top_p, row.generator)
        if raw is not None and row.logprobs is not None:
            row.logprobs.append(self._logprob_entry(torch.log_softmax(raw, dim=-1), token, req.top_logprobs or 0))
        return token

    def _json_choice(self, row: _Row, scores: torch.Tensor) -> int:
        """The most likely token (greedy) or a sampled one (Gumbel-max: the first allowed token in
        the perturbed order is a sample of the distribution restricted to allowed tokens) whose
        text keeps the answer a prefix of a JSON object. top_p does not apply here."""
        assert row.json_state is not None
        keys = scores
        if row.generator is not None:
            noise = torch.rand(scores.shape, generator=row.generator, device=scores.device).clamp_min(1e-20)
            keys = scores / row.req.temperature - torch.log(-torch.log(noise))
        if self._special is None:
            self._special = set(self.tokenizer.all_special_ids) | self.eos
        # Near the token budget, the token that brings the object closest to closed wins (the most
        # likely among those), so an answer cut by max_tokens is still one whole JSON object.
        remaining = row.req.max_new_tokens - len(row.generated)
        closing = remaining <= json_prefix.closing_cost(row.json_state) + 1
        best: tuple[int, int, json_prefix.State, bool] | None = None  # (cost, token, state, blank)
        for token in torch.argsort(keys, descending=True).tolist():
            if token in self._special or not torch.isfinite(scores[token]):
                continue
            piece = self._piece(token)
            blank = not piece.strip()
            if not piece or "\ufffd" in piece or (blank and row.json_blank):
                continue
            state = json_prefix.feed_text(row.json_state, piece)
            if state is None:
                continue
            if not closing:
                best = (0, token, state, blank)
                break
            cost = json_prefix.closing_cost(state)
            if best is None or cost < best[0]:
                best = (cost, token, state, blank)
        if best is None:
            raise RuntimeError("no token continues the JSON answer")
        _, token, row.json_state, row.json_blank = best
        return token

    def _piece(self, token: int) -> str:
        if token not in self._pieces:
            self._pieces[token] = self.tokenizer.decode([token])
        return self._pieces[token]

    def _logprob_entry(self, logprobs: torch.Tensor, token: int, top: int) -> dict[str, Any]:
        def one(tok: int, value: float) -> dict[str, Any]:
            piece = self._piece(tok)
            return {"token": piece, "logprob": max(value, MIN_LOGPROB), "bytes": list(piece.encode("utf-8"))}

        entry = one(token, float(logprobs[token]))
        entry["top_logprobs"] = []
        if top:
            values, ids = logprobs.topk(min(top, logprobs.shape[0]))
            entry["top_logprobs"] = [one(t, v) for t, v in zip(ids.tolist(), values.tolist(), strict=True)]
        return entry

    def _advance_isolated(self, row: _Row, token: int) -> bool:
        try:
            return self._advance(row, token)
        except Exception as err:  # a callback or the tokenizer failed for this row: it leaves with the error
            self._note_failure("row", err)
            self._answer(row.req, err)
            return True

    def _advance(self, row: _Row, token: int) -> bool:
        """Append a token to a row; stream what became final; return True when the row is finished."""
        req = row.req
        req.steps += 1
        req.rows_seen += len(self._rows)
        row.generated.append(token)
        n = len(row.generated)
        reason = FINISH_STOP if token in self.eos else None
        if row.json_state is not None and row.json_state[1] == json_prefix.DONE:
            reason = FINISH_STOP  # the JSON object is complete
        text = None
        if req.stops or req.on_text is not None:
            text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
            cut, hit = apply_stop(text, req.stops)
            if hit:
                reason, text = FINISH_STOP, cut
        if reason is None and n >= req.max_new_tokens:
            reason = FINISH_LENGTH
        if reason is None:
            if req.on_text is not None and text is not None:
                self._stream(row, text, n)
            return False
        if text is None:
            text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        self._answer(req, GenerationResult(text, req.prompt_tokens, n, reason, row.logprobs))
        return True

    def _stream(self, row: _Row, text: str, n: int) -> None:
        assert row.req.on_text is not None
        final = safe_prefix_len(text, row.req.stops)
        if final and text[final - 1] == "\ufffd":
            final -= 1  # a multi-byte character split across tokens: wait for its other bytes
        if final > row.sent:
            logprobs = row.logprobs[row.lp_sent:n] if row.logprobs is not None else None
            row.req.on_text(TextDelta(text[row.sent:final], n, logprobs))
            row.sent = final
            row.lp_sent = n

    # ------------------------------------------------------------------------------------ state upkeep

    def _drop_cancelled(self) -> None:
        keep = [i for i, row in enumerate(self._rows) if not row.req.cancelled]
        if len(keep) < len(self._rows):
            self._select(keep)

    def _select(self, keep: list[int]) -> None:
        """Keep only the rows `keep`, then trim the columns that are now padding in every row."""
        if not keep:
            self._rows, self._cache, self._attn, self._pos, self._logits = [], None, None, None, None
            return
        assert self._cache is not None and self._attn is not None and self._pos is not None
        assert self._logits is not None
        index = torch.tensor(keep, dtype=torch.long, device=self._attn.device)
        self._rows = [self._rows[i] for i in keep]
        self._attn, self._pos, self._logits = self._attn[index], self._pos[index], self._logits[index]
        lead = int((self._attn.cumsum(1) == 0).sum(1).min())
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, lead:]
            layer.values = layer.values[index, :, lead:]
        self._attn = self._attn[:, lead:]

    def _fail_all(self, err: BaseException) -> None:
        rows, self._rows = self._rows, []
        self._cache, self._attn, self._pos, self._logits = None, None, None, None
        for row in rows:
            self._answer(row.req, err)


class SequentialEngine(_EngineThread):
    """One request at a time through `model.generate`: for models with configured logit rules."""

    def __init__(self, model: Any, processor: Any, *, image_mode: str = "pad"):
        self.model = model
        self.processor = processor
        self.image_mode = image_mode
        self._current: DecodeRequest | None = None
        super().__init__("llava-generate")

    def _active(self) -> int:
        return int(self._current is not None)

    def _step(self) -> None:
        taken = self._take_pending(1)
        if not taken:
            return
        req = self._current = taken[0]
        req.steps, req.rows_seen = 1, 1
        # An exception leaves `_current` set, so that `_fail_all` answers this request with it.
        if req.on_text is None:
            result = generate_batch(self.model, self.processor, [{"messages": []}], prompts=[req.prompt],
                                    max_new_tokens=req.max_new_tokens, temperature=req.temperature,
                                    top_p=req.top_p, stop=req.stops, seed=req.seed)[0]
        else:
            result = self._stream(req)
        self._current = None
        if result is not None and not req.cancelled:
            self._answer(req, result)

    def _stream(self, req: DecodeRequest) -> GenerationResult | None:
        """Stream through `stream_generate`; None when the request was cancelled midway."""
        assert req.on_text is not None
        events = stream_generate(self.model, self.processor, {"messages": []}, prompt=req.prompt,
                                 max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_p=req.top_p,
                                 stop=req.stops, seed=req.seed, image_mode=self.image_mode)
        # The latest delta is held back until the next one arrives: the last step's text travels with
        # the result, as the continuous engine does. Delta counts stand in for token counts here.
        text: list[str] = []
        try:
            for ev in events:
                if req.cancelled:
                    return None
                if ev.delta:
                    if text:
                        req.on_text(TextDelta(text[-1], len(text)))
                    text.append(ev.delta)
                if ev.finish_reason is not None:
                    return GenerationResult("".join(text), ev.prompt_tokens, ev.completion_tokens, ev.finish_reason)
        finally:
            events.close()
        raise RuntimeError("generation ended without a finish event")

    def _fail_all(self, err: BaseException) -> None:
        if self._current is not None:
            self._answer(self._current, err)
            self._current = None


def compiled_decode_step(model: Any, pad_id: int) -> Any:
    """`torch.compile` of the model for one-token decode steps, compiled before the first request.

    The step's Python overhead (dozens of small modules per layer) is most of a decode step for a
    small model on CPU, and kernel-launch overhead on GPU; compiling roughly halves the step time
    (benchmarks/README.md). The compiler specialises a batch of one row, so the warm-up compiles
    both graphs, one row and several rows with left padding; any other batch size or cache length
    reuses the dynamic graph. Where compiling fails (no C++ compiler for the CPU backend, an
    unsupported model), decoding stays eager and the failure is logged.
    """
    started = time.perf_counter()
    try:
        fn = torch.compile(model, dynamic=True)
        with torch.inference_mode():  # the grad mode is part of the compiled graph's guards
            _warm_up(model, fn, pad_id)
    except Exception as err:
        log.warning("compiling the decode step failed, decoding eagerly: %s: %s", type(err).__name__, err)
        return model
    log.info("decode step compiled in %.1f s", time.perf_counter() - started)
    return fn


def _warm_up(model: Any, fn: Any, pad_id: int) -> None:
    for rows in (1, 3):
        # Shapes as the engine's steps have them: a fresh [rows, 1] token tensor, a cache length
        # (11) that equals no other size, so the compiler assumes no accidental size equalities.
        prompt = torch.full((rows, 11), pad_id, dtype=torch.long, device=model.device)
        attn = torch.ones_like(prompt)
        attn[1:, :2] = 0  # left padding in the multi-row batch, as real batches have
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        model(input_ids=prompt, attention_mask=attn, position_ids=positions, past_key_values=cache, use_cache=True)
        attn = torch.cat([attn, attn.new_ones(rows, 1)], dim=1)
        token = torch.full((rows, 1), pad_id, dtype=torch.long, device=model.device)
        fn(input_ids=token, attention_mask=attn, position_ids=positions[:, -1:] + 1, past_key_values=cache,
           use_cache=True)


def full_attention(model: Any) -> bool:
    """Splicing caches assumes every layer keeps all positions (no sliding window)."""
    cfg = model.config.get_text_config(decoder=True)
    types = getattr(cfg, "layer_types", None) or []
    return getattr(cfg, "sliding_window", None) is None and all(t == "full_attention" for t in types)
