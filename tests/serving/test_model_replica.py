"""The model deployment's class run in-process (no cluster): batching with mixed good and bad rows,
and the alias/content watch that hot-swaps the model."""

from __future__ import annotations

import asyncio
import os
import shutil
import time

import pytest
from PIL import Image

from llava_platform.serving.model import LlavaModel


def _item(text: str, max_new_tokens: int = 6, **extra) -> dict:
    msgs = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (40, 30), (9, 99, 199))},
                                         {"type": "text", "text": text}]}]
    return {"messages": msgs, "max_new_tokens": max_new_tokens, "temperature": 0.0, "top_p": 1.0, "stop": [],
            "seed": None} | extra


@pytest.fixture()
def replica_cls():
    return LlavaModel.func_or_class  # the plain class under the Serve decorator


def test_batch_with_a_bad_row_answers_the_good_rows(replica_cls, tiny_llava_dir):
    # The batch body as @serve.batch calls it (the batching wrapper itself needs a Serve replica).
    rep = replica_cls({"model_uri": str(tiny_llava_dir)})
    items = [
        _item("what colour"),
        _item("red " * 1100),  # over the tiny model's 1024-token context
        _item("how many", temperature=0.8, seed=3),
        _item("how many", max_new_tokens=2),
    ]
    good1, bad, sampled, short = rep._run_batch(rep.bundle, items)
    assert bad["error"]["code"] == "context_length_exceeded" and bad["error"]["status"] == 400
    for out in (good1, sampled, short):
        assert out["result"]["finish_reason"] in ("stop", "length")
    assert short["result"]["completion_tokens"] <= 2
    # Greedy rows share one generate call; the seeded sampled row gets its own.
    assert good1["batch_size"] == 2 and sampled["batch_size"] == 1


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
