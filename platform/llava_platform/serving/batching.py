"""Adaptive dynamic batching for the model replica.

Why not `@serve.batch` alone: a batch there closes when it holds `max_batch_size` requests or when
`batch_wait_timeout_s` has passed. With a large maximum (good at high concurrency), a handful of
clients can never fill a batch, so every batch pays the full timeout; with a small maximum, high
concurrency is capped. This batcher learns how many requests the replica has had in flight
recently (the peak over the last one to two windows) and closes a batch as soon as it holds that
many, so 8 clients get batches of 8 without waiting, and 32 clients batches of up to 32.

The estimate is a recent *peak*, not the current count: right after a batch returns, the replica
has almost nothing in flight while the clients' next requests are still on their way, and sizing
on that instantaneous count makes batches shrink to one. A lone request never waits longer than
`wait_s` after it arrived, and requests that queued up while the model was busy (they have already
waited) go straight into the next batch.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

RunBatch = Callable[[list[Any]], Awaitable[list[Any]]]


class AdaptiveBatcher:
    """Queue single items, run them in batches through `run` (one batch at a time), hand back each result."""

    def __init__(self, run: RunBatch, *, max_batch_size: int, wait_s: float, window_s: float = 1.0):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._run = run
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.window_s = window_s
        self._pending: deque[tuple[Any, asyncio.Future, float]] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._in_flight = 0
        self._peak_now = 0
        self._peak_prev = 0
        self._window_start = time.monotonic()
        self.batch_sizes: deque[int] = deque(maxlen=256)  # recent batch sizes, for metrics and tests

    # ------------------------------------------------------------------------------------ demand

    def _roll(self, now: float) -> None:
        if now - self._window_start >= self.window_s:
            # Two windows without traffic forget the old peak entirely.
            self._peak_prev = self._peak_now if now - self._window_start < 2 * self.window_s else 0
            self._peak_now = self._in_flight
            self._window_start = now

    def demand(self) -> int:
        """How many requests a batch should wait for: the recent peak of requests in flight."""
        self._roll(time.monotonic())
        return max(1, min(self.max_batch_size, max(self._peak_now, self._peak_prev)))

    # ------------------------------------------------------------------------------------ API

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._arrived is None:
            self._arrived = asyncio.Event()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._serve_forever())
        fut: asyncio.Future = loop.create_future()
        now = time.monotonic()
        self._in_flight += 1
        self._roll(now)
        self._peak_now = max(self._peak_now, self._in_flight)
        self._pending.append((item, fut, now))
        self._arrived.set()
        try:
            return await fut
        finally:
            self._in_flight -= 1

    # ------------------------------------------------------------------------------------ worker

    async def _wait_for_arrival(self, timeout: float | None) -> bool:
        assert self._arrived is not None
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _next_batch(self) -> list[tuple[Any, asyncio.Future, float]]:
        while not self._pending:
            await self._wait_for_arrival(None)
        target = self.demand()
        started = time.monotonic()
        while len(self._pending) < target:
            # Once half the expected batch is here, wait for the rest a full wait_s from now: requests
            # that queued while the previous batch ran would otherwise go at once, without the clients
            # that batch just answered, and batches would split into two half-size ones for good.
            # With less than half here, the rest is far away: the oldest request waits at most wait_s.
            base = started if 2 * len(self._pending) >= target else self._pending[0][2]
            remaining = base + self.wait_s - time.monotonic()
            if remaining <= 0 or not await self._wait_for_arrival(remaining):
                break
        batch = []
        while self._pending and len(batch) < self.max_batch_size:
            entry = self._pending.popleft()
            if not entry[1].done():  # the caller gave up (disconnect, cancellation) while queued
                batch.append(entry)
        return batch

    async def _serve_forever(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            try:
                results = await self._run([item for item, _, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} returned {len(results)} results")
            except Exception as err:  # every caller of this batch gets the error; the worker keeps going
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            for (_, fut, _), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(res)
