"""The model side of a serving replica: holds the weights, runs continuous batching, streams, hot-swaps.

`ModelRuntime` lives inside the Serve replica (`serving.app.LlavaServer`) next to the HTTP API, so a
request costs no second actor hop. Requests arrive already validated, with images decoded. Each
request's prompt is rendered and encoded in a worker thread (overlapping the decode steps running
for others), checked against the context length, then handed to the model's engine
(`llava.infer.engine`): a thread that owns the model and runs decode steps, letting new requests
join the running batch at the next step and finished ones leave at once.

Reload: the new model and its engine are loaded next to the old ones, then a single attribute
assignment swaps the (model, processor, engine, version) bundle. The old engine finishes the
requests it holds and then stops, so requests in flight complete on the old model and none fail.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    from llava.infer.engine import make_engine
    from llava.infer.generate import context_length
    from llava.infer.load import load_for_inference

    model, processor = load_for_inference(str(model_dir), device=cfg.model.device, dtype=cfg.model.dtype)
    m = cfg.model
    engine = make_engine(model, processor, max_rows=m.max_batch_size, admit_wait_s=m.admit_wait_s,
                         compile_decode=m.compile_decode, image_mode=cfg.image_mode)
    return LoadedModel(model, processor, engine, str(model_dir), model_version(model_dir), context_length(model),
                       time.time())


def _error(status: int, message: str, code: str, param: str | None = "messages") -> dict[str, Any]:
    return {"status": status, "message": message, "param": param, "code": code}


def _prepare(bundle: LoadedModel, item: dict[str, Any], image_mode: str) -> tuple[Any, Any, dict[str, Any] | None]:
    """Render and encode the prompt: (prompt, encoded, None), or (None, None, error: OpenAI shape + status)."""
    from llava.infer.generate import PromptError, encode_prompts, render_prompt

    try:
        prompt = render_prompt(bundle.processor, item["messages"], image_mode=image_mode)
    except PromptError as err:
        return None, None, _error(400, str(err), "invalid_messages")
    encoded = encode_prompts(bundle.processor, [prompt])
    n_prompt = int(encoded["input_ids"].shape[1])
    if n_prompt + item["max_new_tokens"] > bundle.context_length:
        return None, None, _error(400, f"this model's maximum context length is {bundle.context_length} tokens; "
                                       f"the prompt has {n_prompt} tokens and max_tokens is {item['max_new_tokens']}",
                                  "context_length_exceeded")
    return prompt, encoded, None


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
            bundle = await asyncio.to_thread(load_model, model_dir, self.cfg)
            self.bundle, self.model_uri = bundle, uri  # the atomic swap; requests already submitted keep theirs
            # The old engine answers what it holds, then its thread ends and the old weights can go.
            asyncio.get_running_loop().create_task(asyncio.to_thread(previous.engine.close))
            log.info("switched model %s -> %s (%s)", previous.version, bundle.version, model_dir)
            return {"changed": True, "previous": previous.version, **self.info()}

    # ------------------------------------------------------------------------------------ generation

    async def generate(self, item: dict[str, Any]) -> dict[str, Any]:
        """One request -> {"result": ..., "version": ..., "batch_size", "compute_s"} or {"error": {...}}."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        submitted = await self._submit(item, on_done=lambda res: loop.call_soon_threadsafe(_settle, done, res))
        if "error" in submitted:
            return submitted
        req, bundle, started = submitted["request"], submitted["bundle"], time.perf_counter()
        try:
            res = await done
        finally:
            req.cancel()  # a no-op once answered; otherwise the caller went away and the row can leave
        if isinstance(res, BaseException):
            return {"error": _failure(res)}
        return {"result": res.__dict__, "version": bundle.version, "batch_size": req.rows_seen / max(req.steps, 1),
                "compute_s": time.perf_counter() - started}

    async def stream(self, item: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Events {"start"}, {"delta"} ... {"finish_reason", counts}; or a single {"error"} before any text."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        submitted = await self._submit(
            item,
            on_done=lambda res: loop.call_soon_threadsafe(events.put_nowait, res),
            on_text=lambda delta: loop.call_soon_threadsafe(events.put_nowait, delta),
        )
        if "error" in submitted:
            yield submitted
            return
        req = submitted["request"]
        try:
            yield {"start": True, "version": submitted["bundle"].version}
            while True:
                event = await events.get()
                if isinstance(event, str):
                    yield {"delta": event, "finish_reason": None, "prompt_tokens": 0, "completion_tokens": 0}
                elif isinstance(event, BaseException):
                    yield {"error": _failure(event)}
                    return
                else:
                    yield {"delta": "", "finish_reason": event.finish_reason, "prompt_tokens": event.prompt_tokens,
                           "completion_tokens": event.completion_tokens}
                    return
        finally:
            req.cancel()  # client gone or finished: the row leaves the batch at the next step

    async def _submit(self, item: dict[str, Any], **callbacks: Any) -> dict[str, Any]:
        """Prepare the request against the current bundle and hand it to that bundle's engine."""
        from llava.infer.engine import DecodeRequest, EngineClosed

        while True:
            bundle = self.bundle
            prompt, encoded, error = await asyncio.to_thread(_prepare, bundle, item, self.cfg.image_mode)
            if error is not None:
                return {"error": error}
            req = DecodeRequest(prompt=prompt, encoded=encoded, max_new_tokens=item["max_new_tokens"],
                                stops=item["stop"], temperature=item["temperature"], top_p=item["top_p"],
                                seed=item["seed"], **callbacks)
            try:
                bundle.engine.submit(req)
            except EngineClosed:  # a reload swapped the model while this request was being prepared
                continue
            return {"request": req, "bundle": bundle}


def _settle(fut: asyncio.Future, result: Any) -> None:
    if not fut.done():  # the awaiting caller may have been cancelled meanwhile
        fut.set_result(result)
