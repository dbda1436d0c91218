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


def read_index(source) -> SampleIndex:
    """The resident index of processed shards from `index.parquet` (a path or an open file). Ids
    are not kept (the rows carry them; the order needs only lengths and modalities). Columns are
    read one at a time into their final arrays, so the peak stays near the resident size."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(source)
    missing = [name for name in INDEX_SCHEMA.names[1:] if name not in parquet.schema_arrow.names]
    if missing:
        raise ValueError(f"index lacks column(s) {missing}; re-run pre-processing")

    def column(name: str) -> pa.Array:
        return parquet.read(columns=[name]).column(0).combine_chunks()

    location = np.empty((parquet.metadata.num_rows, 3), dtype=np.int32)
    for k, name in enumerate(("shard", "row_group", "row")):
        location[:, k] = column(name).to_numpy()
    modality = column("modality").dictionary_encode()
    names = [str(n) for n in modality.dictionary.to_pylist()]
    order = sorted(range(len(names)), key=lambda k: names[k])
    remap = np.empty(len(names), dtype=np.uint8)
    remap[order] = np.arange(len(names), dtype=np.uint8)
    codes = remap[modality.indices.to_numpy()]
    del modality
    return SampleIndex(column("length").to_numpy().astype(np.int32, copy=False), codes,
                       tuple(names[k] for k in order), column("n_images").to_numpy().astype(np.int16, copy=False),
                       location)
