"""Samples read by position: a training worker keeps only its `SampleIndex` resident and reads
the rows of its own micro-batches when a step needs them, in a PyTorch `DataLoader` whose worker
processes read, decode images and collate ahead of the step (prefetch).

Two sources behind one `read(positions)`:
- `ProcessedShards`: the Parquet shards of `jobs.preprocess`, through any pyarrow filesystem
  (local disk or S3). Rows are fetched one row group at a time (the shards are written with small
  row groups for this), one read per distinct row group of the micro-batch.
- `EncodedRecords`: a LLaVA JSON/JSONL file tokenized once per worker into flat int32 arrays; its
  images are opened from `image_root` per sample, never kept.

The batch sampler (`RankSchedule`) yields exactly the micro-batches `micro_batches_for_rank` gives
this rank from the resume step on, so what a step trains on depends only on the step number.
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from llava.data.encode import SampleRejected, encode_record
from llava.data.images import ImageError, ImageMode, open_image, prepare_image
from llava.data.records import RecordError, image_list
from llava.train.dataset import Rejection, TrainSample, epoch_order, micro_batches_for_rank
from llava.train.packing import MicroBatch, build_micro_batch
from llava.train.sample_index import SampleIndex

SHARD_COLUMNS = ["id", "input_ids", "labels", "images"]


class ProcessedShards:
    """Rows of processed shards by position. Parquet handles are opened lazily in the process that
    reads (a DataLoader worker), never inherited across a fork: S3 clients are not fork-safe."""

    def __init__(self, index: SampleIndex, shard_paths: list[str], open_filesystem: Callable[[], Any],
                 max_open_files: int = 64):
        self.index = index
        self.shard_paths = list(shard_paths)
        self.open_filesystem = open_filesystem
        self.max_open_files = max_open_files
        self._pid: int | None = None
        self._fs: Any = None
        self._files: OrderedDict[int, Any] = OrderedDict()

    def _file(self, shard: int):
        import pyarrow.parquet as pq

        if self._pid != os.getpid():
            self._pid, self._fs, self._files = os.getpid(), self.open_filesystem(), OrderedDict()
        handle = self._files.get(shard)
        if handle is None:
            handle = pq.ParquetFile(self._fs.open_input_file(self.shard_paths[shard]))
            self._files[shard] = handle
            if len(self._files) > self.max_open_files:
                self._files.popitem(last=False)
        else:
            self._files.move_to_end(shard)
        return handle

    def read(self, positions: Sequence[int]) -> list[TrainSample]:
        loc = self.index.location[np.asarray(positions, dtype=np.int64)]
        groups: dict[tuple[int, int], list[int]] = {}
        for k, (shard, group, _) in enumerate(loc.tolist()):
            groups.setdefault((shard, group), []).append(k)
        out: list[TrainSample | None] = [None] * len(positions)
        for (shard, group), members in groups.items():
            table = self._file(shard).read_row_group(group, columns=SHARD_COLUMNS)
            for k in members:
                row = int(loc[k, 2])
                ids, labels, images = (table.column(c)[row] for c in ("input_ids", "labels", "images"))
                blobs = images.as_py() or []
                out[k] = TrainSample(str(table.column("id")[row]), ids.as_py(), labels.as_py(),
                                     [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs],
                                     "image" if blobs else "text")
        return out  # type: ignore[return-value]


class EncodedRecords:
    """A records file tokenized once: ids/labels resident as flat int32 arrays (8 bytes a token),
    image file names kept, images opened and prepared per sample when read."""

    def __init__(self, ids: list[str], tokens: np.ndarray, labels: np.ndarray, offsets: np.ndarray,
                 images: list[list[str]], index: SampleIndex, *, image_root: str | None, image_processor,
                 image_mode: ImageMode, max_pixels: int = 64_000_000):
        self.ids, self.tokens, self.labels, self.offsets, self.images = ids, tokens, labels, offsets, images
        self.index = index
        self.image_root = image_root
        self.image_processor = image_processor
        self.image_mode = image_mode
        self.max_pixels = max_pixels

    def _image(self, sample_id: str, name: str) -> Image.Image:
        path = Path(self.image_root) / name if self.image_root is not None else Path(name)
        try:
            return prepare_image(open_image(path, max_pixels=self.max_pixels), self.image_processor, self.image_mode)
        except ImageError as err:
            raise ImageError(f"sample {sample_id}: image {name}: {err}") from None

    def read(self, positions: Sequence[int]) -> list[TrainSample]:
        out = []
        for i in positions:
            a, b = self.offsets[i], self.offsets[i + 1]
            sid = self.ids[i]
            images = [self._image(sid, name) for name in self.images[i]]
            out.append(TrainSample(sid, self.tokens[a:b].tolist(), self.labels[a:b].tolist(), images,
                                   "image" if images else "text"))
        return out


def encode_records_index(records: list[dict], processor, template: str, *, max_length: int,
                         image_root: str | None, image_mode: ImageMode = "pad",
                         max_pixels: int = 64_000_000) -> tuple[EncodedRecords, list[Rejection]]:
    """Tokenize and validate every record without decoding images (a missing image file is still
    a reject); the images are opened when the sample is read."""
    ids: list[str] = []
    chunks_ids: list[np.ndarray] = []
    chunks_labels: list[np.ndarray] = []
    names: list[list[str]] = []
    modalities: list[str] = []
    rejected: list[Rejection] = []
    for rec in records:
        rid = str(rec.get("id", "?")) if isinstance(rec, dict) else "?"
        try:
            s = encode_record(rec, processor, template, max_length=max_length, image_mode=image_mode,
                              load_pixels=False)
            files = image_list(rec)
            for name in files:
                if not (Path(image_root) / name if image_root is not None else Path(name)).is_file():
                    raise SampleRejected(f"image_missing: {name}")
        except (SampleRejected, RecordError) as err:
            rejected.append(Rejection(rid, getattr(err, "reason", str(err))))
            continue
        ids.append(s.id)
        chunks_ids.append(np.asarray(s.input_ids, dtype=np.int32))
        chunks_labels.append(np.asarray(s.labels, dtype=np.int32))
        names.append(files)
        modalities.append(s.modality)
    lengths = np.array([len(c) for c in chunks_ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    empty = np.zeros(0, dtype=np.int32)
    tokens = np.concatenate(chunks_ids) if chunks_ids else empty
    labels = np.concatenate(chunks_labels) if chunks_labels else empty
    index = SampleIndex.build(lengths, modalities, [len(n) for n in names],
                              np.arange(len(ids), dtype=np.int32)[:, None])
    source = EncodedRecords(ids, tokens, labels, offsets, names, index, image_root=image_root,
                            image_processor=processor.image_processor, image_mode=image_mode, max_pixels=max_pixels)
    return source, rejected


class PositionalDataset(torch.utils.data.Dataset):
    """Map-style view of a source; the DataLoader hands it a whole micro-batch of positions at once
    (`__getitems__`), so a source can group its reads."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source.index)

    def __getitem__(self, position: int) -> TrainSample:
        return self.source.read([position])[0]

    def __getitems__(self, positions: list[int]) -> list[TrainSample]:
        return self.source.read(positions)


class RankSchedule(torch.utils.data.Sampler):
    """This rank's micro-batches (lists of positions) for steps `start` .. `total` - 1, in order;
    the epoch order is computed once per epoch from the index."""

    def __init__(self, index: SampleIndex, *, seed: int, group_by_modality_length: bool, global_batch: int,
                 micro_batch: int, rank: int, world_size: int, start: int, total: int, per_epoch: int):
        self.index = index
        self.seed = seed
        self.grouped = group_by_modality_length
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.rank, self.world_size = rank, world_size
        self.start, self.total, self.per_epoch = start, total, per_epoch

    def steps(self) -> Iterator[tuple[int, list[np.ndarray]]]:
        order_epoch, order = None, None
        for step in range(self.start, self.total):
            epoch, in_epoch = divmod(step, self.per_epoch)
            if epoch != order_epoch:
                order_epoch = epoch
                order = epoch_order(self.index, seed=self.seed, epoch=epoch, global_batch=self.global_batch,
                                    group_by_modality_length=self.grouped)
            yield step, micro_batches_for_rank(order, in_epoch, global_batch=self.global_batch,
                                               micro_batch=self.micro_batch, rank=self.rank,
                                               world_size=self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        for _, micros in self.steps():
            for micro in micros:
                yield micro.tolist()

    def __len__(self) -> int:
        per_step = self.global_batch // (self.micro_batch * self.world_size)
        return (self.total - self.start) * per_step


class CollateMicroBatch:
    """Samples -> (MicroBatch, sample ids): the loop's padded or packed micro-batch, built in the
    DataLoader worker so image normalisation and mask building overlap the step."""

    def __init__(self, **build_kwargs):
        self.build_kwargs = build_kwargs

    def __call__(self, samples: list[TrainSample]) -> tuple[MicroBatch, list[str]]:
        return build_micro_batch(samples, **self.build_kwargs), [s.id for s in samples]


def micro_batch_loader(source, schedule: RankSchedule, collate: CollateMicroBatch, *, workers: int,
                       prefetch: int) -> torch.utils.data.DataLoader:
    """The DataLoader over this rank's schedule. It gets its own generator: the default one would
    draw its base seed from torch's global RNG, shifting the training RNG stream on every resume."""
    return torch.utils.data.DataLoader(
        PositionalDataset(source), batch_sampler=schedule, collate_fn=collate, num_workers=workers,
        prefetch_factor=prefetch if workers else None, pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(0))
