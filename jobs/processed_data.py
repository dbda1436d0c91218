"""Processed shards as training reads them: the manifest (which files, what they were made for)
and the resident index, from local disk or S3.

Training reads exactly the shard files the manifest lists, never "everything under shards/": a
stale or foreign file in the folder is not training data. The driver checks the manifest before
Ray starts; each worker loads the index (a few numpy arrays) and reads rows by position.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

from llava.train.sample_index import MANIFEST_FORMAT, read_index
from llava_platform import storage


class ProcessedDataError(ValueError):
    """Processed data that training cannot use; the message names the URI and what to do."""


def read_manifest(uri: str) -> dict[str, Any]:
    """The manifest of a completed pre-processing run (written last, only when the run passed)."""
    manifest_uri = storage.join(uri, "manifest.json")
    if not storage.exists(manifest_uri):
        raise ProcessedDataError(f"{uri}: no manifest.json; run `llavactl data preprocess` to completion first")
    manifest = json.loads(storage.read_text(manifest_uri))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ProcessedDataError(f"{uri}: manifest format {manifest.get('format')!r}, training reads "
                                 f"{MANIFEST_FORMAT!r} (with a sample index); re-run `llavactl data preprocess`")
    return manifest


def _filesystem(uri: str):
    return storage.pyarrow_filesystem(uri)[0]


def open_processed(uri: str, manifest: dict[str, Any] | None = None):
    """The position-addressed reader (`ProcessedShards`) over `uri`: index resident, rows read on demand."""
    from llava.train.loader import ProcessedShards

    manifest = manifest or read_manifest(uri)
    fs, index_path = storage.pyarrow_filesystem(storage.join(uri, manifest["index"]["path"]))
    with fs.open_input_file(index_path) as handle:
        index = read_index(handle)
    import pyarrow as pa

    pa.default_memory_pool().release_unused()  # Arrow keeps freed read buffers otherwise
    paths = [storage.pyarrow_filesystem(storage.join(uri, s["path"]))[1] for s in manifest["shards"]]
    if len(index) and int(index.location[:, 0].max()) >= len(paths):
        raise ProcessedDataError(f"{uri}: the index refers to shard {int(index.location[:, 0].max())} but the "
                                 f"manifest lists {len(paths)}")
    return ProcessedShards(index, paths, partial(_filesystem, uri))
