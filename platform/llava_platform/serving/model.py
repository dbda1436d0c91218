"""The model side of a serving replica: holds the weights, runs continuous batching, streams, hot-swaps.

`ModelRuntime` lives inside the Serve replica (`serving.app.LlavaServer`) next to the HTTP API, so a
request costs no second actor hop. Requests arrive already validated, with images decoded. Each
request's prompt is rendered and encoded in a worker thread (overlapping the decode steps running
for others), checked against the context length, then handed to the model's engine
(`llava.infer.engine`): a thread that owns the model and runs decode steps, letting new requests
join the running batch at the next step and finished ones leave at once.

Reload, with the memory policy of `model.reload_policy`: `load_then_swap` loads the new model
and its engine next to the old ones, then a single attribute assignment swaps the (model,
processor, engine, version) bundle; the old engine finishes the requests it holds and then stops,
so requests in flight complete on the old model and none fail. `unload_first` answers new
requests 503 + Retry-After, drains and frees the old model, then loads the new one (one model in
memory at a time; if the new one fails to load, the old one is loaded back). After a swap the
download cache is pruned to `model_cache_keep` versions.

The n answers of a request (`n` > 1) are n engine rows sharing one encoded prompt, which the
engine prefills once.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llava_platform.serving import model_cache
from llava_platform.serving.config import ServeConfig, parse_serve_config

log = logging.getLogger("llava.serving")


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    processor: Any
    engine: Any  # llava.infer.engine engine bound to `model`
    model_dir: str
    version: str
    context_length: int
    loaded_at: float
    image_mode: str  # how request images are prepared: the model's record unless the config overrides it


def resolve_model(uri: str, cfg: ServeConfig) -> Path:
    from llava_platform.model_uri import resolve_model_dir

    return Path(resolve_model_dir(uri, cfg.model_cache_dir, tracking_uri=cfg.mlflow_tracking_uri))


def model_version(model_dir: Path) -> str:
    """Identity of a model directory's content: path plus file names, sizes and mtimes (no hashing GBs)."""
    h = hashlib.sha256(str(model_dir.resolve()).encode())
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def load_model(model_dir: Path, cfg: ServeConfig) -> LoadedModel:
    from llava.infer.engines import make_engine
    from llava.infer.generate import context_length
    from llava.infer.load import load_for_inference
    from llava.model.metadata import read_metadata

    model, processor = load_for_inference(str(model_dir), device=cfg.model.device, dtype=cfg.model.dtype)
    meta = read_metadata(model_dir)
    trained = meta.image_mode if meta else "pad"
    image_mode = cfg.image_mode or trained
    if image_mode != trained:
        log.warning("serving %s with image_mode=%s from the config; the model was trained with %s",
                    model_dir, image_mode, trained)
    m = cfg.model
    engine = make_engine(model, processor, engine=m.engine, max_rows=m.max_batch_size, admit_wait_s=m.admit_wait_s,
                         compile_decode=m.compile_decode, prefill_tokens=m.prefill_tokens,
                         prefill_images=m.prefill_images, image_mode=image_mode)
    return LoadedModel(model, processor, engine, str(model_dir), model_version(model_dir), context_length(model),
                       time.time(), image_mode)


def _error(status: int, message: str, code: str, param: str | None = "messages") -> dict[str, Any]:
    return {"status": status, "message": message, "param": param, "code": code}


def _prepare(bundle: LoadedModel, item: dict[str, Any], cfg: ServeConfig) -> tuple[Any, Any, dict[str, Any] | None]:
    """Render and encode the prompt: (prompt, encoded, None), or (None, None, error: OpenAI shape + status)."""
    from llava.infer.generate import PromptError, encode_prompts, render_prompt

    error = _unsupported(bundle, item)
    if error is not None:
        return None, None, error
    try:
        prompt = render_prompt(bundle.processor, item["messages"], image_mode=bundle.image_mode)
    except PromptError as err:
        return None, None, _error(400, str(err), "invalid_messages")
    encoded = encode_prompts(bundle.processor, [prompt])
    n_prompt = int(encoded["input_ids"].shape[1])
    if n_prompt + item["max_new_tokens"] > bundle.context_length:
        return None, None, _error(400, f"this model's maximum context length is {bundle.context_length} tokens; "
                                       f"the prompt has {n_prompt} tokens and max_tokens is {item['max_new_tokens']}",
                                  "context_length_exceeded")
    if n_prompt > cfg.model.prefill_tokens:
        return None, None, _error(400, f"the prompt has {n_prompt} tokens; this server prefills at most "
                                       f"{cfg.model.prefill_tokens} per step", "prompt_too_large")
    return prompt, encoded, None


def _unsupported(bundle: LoadedModel, item: dict[str, Any]) -> dict[str, Any] | None:
    """A 400 for request features this model's engine cannot honour (never silently ignored)."""
    wanted = {"logprobs": item.get("top_logprobs") is not None, "logit_bias": bool(item.get("logit_bias")),
              "min_tokens": bool(item.get("min_tokens")), "json_object": bool(item.get("json_object"))}
    for feature, asked in wanted.items():
        if asked and feature not in bundle.engine.features:
            return _error(400, f"{feature} is not supported for this model (it is decoded by generate(), one "
                               "request at a time)", "unsupported_parameter", param=feature)
    vocab = len(bundle.processor.tokenizer)
    for token in item.get("logit_bias") or {}:
        if not 0 <= token < vocab:
            return _error(400, f"logit_bias: token id {token} is outside the vocabulary (0..{vocab - 1})",
                          "invalid_value", param="logit_bias")
    return None


def _failure(err: BaseException) -> dict[str, Any]:
    return _error(500, f"generation failed: {type(err).__name__}", "generation_failed", param=None)


class ModelRuntime:
    def __init__(self, args: dict[str, Any] | ServeConfig):
        self.cfg = parse_serve_config(args)
        if self.cfg.model.torch_threads:
            import torch

            torch.set_num_threads(self.cfg.model.torch_threads)
        self.model_uri = self.cfg.model_uri
        self._reload_lock = asyncio.Lock()
        self._last_watch = time.monotonic()
        self.unavailable: str | None = None  # why new requests are refused for a moment (unload-first reload)
        self.bundle = load_model(resolve_model(self.model_uri, self.cfg), self.cfg)
        log.info("loaded model %s version %s", self.bundle.model_dir, self.bundle.version)

    # ------------------------------------------------------------------------------------ status

    def info(self) -> dict[str, Any]:
        b = self.bundle
        return {"model_uri": self.model_uri, "model_dir": b.model_dir, "version": b.version,
                "context_length": b.context_length, "loaded_at": b.loaded_at, "pid": os.getpid()}

    async def check_health(self) -> None:
        # The replica's health check calls this periodically: a natural clock for the alias watch.
        interval = self.cfg.model.watch_interval_s
        if interval > 0 and time.monotonic() - self._last_watch >= interval and not self._reload_lock.locked():
            self._last_watch = time.monotonic()
            asyncio.get_running_loop().create_task(self._watch_once())

    async def _watch_once(self) -> None:
        try:
            await self.reload(None)
        except Exception as err:  # a registry hiccup must not take the replica down
            log.warning("model watch failed: %s", err)

    # ------------------------------------------------------------------------------------ reload

    async def reload(self, model_uri: str | None = None, force: bool = False) -> dict[str, Any]:
        """Re-resolve `model_uri` (default: the current one); load and swap if its content changed."""
        async with self._reload_lock:
            uri = model_uri or self.model_uri
            previous = self.bundle
            model_dir = await asyncio.to_thread(resolve_model, uri, self.cfg)
            if not force and uri == self.model_uri and model_version(model_dir) == previous.version:
                return {"changed": False, "previous": previous.version, **self.info()}
            if self.cfg.model.reload_policy == "unload_first":
                bundle = await self._unload_then_load(previous, model_dir)
            else:
                bundle = await asyncio.to_thread(load_model, model_dir, self.cfg)
            self.bundle, self.model_uri = bundle, uri  # the atomic swap; requests already submitted keep theirs
            # The old engine answers what it holds, then its thread ends and the old weights can go.
            asyncio.get_running_loop().create_task(asyncio.to_thread(previous.engine.close))
            log.info("switched model %s -> %s (%s)", previous.version, bundle.version, model_dir)
            await asyncio.to_thread(model_cache.prune, self.cfg.model_cache_dir, self.cfg.model_cache_keep,
                                    [bundle.model_dir, previous.model_dir])
            return {"changed": True, "previous": previous.version, **self.info()}

    async def _unload_then_load(self, previous: LoadedModel, model_dir: Path) -> LoadedModel:
        self.unavailable = "the model is being reloaded"
        try:
            await asyncio.to_thread(previous.engine.close)  # drains: requests in flight finish first
            previous.engine.release()
            # Drop the old weights before loading: the engine thread has ended, so only this frame
            # and `self.bundle` referred to them; `self.bundle` keeps the metadata probes need.
            self.bundle = replace(previous, model=None)
            del previous
            gc.collect()
            try:
                return await asyncio.to_thread(load_model, model_dir, self.cfg)
            except Exception:
                log.exception("loading %s failed; loading the previous model back", model_dir)
                self.bundle = await asyncio.to_thread(load_model, Path(self.bundle.model_dir), self.cfg)
                raise
        finally:
            self.unavailable = None

    # ------------------------------------------------------------------------------------ generation

    async def generate(self, item: dict[str, Any]) -> dict[str, Any]:
        """One request -> {"results": [n answers], "version", "batch_size", "compute_s"} or {"error": {...}}."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(item.get("n", 1))]
        submitted = await self._submit(item, [
            {"on_done": lambda res, fut=fut: loop.call_soon_threadsafe(_settle, fut, res)} for fut in futures])
        if "error" in submitted:
            return submitted
        reqs, bundle, started = submitted["requests"], submitted["bundle"], time.perf_counter()
        try:
            outcomes = await asyncio.gather(*futures)
        finally:
            for req in reqs:
                req.cancel()  # a no-op once answered; otherwise the caller went away and the row can leave
        for res in outcomes:
            if isinstance(res, BaseException):
                return {"error": _failure(res)}
        return {"results": [res.__dict__ for res in outcomes], "version": bundle.version,
                "batch_size": sum(r.rows_seen for r in reqs) / max(sum(r.steps for r in reqs), 1),
                "compute_s": time.perf_counter() - started}

    async def stream(self, item: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Events {"start"}, then per answer `index` {"delta", ...} and one {"finish_reason", ...};
        or a single {"error"}. The last text of an answer comes with its finish reason."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        n = item.get("n", 1)

        def callbacks(i: int) -> dict[str, Any]:
            return {"on_done": lambda res: loop.call_soon_threadsafe(events.put_nowait, (i, res)),
                    "on_text": lambda delta: loop.call_soon_threadsafe(events.put_nowait, (i, delta))}

        submitted = await self._submit(item, [callbacks(i) for i in range(n)])
        if "error" in submitted:
            yield submitted
            return
        sent_chars, sent_tokens, open_answers = [0] * n, [0] * n, n
        try:
            yield {"start": True, "version": submitted["bundle"].version,
                   "prompt_tokens": submitted["requests"][0].prompt_tokens}
            while open_answers:
                pending = [await events.get()]
                while not events.empty():
                    pending.append(events.get_nowait())
                for out in _coalesced(pending):
                    if "error" in out:
                        yield out
                        return
                    i, event = out["index"], out["event"]
                    if out["final"]:
                        open_answers -= 1
                        yield {"index": i, "delta": event.text[sent_chars[i]:],
                               "logprobs": None if event.logprobs is None else event.logprobs[sent_tokens[i]:],
                               "finish_reason": event.finish_reason, "prompt_tokens": event.prompt_tokens,
                               "completion_tokens": event.completion_tokens}
                        continue
                    sent_chars[i] += len(event.text)
                    sent_tokens[i] = event.completion_tokens
                    yield {"index": i, "delta": event.text, "logprobs": event.logprobs, "finish_reason": None,
                           "completion_tokens": event.completion_tokens}
        finally:
            for req in submitted["requests"]:
                req.cancel()  # client gone or finished: the rows leave the batch at the next step

    async def _submit(self, item: dict[str, Any], callbacks: list[dict[str, Any]]) -> dict[str, Any]:
        """Prepare the request against the current bundle and hand its rows to that bundle's engine."""
        from llava.infer.engine import DecodeRequest, EngineClosed

        while True:
            if self.unavailable:
                return {"error": _error(503, f"{self.unavailable}; retry shortly", "model_reloading", param=None)}
            bundle = self.bundle
            prompt, encoded, error = await asyncio.to_thread(_prepare, bundle, item, self.cfg)
            if error is not None:
                return {"error": error}
            seed = item.get("seed")
            reqs = [DecodeRequest(prompt=prompt, encoded=encoded, max_new_tokens=item["max_new_tokens"],
                                  stops=item["stop"], temperature=item["temperature"], top_p=item["top_p"],
                                  seed=None if seed is None else seed + i, logit_bias=item.get("logit_bias"),
                                  min_tokens=item.get("min_tokens", 0), top_logprobs=item.get("top_logprobs"),
                                  json_object=item.get("json_object", False), **cb) for i, cb in enumerate(callbacks)]
            try:
                for req in reqs:
                    bundle.engine.submit(req)
            except EngineClosed:  # a reload swapped the model while this request was being prepared
                for req in reqs:
                    req.cancel()
                continue
            return {"requests": reqs, "bundle": bundle}


def _settle(fut: asyncio.Future, result: Any) -> None:
    if not fut.done():  # the awaiting caller may have been cancelled meanwhile
        fut.set_result(result)


def _coalesced(pending: list[tuple[int, Any]]) -> list[dict[str, Any]]:
    """The engine events that queued up while the stream's consumer was busy, as one event per
    answer: its text deltas joined, or only its final result when that came too (the result
    holds the whole text). A consumer that keeps up still gets every token as it comes; one that
    falls behind (many streams on a busy replica) sends fewer, larger chunks instead of paying the
    per-chunk cost of the proxy and the client once per token."""
    from llava.infer.engine import TextDelta

    merged: dict[int, Any] = {}
    for i, event in pending:
        if isinstance(event, BaseException):
            return [{"error": _failure(event)}]
        before = merged.get(i)
        if isinstance(event, TextDelta) and isinstance(before, TextDelta):
            logprobs = None if event.logprobs is None else (before.logprobs or []) + event.logprobs
            event = TextDelta(before.text + event.text, event.completion_tokens, logprobs)
        merged[i] = event
    return [{"index": i, "event": event, "final": not isinstance(event, TextDelta)} for i, event in merged.items()]
