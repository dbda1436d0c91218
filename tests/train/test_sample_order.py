"""The epoch order computed from the resident index is the order the loop used before it (a list
of decoded samples), and every rank gets the same number of full micro-batches at every step."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pytest

from llava.train.dataset import BatchTooLarge, epoch_order, micro_batches_for_rank
from llava.train.deepspeed_config import BatchPlan
from llava.train.sample_index import SampleIndex


# -- the reference: the list-based order exactly as the loop computed it before the index -------
@dataclass
class _Sample:
    length: int
    modality: str


def _chunks(seq, size):
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def reference_epoch_order(samples, *, seed, epoch, global_batch, group_by_modality_length):
    rng = random.Random(seed * 1_000_003 + epoch)
    idx = list(range(len(samples)))
    rng.shuffle(idx)
    if not group_by_modality_length:
        return idx
    batches = []
    for modality in sorted({s.modality for s in samples}):
        group = [i for i in idx if samples[i].modality == modality]
        for mega in _chunks(group, global_batch * 8):
            mega.sort(key=lambda i: samples[i].length, reverse=True)
            batches.extend(_chunks(mega, global_batch))
    full = [b for b in batches if len(b) == global_batch]
    partial = [i for b in batches if len(b) != global_batch for i in b]
    rng.shuffle(full)
    return [i for b in full for i in b] + partial


def reference_micro_batches(order, step, *, global_batch, micro_batch, rank, world_size):
    chunk = order[step * global_batch : (step + 1) * global_batch]
    if len(chunk) < global_batch:
        chunk = chunk + order[: global_batch - len(chunk)]
    return _chunks(chunk, micro_batch)[rank::world_size]


def _dataset(n: int, seed: int) -> tuple[list[_Sample], SampleIndex]:
    rng = random.Random(seed)
    # few distinct lengths: many ties, so the stable-sort rule is exercised
    samples = [_Sample(rng.choice([40, 41, 60, 600, 601]), rng.choice(["image", "image", "text"])) for _ in range(n)]
    index = SampleIndex.build([s.length for s in samples], [s.modality for s in samples], [1] * n,
                              np.zeros((n, 1), dtype=np.int32))
    return samples, index


@pytest.mark.parametrize("n,grouped", [(1000, True), (1000, False), (333, True), (17, True)])
def test_per_step_sample_positions_match_the_list_based_order(n, grouped):
    samples, index = _dataset(n, seed=n)
    plan = BatchPlan(global_batch=16, micro_batch=2, world_size=2)
    per_epoch = -(-n // plan.global_batch)
    for epoch in range(2):
        ref = reference_epoch_order(samples, seed=7, epoch=epoch, global_batch=16, group_by_modality_length=grouped)
        got = epoch_order(index, seed=7, epoch=epoch, global_batch=16, group_by_modality_length=grouped)
        assert got.tolist() == ref
        for step in range(per_epoch):
            for rank in range(plan.world_size):
                want = reference_micro_batches(ref, step, global_batch=16, micro_batch=2, rank=rank, world_size=2)
                have = micro_batches_for_rank(got, step, global_batch=16, micro_batch=2, rank=rank, world_size=2)
                assert [m.tolist() for m in have] == want


@pytest.mark.parametrize("n", [16, 17, 31, 100])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_rank_runs_the_same_number_of_full_micro_batches(n, world_size):
    _, index = _dataset(n, seed=1)
    plan = BatchPlan(global_batch=16, micro_batch=2, world_size=world_size)
    order = epoch_order(index, seed=0, epoch=0, global_batch=16, group_by_modality_length=True)
    for step in range(-(-n // 16)):
        seen = []
        for rank in range(world_size):
            micros = micro_batches_for_rank(order, step, global_batch=16, micro_batch=2, rank=rank,
                                            world_size=world_size)
            assert len(micros) == plan.accumulation and all(len(m) == 2 for m in micros)
            seen += [i for m in micros for i in m.tolist()]
        assert len(set(seen)) == 16, "a global batch holds 16 distinct samples"


def test_dataset_smaller_than_a_global_batch_is_refused_with_the_sizes():
    _, index = _dataset(10, seed=2)
    order = epoch_order(index, seed=0, epoch=0, global_batch=16, group_by_modality_length=True)
    with pytest.raises(BatchTooLarge, match="10 samples, fewer than one global batch of 16"):
        micro_batches_for_rank(order, 0, global_batch=16, micro_batch=2, rank=1, world_size=2)
