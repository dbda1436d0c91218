"""The replica's model runtime in-process (no cluster): concurrent good and bad requests, a reload
while a stream is running, and the alias/content watch that hot-swaps the model."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import time
import weakref

import pytest
from PIL import Image

from llava_platform.serving.model import ModelRuntime


def _item(text: str, max_new_tokens: int = 6, **extra) -> dict:
    msgs = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (40, 30), (9, 99, 199))},
                                         {"type": "text", "text": text}]}]
    return {"messages": msgs, "max_new_tokens": max_new_tokens, "temperature": 0.0, "top_p": 1.0, "stop": [],
            "seed": None, "n": 1, "top_logprobs": None, "logit_bias": None, "min_tokens": 0} | extra


@pytest.fixture()
def replica_cls():
    return ModelRuntime


def test_concurrent_requests_share_steps_and_a_bad_one_fails_alone(replica_cls, tiny_llava_dir):
    items = [
        _item("what colour", max_new_tokens=12),
        _item("red " * 1100),  # over the tiny model's 1024-token context
        _item("how many", temperature=0.8, seed=3),
        _item("how many", max_new_tokens=2),
    ]

    async def scenario():
        rep = replica_cls({"model_uri": str(tiny_llava_dir)})
        try:
            return await asyncio.gather(*(rep.generate(i) for i in items))
        finally:
            rep.bundle.engine.close()

    good, bad, sampled, short = asyncio.run(scenario())
    assert bad["error"]["code"] == "context_length_exceeded" and bad["error"]["status"] == 400
    for out in (good, sampled, short):
        assert out["results"][0]["finish_reason"] in ("stop", "length")
    assert short["results"][0]["completion_tokens"] <= 2
    # Greedy and sampled rows decode in the same steps (per-row sampling in the engine).
    assert good["batch_size"] > 1 and sampled["batch_size"] > 1


def test_reload_mid_request_finishes_on_the_old_model(replica_cls, tiny_llava_dir):
    async def scenario():
        rep = replica_cls({"model_uri": str(tiny_llava_dir)})
        old_engine = rep.bundle.engine
        stream = rep.stream(_item("describe it", max_new_tokens=120))
        start = await stream.__anext__()
        first_delta = await stream.__anext__()
        swapped = await rep.reload(None, force=True)
        rest = [ev async for ev in stream]
        after = await rep.generate(_item("what colour"))
        rep.bundle.engine.close()
        old_engine.close(timeout=30)
        return start, first_delta, swapped, rest, after, old_engine

    start, first_delta, swapped, rest, after, old_engine = asyncio.run(scenario())
    assert swapped["changed"] and swapped["previous"] == start["version"]
    assert "delta" in first_delta and rest[-1]["finish_reason"] in ("stop", "length")
    assert not any("error" in ev for ev in rest)
    assert "results" in after
    assert old_engine.load == 0


def test_a_stream_that_falls_behind_gets_fewer_larger_chunks_with_the_same_text(replica_cls, tiny_llava_dir):
    """While the consumer is busy the engine's deltas queue up; the next read sends them as one
    chunk per answer, and the chunks still add up to the non-streamed answer, logprobs included."""
    item = _item("describe it", max_new_tokens=24, min_tokens=24, top_logprobs=1)

    async def scenario():
        rep = replica_cls({"model_uri": str(tiny_llava_dir)})
        try:
            whole = await rep.generate(item)
            prompt_only = rep.stream(item)
            await prompt_only.__anext__()
            keeping_up = [ev async for ev in prompt_only]
            behind = rep.stream(item)
            await behind.__anext__()
            deadline = time.monotonic() + 60
            while rep.bundle.engine.load and time.monotonic() < deadline:  # decoded while nobody reads
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.05)  # the answered callbacks reach the stream's queue
            late = [ev async for ev in behind]
            return whole["results"][0], keeping_up, late
        finally:
            rep.bundle.engine.close()

    whole, keeping_up, late = asyncio.run(scenario())
    assert whole["completion_tokens"] == 24
    for events in (keeping_up, late):
        assert "".join(ev["delta"] for ev in events) == whole["text"]
        assert [lp for ev in events for lp in (ev["logprobs"] or [])] == whole["logprobs"]
        assert events[-1]["finish_reason"] == "length" and events[-1]["completion_tokens"] == 24
    assert len(late) <= 2  # without coalescing: one event per token, 24


def test_watch_swaps_when_the_model_content_changes(replica_cls, tiny_llava_dir, tmp_path):
    model_dir = tmp_path / "served"
    shutil.copytree(tiny_llava_dir, model_dir)

    async def scenario():
        rep = replica_cls({"model_uri": str(model_dir), "model": {"watch_interval_s": 0.01}})
        first = rep.info()["version"]
        await asyncio.sleep(0.02)
        await rep.check_health()  # nothing changed: the watch runs and keeps the model
        await asyncio.sleep(0.5)
        unchanged = rep.info()["version"]
        stamp = time.time() + 5
        os.utime(model_dir / "config.json", (stamp, stamp))  # a new model written in place
        await asyncio.sleep(0.02)
        await rep.check_health()
        for _ in range(100):
            if rep.info()["version"] != first:
                break
            await asyncio.sleep(0.1)
        return first, unchanged, rep.info()["version"]

    first, unchanged, swapped = asyncio.run(scenario())
    assert unchanged == first
    assert swapped != first


def test_unload_first_reload_refuses_briefly_then_serves_the_new_model(replica_cls, tiny_llava_dir, tmp_path):
    """unload_first: requests in flight finish on the old model, requests during the load get a
    503 (never a hang), and afterwards the new model answers."""
    new_dir = tmp_path / "v2"
    shutil.copytree(tiny_llava_dir, new_dir)

    async def scenario():
        rep = replica_cls({"model_uri": str(tiny_llava_dir), "model": {"reload_policy": "unload_first"}})
        first = rep.info()["version"]
        old_model = weakref.ref(rep.bundle.model)
        in_flight = asyncio.create_task(rep.generate(_item("describe it", max_new_tokens=40)))
        while not rep.bundle.engine.load:  # the request is in the engine before the reload starts
            await asyncio.sleep(0.001)
        reload = asyncio.create_task(rep.reload(str(new_dir)))
        while not rep.unavailable:
            await asyncio.sleep(0.001)
        during = await rep.generate(_item("what colour"))
        swapped = await reload
        gc.collect()
        freed = old_model() is None  # nothing kept the old weights alive past the unload
        after = await rep.generate(_item("what colour"))
        rep.bundle.engine.close()
        return first, await in_flight, during, swapped, after, freed

    first, in_flight, during, swapped, after, freed = asyncio.run(scenario())
    assert freed
    assert "results" in in_flight
    assert during["error"]["status"] == 503
    assert swapped["changed"] and swapped["version"] != first
    assert "results" in after


def test_model_cache_keeps_the_newest_versions_and_those_in_use(tmp_path):
    from llava_platform.model_uri import COMPLETE_MARKER
    from llava_platform.serving.model_cache import prune

    entries = []
    for i in range(5):
        entry = tmp_path / "models" / "m" / f"v{i}"
        entry.mkdir(parents=True)
        (entry / COMPLETE_MARKER).write_text("{}")
        os.utime(entry / COMPLETE_MARKER, ns=(i * 10**9, i * 10**9))
        entries.append(entry)
    (tmp_path / "models" / "m" / ".partial-x").mkdir()  # a download in progress is not an entry
    removed = prune(tmp_path, keep=2, in_use=[entries[0]])
    assert sorted(removed) == [entries[1], entries[2]]
    assert all(e.is_dir() for e in (entries[0], entries[3], entries[4]))
    assert (tmp_path / "models" / "m" / ".partial-x").is_dir()


def test_request_images_are_prepared_as_the_model_was_trained(tiny_llava_dir, tmp_path):
    """The model's metadata record decides pad or resize (a config value overrides it): a wide
    image reaches the tower resized for a model trained on resized images, padded otherwise."""
    import torch
    from transformers import AutoProcessor

    from llava.data.images import prepare_image
    from llava.model.metadata import describe_model, write_metadata
    from llava_platform.serving.config import ServeConfig
    from llava_platform.serving.model import _prepare, load_model

    model_dir = tmp_path / "resized-model"
    shutil.copytree(tiny_llava_dir, model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    write_metadata(model_dir, describe_model(processor, template="vicuna_v1", image_mode="resize"))
    wide = Image.new("RGB", (90, 30), (200, 30, 30))
    item = _item("what colour")
    item["messages"][0]["content"][0]["image"] = wide

    def pixels_seen(cfg: ServeConfig):
        bundle = load_model(model_dir, cfg)
        try:
            _, encoded, error = _prepare(bundle, item, cfg)
            assert error is None
            return bundle.image_mode, encoded["pixel_values"]
        finally:
            bundle.engine.close()

    def pixels_of(mode: str):
        return processor.image_processor([prepare_image(wide, processor.image_processor, mode)],
                                         return_tensors="pt")["pixel_values"]

    mode, seen = pixels_seen(ServeConfig(model_uri=str(model_dir)))
    assert mode == "resize" and torch.equal(seen, pixels_of("resize"))
    assert not torch.equal(pixels_of("resize"), pixels_of("pad"))  # the two modes differ on this image
    mode, seen = pixels_seen(ServeConfig(model_uri=str(model_dir), image_mode="pad"))
    assert mode == "pad" and torch.equal(seen, pixels_of("pad"))
