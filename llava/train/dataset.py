"""The training order: which samples every optimizer step sees, computed from the resident
`SampleIndex` alone, so the data position is an integer and a resumed run (also on another world
size with the same global batch) sees exactly the batches an uninterrupted one would.

`TrainSample` is one sample as the loop consumes it (read by position by `llava.train.loader`);
`encode_records` encodes a whole records file in memory (benchmarks compare against it).
"""

from __future__ import annotations

import array
import io
import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from llava.data.encode import EncodedSample, SampleRejected, encode_record
from llava.train.sample_index import SampleIndex


@dataclass
class TrainSample:
    id: str
    input_ids: list[int]
    labels: list[int]
    images: list = field(default_factory=list)  # PIL images, or encoded bytes decoded on use
    modality: str = "text"

    @property
    def length(self) -> int:
        return len(self.input_ids)

    def decoded(self) -> TrainSample:
        """A copy whose images are PIL images (stored shards keep them encoded until used)."""
        images = [Image.open(io.BytesIO(i)).convert("RGB") if isinstance(i, bytes) else i for i in self.images]
        return TrainSample(self.id, self.input_ids, self.labels, images, self.modality)


@dataclass
class Rejection:
    id: str
    reason: str


def encode_records(records: list[dict], processor, template: str, *, max_length: int, image_root,
                   image_mode: str = "pad") -> tuple[list[TrainSample], list[Rejection]]:
    samples, rejected = [], []
    for rec in records:
        try:
            s: EncodedSample = encode_record(rec, processor, template, max_length=max_length,
                                             image_root=image_root, image_mode=image_mode)
        except SampleRejected as err:
            rejected.append(Rejection(str(rec.get("id", "?")) if isinstance(rec, dict) else "?", err.reason))
            continue
        samples.append(TrainSample(s.id, s.input_ids, s.labels, s.images, s.modality))
    return samples, rejected


def reject_summary(rejected: list[Rejection]) -> dict[str, int]:
    return dict(Counter(r.reason.split(":", 1)[0] for r in rejected))


def epoch_order(index: SampleIndex, *, seed: int, epoch: int, global_batch: int,
                group_by_modality_length: bool) -> np.ndarray:
    """Sample positions for one epoch, identical on every rank (same seed), as an int32 array.

    Grouping (as the reference's modality-length sampler): image and text samples are never mixed
    in a global batch, and each global batch holds samples of similar length, so padding stays low.

    The permutation is the one `random.Random.shuffle` gives a Python list (the shuffle only swaps
    items of whatever sequence it is handed, so an `array.array` gets the same swaps at 4 bytes per
    sample instead of ~40 for a list of ints); sorting is stable, as `list.sort(reverse=True)`.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    positions = array.array("i", range(len(index)))
    rng.shuffle(positions)
    idx = np.frombuffer(positions, dtype=np.int32)
    if not group_by_modality_length:
        return idx
    batches: list[np.ndarray] = []
    mega_size = global_batch * 8
    for code in range(len(index.modality_names)):
        group = idx[index.modality[idx] == code]
        # Megabatches of several global batches, sorted by length inside, then cut into batches.
        for start in range(0, len(group), mega_size):
            mega = group[start : start + mega_size]
            mega = mega[np.argsort(-index.lengths[mega].astype(np.int64), kind="stable")]
            batches.extend(mega[i : i + global_batch] for i in range(0, len(mega), global_batch))
    full = [b for b in batches if len(b) == global_batch]
    partial = [b for b in batches if len(b) != global_batch]
    rng.shuffle(full)
    return np.concatenate(full + partial) if batches else idx


class BatchTooLarge(ValueError):
    """The dataset cannot fill one global batch."""


def check_fits_global_batch(n_samples: int, global_batch: int) -> None:
    """A global batch holds distinct samples; a smaller dataset would leave ranks without data."""
    if n_samples < global_batch:
        raise BatchTooLarge(f"the dataset has {n_samples} samples, fewer than one global batch of {global_batch} "
                            f"(micro_batch x accumulation x workers); lower optim.global_batch or add data")


def micro_batches_for_rank(order: np.ndarray, step: int, *, global_batch: int, micro_batch: int,
                           rank: int, world_size: int) -> list[np.ndarray]:
    """The micro-batches rank `rank` runs at optimizer step `step` (0-based within the epoch).

    Every step takes a full global batch (the epoch's last one wraps to its start), cut into
    global_batch / micro_batch micro-batches dealt round-robin, so with a global batch that is a
    multiple of micro_batch x world_size (BatchPlan checks it) every rank runs the same number."""
    check_fits_global_batch(len(order), global_batch)
    chunk = order[step * global_batch : (step + 1) * global_batch]
    if len(chunk) < global_batch:
        chunk = np.concatenate([chunk, order[: global_batch - len(chunk)]])
    micros = [chunk[i : i + micro_batch] for i in range(0, global_batch, micro_batch)]
    return micros[rank::world_size]
