"""In-worker training set: encoded samples with random access, so that the data position is an
integer and a resumed run sees exactly the batches an uninterrupted one would.

Sources: a LLaVA JSON/JSONL file + image folder (encoded here), or rows of the processed Parquet
shards (ids, labels, image bytes) that the pre-processing job wrote.
"""

from __future__ import annotations

import io
import random
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image

from llava.data.encode import EncodedSample, SampleRejected, encode_record


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


def from_rows(rows: list[dict]) -> list[TrainSample]:
    """Rows of the processed Parquet shards (see docs/data-formats.md)."""
    return [TrainSample(str(r["id"]), list(r["input_ids"]), list(r["labels"]), list(r.get("images") or []),
                        r.get("modality") or ("image" if r.get("images") else "text")) for r in rows]


def reject_summary(rejected: list[Rejection]) -> dict[str, int]:
    return dict(Counter(r.reason.split(":", 1)[0] for r in rejected))


def _chunks(seq: list[int], size: int) -> list[list[int]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def epoch_order(samples: list[TrainSample], *, seed: int, epoch: int, global_batch: int,
                group_by_modality_length: bool) -> list[int]:
    """Sample order for one epoch, identical on every rank (same seed).

    Grouping (as the reference's modality-length sampler): image and text samples are never mixed
    in a global batch, and each global batch holds samples of similar length, so padding stays low.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    idx = list(range(len(samples)))
    rng.shuffle(idx)
    if not group_by_modality_length:
        return idx
    batches: list[list[int]] = []
    for modality in sorted({s.modality for s in samples}):
        group = [i for i in idx if samples[i].modality == modality]
        # Megabatches of several global batches, sorted by length inside, then cut into batches.
        for mega in _chunks(group, global_batch * 8):
            mega.sort(key=lambda i: samples[i].length, reverse=True)
            batches.extend(_chunks(mega, global_batch))
    full = [b for b in batches if len(b) == global_batch]
    partial = [i for b in batches if len(b) != global_batch for i in b]
    rng.shuffle(full)
    return [i for b in full for i in b] + partial


def micro_batches_for_rank(order: list[int], step: int, *, global_batch: int, micro_batch: int,
                           rank: int, world_size: int) -> list[list[int]]:
    """The micro-batches rank `rank` runs at optimizer step `step` (0-based within the epoch)."""
    chunk = order[step * global_batch : (step + 1) * global_batch]
    if len(chunk) < global_batch:  # wrap so every step sees a full global batch
        chunk = chunk + order[: global_batch - len(chunk)]
    micros = _chunks(chunk, micro_batch)
    return micros[rank::world_size]
