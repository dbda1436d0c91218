"""What a training worker keeps resident about its data: a few numpy arrays per sample (length,
modality, number of images, where the sample lives), never the samples themselves.

At 1M samples the arrays take about 15 MB; token ids and images are read by position when a
micro-batch needs them (`llava.train.loader`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

# Processed shards with a sample index (v1 had none and was read whole by every worker).
MANIFEST_FORMAT = "llava-processed-shards/v2"

# The columns of `<processed>/index.parquet` (written by jobs.preprocess), in order.
INDEX_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("shard", pa.int32()),
    ("row_group", pa.int32()),
    ("row", pa.int32()),  # row inside its row group
    ("length", pa.int32()),
    ("modality", pa.string()),
    ("n_images", pa.int16()),
])


@dataclass(frozen=True)
class SampleIndex:
    """Sample i of the training set is described by element i of every array.

    `modality` holds codes into `modality_names`, which is sorted, so iterating codes in order is
    iterating modality names in sorted order (what the epoch order relies on). `location` is
    (n, k) int32: where the source finds sample i (shard, row group, row for processed shards; the
    record position for LLaVA JSON)."""

    lengths: np.ndarray
    modality: np.ndarray
    modality_names: tuple[str, ...]
    n_images: np.ndarray
    location: np.ndarray

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.lengths, self.modality, self.n_images, self.location))

    @classmethod
    def build(cls, lengths, modalities: list[str] | np.ndarray, n_images, location) -> SampleIndex:
        names, codes = np.unique(np.asarray(modalities, dtype=object).astype(str), return_inverse=True)
        return cls(np.asarray(lengths, dtype=np.int32), codes.astype(np.uint8), tuple(str(n) for n in names),
                   np.asarray(n_images, dtype=np.int16), np.asarray(location, dtype=np.int32))


def index_from_table(table: pa.Table) -> SampleIndex:
    """The resident index of processed shards from the index table (ids are not kept: rows carry them)."""
    missing = [name for name in INDEX_SCHEMA.names[1:] if name not in table.column_names]
    if missing:
        raise ValueError(f"index table lacks column(s) {missing}; re-run pre-processing")
    modality = table.column("modality").dictionary_encode().combine_chunks()
    names = [str(n) for n in modality.dictionary.to_pylist()]
    order = sorted(range(len(names)), key=lambda k: names[k])
    remap = np.empty(len(names), dtype=np.uint8)
    remap[order] = np.arange(len(names), dtype=np.uint8)
    codes = remap[modality.indices.to_numpy(zero_copy_only=False)]
    location = np.stack([table.column(c).to_numpy().astype(np.int32) for c in ("shard", "row_group", "row")], axis=1)
    return SampleIndex(table.column("length").to_numpy().astype(np.int32), codes,
                       tuple(names[k] for k in order), table.column("n_images").to_numpy().astype(np.int16),
                       location)
