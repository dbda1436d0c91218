"""The model deployment: holds the weights, batches concurrent requests, streams, and hot-swaps models.

Requests arrive through a DeploymentHandle from the ingress, already validated and with images
decoded. Generation runs in a worker thread so the replica's event loop keeps answering health
checks and queueing requests into the next batch. One lock serialises compute on the replica: a
batch and a stream never fight for the same cores.

Reload: the new model is loaded next to the old one (outside the lock), then a single attribute
assignment swaps the (model, processor, version) bundle. A batch already running keeps the bundle
it started with, so requests in flight finish on the old model and none fail.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from llava_platform.serving.batching import AdaptiveBatcher
from llava_platform.serving.config import ServeConfig, parse_serve_config

log = logging.getLogger("llava.serving")


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    processor: Any
    model_dir: str
    version: str
    context_length: int
    image_tokens: int
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
    from llava.infer.generate import context_length
    from llava.infer.load import load_for_inference

    model, processor = load_for_inference(str(model_dir), device=cfg.model.device, dtype=cfg.model.dtype)
    return LoadedModel(model, processor, str(model_dir), model_version(model_dir), context_length(model),
                       int(getattr(model.config, "image_seq_length", 0) or 0), time.time())


def _check_request(bundle: LoadedModel, item: dict[str, Any], image_mode: str) -> tuple[Any, dict[str, Any] | None]:
    """Render and count the prompt: (prompt, None), or (None, error dict: OpenAI shape + status)."""
    from llava.infer.generate import PromptError, render_prompt

    try:
        prompt = render_prompt(bundle.processor, item["messages"], image_mode=image_mode)
    except PromptError as err:
        return None, {"status": 400, "message": str(err), "param": "messages", "code": "invalid_messages"}
    image_token = getattr(bundle.processor, "image_token", "<image>")
    # Text tokens plus each placeholder's expansion: cheaper than running the image processor twice.
    n_text = len(bundle.processor.tokenizer(prompt.text)["input_ids"])
    n_prompt = n_text + len(prompt.images) * max(bundle.image_tokens - 1, 0)
    if prompt.text.count(image_token) != len(prompt.images):
        return None, {"status": 400, "message": "image placeholder mismatch", "param": "messages",
                      "code": "invalid_messages"}
    if n_prompt + item["max_new_tokens"] > bundle.context_length:
        return None, {
            "status": 400,
            "message": (f"this model's maximum context length is {bundle.context_length} tokens; the prompt has "
                        f"{n_prompt} tokens and max_tokens is {item['max_new_tokens']}"),
            "param": "messages",
            "code": "context_length_exceeded",
        }
    return prompt, None


def _group_key(item: dict[str, Any]) -> tuple:
    # Rows of one generate call share sampling settings; greedy rows all batch together, and a
    # seeded request runs in its own group so its seed alone decides its sample.
    if item["temperature"] <= 0:
        return ("greedy",)
    return ("sample", item["temperature"], item["top_p"], item["seed"], id(item) if item["seed"] is not None else 0)


@serve.deployment(name="LlavaModel")
class LlavaModel:
    def __init__(self, args: dict[str, Any]):
        self.cfg = parse_serve_config(args)
        if self.cfg.model.torch_threads:
            import torch

            torch.set_num_threads(self.cfg.model.torch_threads)
        self.model_uri = self.cfg.model_uri
        self._compute = threading.Lock()
        self._reload_lock = asyncio.Lock()
        self._last_watch = time.monotonic()
        self.bundle = load_model(resolve_model(self.model_uri, self.cfg), self.cfg)
        self.batcher = AdaptiveBatcher(self._run_batch_async, max_batch_size=self.cfg.model.max_batch_size,
                                       wait_s=self.cfg.model.batch_wait_timeout_s)
        log.info("loaded model %s version %s", self.bundle.model_dir, self.bundle.version)

    # ------------------------------------------------------------------------------------ status

    def info(self) -> dict[str, Any]:
        b = self.bundle
        return {"model_uri": self.model_uri, "model_dir": b.model_dir, "version": b.version,
                "context_length": b.context_length, "loaded_at": b.loaded_at, "pid": os.getpid()}

    async def check_health(self) -> None:
        # Serve calls this periodically on every replica: a natural clock for the alias watch.
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
            previous = self.bundle.version
            model_dir = await asyncio.to_thread(resolve_model, uri, self.cfg)
            if not force and uri == self.model_uri and model_version(model_dir) == previous:
                return {"changed": False, "previous": previous, **self.info()}
            bundle = await asyncio.to_thread(load_model, model_dir, self.cfg)
            self.bundle, self.model_uri = bundle, uri  # the atomic swap; running batches keep theirs
            log.info("switched model %s -> %s (%s)", previous, bundle.version, model_dir)
            return {"changed": True, "previous": previous, **self.info()}

    # ------------------------------------------------------------------------------------ generation

    async def generate(self, item: dict[str, Any]) -> dict[str, Any]:
        """One request -> {"result": ..., "version": ...} or {"error": {...}}; batched with its neighbours."""
        return await self.batcher.submit(item)

    async def _run_batch_async(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        bundle = self.bundle  # taken before the thread hop: a reload during the batch does not affect it
        return await asyncio.to_thread(self._run_batch, bundle, items)

    def _run_batch(self, bundle: LoadedModel, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from llava.infer.generate import generate_batch

        out: list[dict[str, Any] | None] = [None] * len(items)
        prompts: list[Any] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            prompts[i], error = _check_request(bundle, item, self.cfg.image_mode)
            if error is not None:
                out[i] = {"error": error}
            else:
                groups.setdefault(_group_key(item), []).append(i)
        for rows in groups.values():
            first = items[rows[0]]
            reqs = [{"messages": items[i]["messages"], "max_new_tokens": items[i]["max_new_tokens"],
                     "stop": items[i]["stop"]} for i in rows]
            try:
                with self._compute:
                    started = time.perf_counter()
                    results = generate_batch(
                        bundle.model, bundle.processor, reqs, max_new_tokens=first["max_new_tokens"],
                        temperature=first["temperature"], top_p=first["top_p"], stop=None, seed=first["seed"],
                        image_mode=self.cfg.image_mode, prompts=[prompts[i] for i in rows],
                    )
            except Exception as err:  # one bad group must not fail the other rows of the batch
                log.exception("generation failed")
                for i in rows:
                    out[i] = {"error": {"status": 500, "message": f"generation failed: {type(err).__name__}",
                                        "param": None, "code": "generation_failed"}}
                continue
            for i, res in zip(rows, results, strict=True):
                out[i] = {"result": res.__dict__, "version": bundle.version, "batch_size": len(rows),
                          "compute_s": time.perf_counter() - started}
        return out  # type: ignore[return-value]

    async def stream(self, item: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Events {"delta"} ... {"finish_reason", counts}; or a single {"error"} before any text."""
        bundle = self.bundle
        _, error = await asyncio.to_thread(_check_request, bundle, item, self.cfg.image_mode)
        if error is not None:
            yield {"error": error}
            return
        yield {"start": True, "version": bundle.version}
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        worker = threading.Thread(target=self._stream_worker, args=(bundle, item, queue, loop, stop), daemon=True)
        worker.start()
        try:
            while True:
                event = await queue.get()
                if event is None:
                    break
                yield event
        finally:
            stop.set()  # client gone or finished: the worker closes the generator, which cancels generation

    def _stream_worker(self, bundle: LoadedModel, item: dict[str, Any], queue: asyncio.Queue,
                       loop: asyncio.AbstractEventLoop, stop: threading.Event) -> None:
        from llava.infer.generate import stream_generate

        def put(event: dict[str, Any] | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        try:
            with self._compute:
                events = stream_generate(
                    bundle.model, bundle.processor, {"messages": item["messages"]},
                    max_new_tokens=item["max_new_tokens"], temperature=item["temperature"], top_p=item["top_p"],
                    stop=item["stop"], seed=item["seed"], image_mode=self.cfg.image_mode,
                )
                try:
                    for ev in events:
                        if stop.is_set():
                            break
                        put({"delta": ev.delta, "finish_reason": ev.finish_reason,
                             "prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens})
                finally:
                    events.close()
        except Exception as err:
            log.exception("streaming generation failed")
            put({"error": {"status": 500, "message": f"generation failed: {type(err).__name__}", "param": None,
                           "code": "generation_failed"}})
        finally:
            put(None)
