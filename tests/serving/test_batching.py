"""AdaptiveBatcher: batch composition, ordering of results, errors and cancellation (no Ray needed)."""

from __future__ import annotations

import asyncio

import pytest

from llava_platform.serving.batching import AdaptiveBatcher


class Recorder:
    """A batch function that records each batch it saw and answers item -> item * 10."""

    def __init__(self, gate: asyncio.Event | None = None, fail_on: int | None = None):
        self.batches: list[list[int]] = []
        self.gate = gate
        self.fail_on = fail_on

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError("boom")
        return [i * 10 for i in items]


def test_concurrent_requests_share_one_batch_and_get_their_own_results():
    async def main():
        rec = Recorder()
        b = AdaptiveBatcher(rec, max_batch_size=32, wait_s=5.0)
        results = await asyncio.gather(*(b.submit(i) for i in range(8)))
        return rec, results

    rec, results = asyncio.run(main())
    assert results == [i * 10 for i in range(8)]
    assert rec.batches == [list(range(8))]


def test_batches_never_exceed_the_maximum():
    async def main():
        rec = Recorder()
        b = AdaptiveBatcher(rec, max_batch_size=4, wait_s=0.01)
        results = await asyncio.gather(*(b.submit(i) for i in range(10)))
        return rec, results

    rec, results = asyncio.run(main())
    assert results == [i * 10 for i in range(10)]
    assert max(len(x) for x in rec.batches) <= 4
    assert sorted(i for x in rec.batches for i in x) == list(range(10))


def test_batch_closes_at_the_recent_peak_without_waiting_for_the_maximum():
    """After 8 requests were in flight together, the next 8 form a batch at once even though the
    maximum is 32 and the timeout is far longer than the test is allowed to run."""

    async def main():
        rec = Recorder()
        b = AdaptiveBatcher(rec, max_batch_size=32, wait_s=3600.0)
        first = await asyncio.wait_for(asyncio.gather(*(b.submit(i) for i in range(8))), timeout=30)
        assert first == [i * 10 for i in range(8)] and b.demand() == 8
        second = await asyncio.wait_for(asyncio.gather(*(b.submit(i) for i in range(8, 16))), timeout=30)
        return rec, second

    rec, second = asyncio.run(main())
    assert second == [i * 10 for i in range(8, 16)]
    assert rec.batches[-1] == list(range(8, 16))


def test_a_failing_batch_fails_its_callers_and_the_batcher_keeps_serving():
    async def main():
        rec = Recorder(fail_on=3)
        b = AdaptiveBatcher(rec, max_batch_size=8, wait_s=0.0)
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit(3)
        return await b.submit(4)

    assert asyncio.run(main()) == 40


def test_a_cancelled_caller_is_dropped_from_the_queue():
    async def main():
        gate = asyncio.Event()
        rec = Recorder(gate=gate)
        b = AdaptiveBatcher(rec, max_batch_size=8, wait_s=0.0)
        running = asyncio.ensure_future(b.submit(1))  # occupies the worker until the gate opens
        await asyncio.sleep(0.01)
        doomed = asyncio.ensure_future(b.submit(2))
        kept = asyncio.ensure_future(b.submit(3))
        await asyncio.sleep(0.01)
        doomed.cancel()
        gate.set()
        return rec, await running, await kept

    rec, first, kept = asyncio.run(main())
    assert (first, kept) == (10, 30)
    assert [2] not in rec.batches and all(2 not in x for x in rec.batches)


def test_rejects_a_zero_batch_size():
    with pytest.raises(ValueError, match="max_batch_size"):
        AdaptiveBatcher(Recorder(), max_batch_size=0, wait_s=0.01)
