"""Pre-processing with Ray Data: LLaVA records + images -> tokenized Parquet shards, a sample index
and a manifest.

    python -m jobs.preprocess --config jobs/configs/preprocess_stage2.yaml input=s3://b/data.jsonl output=s3://b/out

Input (local or s3://, see docs/data-formats.md): LLaVA JSON list / JSONL files with image files
under `image_root`, or Parquet with the image bytes inline; a file, a list of files, or a
folder/prefix of them (name order). Every record is validated and encoded by
`llava.data.encode.encode_record` in Ray tasks; images are decoded, checked (corrupt, truncated,
empty, mode, pixel limit), padded and resized once and stored as JPEG (or PNG). The driver consumes
the stream in order and writes fixed-size shards in small row groups, so memory stays bounded by
one shard (plus the compact index) whatever the dataset size, and re-running writes byte-identical
output under the same names (stale shards from a larger earlier run are removed):

    <output>/shards/shard-00000.parquet ...   id, input_ids, labels, images, num_images, length, modality
    <output>/index.parquet                    id, shard, row_group, row, length, modality, n_images (by id)
    <output>/rejects/rejects-00000.jsonl ...  {"id", "reason", "record"}
    <output>/manifest.json                    counts, shard files + sha256, index, dataset metadata,
                                              rejects by reason, config + digest

Training reads samples by position through the index (`jobs.processed_data`). The job fails
(exit 1, no manifest) when rejected / total exceeds `max_reject_fraction`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import re
import sys
import time
from collections import Counter
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from llava.data.templates import TemplateName
from llava.train.sample_index import INDEX_SCHEMA, MANIFEST_FORMAT
from llava_platform import storage
from llava_platform.config import ConfigError, StrictModel, config_digest, flatten, job_arguments, load_config

log = logging.getLogger("jobs.preprocess")
INDEX_FILE = "index.parquet"

SHARD_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("images", pa.list_(pa.binary())),
    ("num_images", pa.int32()),
    ("length", pa.int32()),
    ("modality", pa.string()),
])
# What the encoder actors return: a shard row plus the verdict, so one stream carries both.
RESULT_SCHEMA = pa.schema([*SHARD_SCHEMA, ("ok", pa.bool_()), ("reason", pa.string()), ("record", pa.string())])


class ImageRules(StrictModel):
    max_pixels: int = Field(64_000_000, ge=1)
    min_side: int = Field(1, ge=1)
    # Modes PIL can flatten to RGB faithfully; anything else is converted or rejected per `mode_policy`.
    allowed_modes: list[str] = Field(default_factory=lambda: ["RGB", "RGBA", "L", "LA", "P"])
    mode_policy: Literal["convert", "reject"] = "convert"
    image_mode: Literal["pad", "resize"] = "pad"
    # How prepared images are stored: JPEG is a few times smaller (benchmarks/README.md, Data at
    # scale); PNG keeps them lossless.
    store_format: Literal["jpeg", "png"] = "jpeg"
    jpeg_quality: int = Field(95, ge=1, le=100)


class MlflowSettings(StrictModel):
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI when set, else no logging
    experiment: str = "preprocess"


class PreprocessConfig(StrictModel):
    # A file, a list of files, or a folder/prefix of *.json / *.jsonl (or *.parquet) shards.
    input: str | list[str]
    output: str
    input_format: Literal["auto", "json", "jsonl", "parquet"] = "auto"
    image_root: str | None = None  # default: the directory holding the input file
    processor: str  # a saved llava-hf model/processor directory (local or s3://)
    template: TemplateName = "vicuna_v1"
    max_length: int = Field(2048, ge=8)
    rows_per_shard: int = Field(1000, ge=1)
    # Rows per Parquet row group: the unit a training worker reads to get one sample, so small.
    row_group_rows: int = Field(16, ge=1)
    rejects_per_file: int = Field(10000, ge=1)
    batch_size: int = Field(32, ge=1)
    num_workers: int = Field(2, ge=1)
    worker_cpus: float = Field(0.5, gt=0)  # per encoder task; below 1 so read tasks are not starved
    max_reject_fraction: float = Field(0.05, ge=0, le=1)
    images: ImageRules = Field(default_factory=ImageRules)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)


# -- worker side -------------------------------------------------------------------------------
def _reject_row(record_id: str, reason: str, original: Any) -> dict[str, Any]:
    return {"id": record_id, "input_ids": [], "labels": [], "images": [], "num_images": 0, "length": 0,
            "modality": "", "ok": False, "reason": reason, "record": json.dumps(original, ensure_ascii=False)}


class ImageRejected(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_image(data: bytes, rules: ImageRules) -> Any:
    """Bytes -> RGB PIL image, or ImageRejected with `image_<code>: detail`."""
    from PIL import Image

    from llava.data.images import ImageError, open_image

    if not data:
        raise ImageRejected("image_empty: 0 bytes")
    try:
        with Image.open(io.BytesIO(data)) as probe:  # header only: cheap mode and size checks
            mode, (width, height) = probe.mode, probe.size
    except Exception as err:  # PIL raises several types for unreadable headers
        raise ImageRejected(f"image_corrupt: {type(err).__name__}: {_stable(err)}") from None
    if mode not in rules.allowed_modes and rules.mode_policy == "reject":
        raise ImageRejected(f"image_mode: {mode} not in allowed modes {rules.allowed_modes}")
    if min(width, height) < rules.min_side:
        raise ImageRejected(f"image_empty: {width}x{height} below min_side {rules.min_side}")
    try:
        return open_image(data, max_pixels=rules.max_pixels)
    except ImageError as err:
        raise ImageRejected(f"image_{_stable(err)}") from None


def _stable(err: Exception) -> str:
    """Error text without object addresses, so a re-run writes byte-identical rejects."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", str(err))


# Processors loaded in this worker process, by URI. Ray reuses worker processes across tasks (and
# across jobs from the same driver), so tasks get actor-like warm state without pinning actors.
_PROCESSORS: dict[str, Any] = {}


def cached_processor(uri: str, filesystem: Any = None) -> Any:
    if uri not in _PROCESSORS:
        from transformers import AutoProcessor

        _PROCESSORS.clear()  # one at a time keeps a long-lived worker's memory bounded
        _PROCESSORS[uri] = AutoProcessor.from_pretrained(_local_processor(uri, filesystem))
    return _PROCESSORS[uri]


def encode_batch(batch: pa.Table, cfg_json: str, filesystem: Any, image_root: str | None,
                 processor_fs: Any = None) -> pa.Table:
    """Ray Data task: raw rows -> RESULT_SCHEMA rows (encoded sample or reject)."""
    return Encoder(cfg_json, filesystem, image_root, processor_fs)(batch)


class Encoder:
    """Encodes raw records with one processor, reading images through a pyarrow filesystem."""

    def __init__(self, cfg_json: str, filesystem: Any, image_root: str | None, processor_fs: Any = None):
        self.cfg = PreprocessConfig.model_validate_json(cfg_json)
        self.fs = filesystem
        self.image_root = image_root
        self.processor = cached_processor(self.cfg.processor, processor_fs)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self.encode_one(row) for row in batch.to_pylist()]
        return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)

    def read_image(self, name: str) -> bytes:
        if self.image_root is None:
            raise ImageRejected(f"image_missing: {name} (no image_root for this input)")
        if name.startswith("/") or ".." in name.split("/"):
            raise ImageRejected(f"image_path: {name!r} escapes the image root")
        path = posixpath.join(self.image_root, name)
        try:
            with self.fs.open_input_file(path) as handle:
                return handle.readall()
        except FileNotFoundError:
            raise ImageRejected(f"image_missing: {name}") from None
        except OSError as err:
            if "not found" in str(err).lower() or "does not exist" in str(err).lower():
                raise ImageRejected(f"image_missing: {name}") from None
            raise

    def encode_one(self, row: dict[str, Any]) -> dict[str, Any]:
        from llava.data.encode import SampleRejected, encode_record
        from llava.data.records import RecordError, image_list

        record, inline, error = parse_raw(row)
        rid = str(record.get("id", row.get("fallback_id"))) if isinstance(record, dict) else str(row["fallback_id"])
        if error:
            return _reject_row(rid, error, record)
        try:
            names = image_list(record)
            blobs = inline if inline is not None else [self.read_image(n) for n in names]
            images = [decode_image(b, self.cfg.images) for b in blobs]
            sample = encode_record(record, self.processor, self.cfg.template, max_length=self.cfg.max_length,
                                   images=images, image_mode=self.cfg.images.image_mode,
                                   max_pixels=self.cfg.images.max_pixels)
        except (ImageRejected, SampleRejected) as err:
            return _reject_row(rid, err.reason, _without_bytes(record, inline))
        except RecordError as err:
            return _reject_row(rid, str(err), _without_bytes(record, inline))
        stored = [encode_stored_image(img, self.cfg.images) for img in sample.images]
        return {"id": sample.id, "input_ids": sample.input_ids, "labels": sample.labels, "images": stored,
                "num_images": len(stored), "length": len(sample.input_ids), "modality": sample.modality,
                "ok": True, "reason": "", "record": ""}


def encode_stored_image(img: Any, rules: ImageRules) -> bytes:
    buf = io.BytesIO()
    if rules.store_format == "jpeg":
        img.save(buf, format="JPEG", quality=rules.jpeg_quality)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def parse_raw(row: dict[str, Any]) -> tuple[Any, list[bytes] | None, str | None]:
    """A stream row -> (record, inline image bytes or None, error reason or None)."""
    if "raw" in row:
        try:
            record = json.loads(row["raw"])
        except json.JSONDecodeError as err:
            return row["raw"], None, f"bad_json: {err.msg} at char {err.pos}"
        if not isinstance(record, dict):
            return record, None, f"schema: record is {type(record).__name__}, expected an object"
        return record, None, None
    record = {k: v for k, v in row.items() if k not in ("images", "image_bytes", "fallback_id")}
    conversations = record.get("conversations")
    if isinstance(conversations, str):
        try:
            record["conversations"] = json.loads(conversations)
        except json.JSONDecodeError as err:
            return record, None, f"bad_json: conversations: {err.msg}"
    inline = row.get("images")
    if inline is None and row.get("image_bytes") is not None:
        inline = [row["image_bytes"]]
    inline = list(inline or [])
    if record.get("image") is None and inline:
        record["image"] = [f"<inline:{i}>" for i in range(len(inline))]
    return record, inline, None


def _without_bytes(record: Any, inline: list[bytes] | None) -> Any:
    if inline is None or not isinstance(record, dict):
        return record
    return {**record, "image_bytes_lengths": [len(b) for b in inline]}


def _local_processor(uri: str, filesystem: Any = None) -> str:
    """A local directory for the processor: copies an s3:// one once per process, through the
    pyarrow filesystem the driver built (it carries the endpoint and credentials, so workers need
    no AWS variables of their own)."""
    if not storage.is_s3(uri):
        return uri
    import tempfile

    import pyarrow.fs as pafs

    fs, root = filesystem, storage.split_s3(uri)[0] + "/" + storage.split_s3(uri)[1].rstrip("/")
    if fs is None:
        fs, root = storage.pyarrow_filesystem(uri)
    target = tempfile.mkdtemp(prefix="llava-processor-")
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        dest = os.path.join(target, os.path.relpath(info.path, root))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with fs.open_input_stream(info.path) as src, open(dest, "wb") as out:
            out.write(src.readall())
    return target


# -- driver side -------------------------------------------------------------------------------
FORMAT_BY_SUFFIX = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


def _suffix_format(uri: str) -> str | None:
    name = uri.rstrip("/").lower()
    return next((fmt for suffix, fmt in FORMAT_BY_SUFFIX.items() if name.endswith(suffix)), None)


def input_files(cfg: PreprocessConfig) -> list[tuple[str, str]]:
    """(URI, format) of every input file, in a deterministic order: a list in the order given, a
    folder/prefix expanded to its *.json / *.jsonl / *.parquet files sorted by name. A file's format
    is `input_format`, or its suffix under `auto` (Parquet when it has none)."""
    entries = [cfg.input] if isinstance(cfg.input, str) else list(cfg.input)
    if not entries:
        raise ConfigError("input: the list of input files is empty")
    files: list[tuple[str, str]] = []
    for entry in entries:
        listed = storage.list_files(entry)
        single = not listed if storage.is_s3(entry) else not storage.local_path(entry).is_dir()
        if single:  # a file or object
            if not storage.exists(entry):
                raise ConfigError(f"input: {entry} does not exist")
            fmt = cfg.input_format if cfg.input_format != "auto" else (_suffix_format(entry) or "parquet")
            files.append((entry, fmt))
            continue
        shards = [u for u in listed if _suffix_format(u)]
        if not shards:
            raise ConfigError(f"input: {entry} holds no *.json, *.jsonl or *.parquet files")
        files += [(u, cfg.input_format if cfg.input_format != "auto" else _suffix_format(u)) for u in shards]
    kinds = {"parquet" if fmt == "parquet" else "records" for _, fmt in files}
    if len(kinds) > 1:
        raise ConfigError("input: mixes Parquet and JSON/JSONL files; pre-process them separately")
    if len({storage.is_s3(u) for u, _ in files}) > 1:
        raise ConfigError("input: mixes local files and s3:// objects")
    return files


def _common_dir(uris: list[str]) -> str:
    """The deepest folder holding every input file (their images resolve from it by default)."""
    scheme = storage.S3_SCHEME if storage.is_s3(uris[0]) else ""
    paths = [u[len(scheme):] if scheme else str(storage.local_path(u).absolute()) for u in uris]
    return scheme + posixpath.commonpath([posixpath.dirname(p.rstrip("/")) for p in paths])


def build_dataset(cfg: PreprocessConfig) -> tuple[Any, Any, str | None]:
    """(ray dataset of raw rows, pyarrow filesystem, image root path inside it)."""
    import ray.data

    files = input_files(cfg)
    uris = [u for u, _ in files]
    fs = storage.pyarrow_filesystem(uris[0])[0]
    paths = [storage.pyarrow_filesystem(u)[1] for u in uris]
    root_uri = cfg.image_root if cfg.image_root is not None else _common_dir(uris)
    image_fs, image_root = storage.pyarrow_filesystem(root_uri)
    formats = {fmt for _, fmt in files}
    if formats == {"parquet"}:
        ds = ray.data.read_parquet(paths, filesystem=fs)
        ds = ds.map_batches(_parquet_rows, batch_format="pyarrow")
        image_root = None if cfg.image_root is None else image_root
    elif formats == {"jsonl"}:  # streamed: no file is read on the driver
        ds = ray.data.read_text(paths, filesystem=fs, drop_empty_lines=True)
        ds = ds.map_batches(_jsonl_rows, batch_format="pyarrow")
    else:  # JSON lists are parsed on the driver (their records, not images, must fit in memory)
        items = _driver_items(files)
        blocks = max(1, min(-(-len(items) // (cfg.batch_size * 2)), 256))  # enough blocks to feed every actor
        ds = ray.data.from_items(items, override_num_blocks=blocks)
    return ds, image_fs, image_root


def _driver_items(files: list[tuple[str, str]]) -> list[dict[str, str]]:
    items = []
    for uri, fmt in files:
        text = storage.read_text(uri)
        # Fallback ids for records without one name the file when there are several.
        prefix = f"{uri.rsplit('/', 1)[-1]}:" if len(files) > 1 else ""
        if fmt == "json":
            records = json.loads(text)
            if not isinstance(records, list):
                raise ConfigError(f"{uri}: a JSON input must hold a list of records")
            items += [{"raw": json.dumps(r, ensure_ascii=False), "fallback_id": f"{prefix}index-{i}"}
                      for i, r in enumerate(records)]
        else:
            lines = [line for line in text.splitlines() if line.strip()]
            items += _jsonl_rows(pa.table({"text": lines})).to_pylist()
    return items


def _jsonl_rows(batch: pa.Table) -> pa.Table:
    texts = batch.column("text").to_pylist()
    ids = []
    for text in texts:  # a readable fallback id for lines that do not parse
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        ids.append(f"line-{digest}")
    return pa.table({"raw": texts, "fallback_id": ids})


def _parquet_rows(batch: pa.Table) -> pa.Table:
    if "id" not in batch.column_names:
        raise ValueError("Parquet input needs an 'id' column")
    return batch.append_column("fallback_id", batch.column("id").cast(pa.string()))


class ShardWriter:
    """Writes rows in order into fixed-size Parquet shards with deterministic names, in row groups
    of `row_group_rows`, and keeps the index entry of every row (a few columns, Arrow-compact)."""

    def __init__(self, output: str, rows_per_shard: int, row_group_rows: int = 16):
        self.output = output
        self.rows_per_shard = rows_per_shard
        self.row_group_rows = row_group_rows
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.shards: list[dict[str, Any]] = []
        self.index_parts: list[pa.Table] = []

    def add(self, table: pa.Table) -> None:
        while table.num_rows:
            take = min(self.rows_per_shard - self.buffered, table.num_rows)
            self.buffer.append(table.slice(0, take))
            self.buffered += take
            table = table.slice(take)
            if self.buffered == self.rows_per_shard:
                self.flush()

    def flush(self) -> None:
        if not self.buffered:
            return
        table = pa.concat_tables(self.buffer).combine_chunks()
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", row_group_size=self.row_group_rows)
        data = sink.getvalue().to_pybytes()
        self.index_parts.append(self._index_part(table, len(self.shards)))
        name = f"shards/shard-{len(self.shards):05d}.parquet"
        storage.write_bytes(storage.join(self.output, name), data)
        modality = Counter(table.column("modality").to_pylist())
        self.shards.append({"path": name, "rows": table.num_rows, "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest(),
                            "tokens": int(pc.sum(table.column("length")).as_py() or 0),
                            "modality": dict(sorted(modality.items()))})
        self.buffer, self.buffered = [], 0

    def _index_part(self, table: pa.Table, shard: int) -> pa.Table:
        rows = np.arange(table.num_rows, dtype=np.int32)
        return pa.table({
            "id": table.column("id"),
            "shard": pa.array(np.full(table.num_rows, shard, dtype=np.int32)),
            "row_group": pa.array(rows // self.row_group_rows),
            "row": pa.array(rows % self.row_group_rows),
            "length": table.column("length"),
            "modality": table.column("modality"),
            "n_images": table.column("num_images").cast(pa.int16()),
        }, schema=INDEX_SCHEMA)

    def write_index(self) -> dict[str, Any]:
        """`index.parquet`: one row per written sample, sorted by id: the order training positions
        refer to, the same whatever order the shards were written in."""
        parts = self.index_parts or [INDEX_SCHEMA.empty_table()]
        table = pa.concat_tables(parts).combine_chunks()
        table = table.take(pc.sort_indices(table, sort_keys=[("id", "ascending")]))
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        storage.write_bytes(storage.join(self.output, INDEX_FILE), data)
        return {"path": INDEX_FILE, "rows": table.num_rows, "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(), "order": "id"}


def _remove_stale(output: str, folder: str, keep: set[str]) -> None:
    for uri in storage.list_files(storage.join(output, folder)):
        rel = f"{folder}/{uri.rsplit('/', 1)[-1]}"
        if rel not in keep:
            storage.delete(uri)


class RejectWriter:
    """Rejected records as JSONL files of `per_file` lines, deterministic names, counted by reason code."""

    def __init__(self, output: str, per_file: int):
        self.output = output
        self.per_file = per_file
        self.pending: list[dict[str, Any]] = []
        self.files: list[str] = []
        self.reasons: Counter = Counter()

    def add(self, record_id: str, reason: str, original: Any) -> None:
        self.pending.append({"id": record_id, "reason": reason, "record": original})
        self.reasons[reason.split(":", 1)[0]] += 1
        if len(self.pending) >= self.per_file:
            self.flush()

    def flush(self) -> None:
        while self.pending:
            chunk, self.pending = self.pending[: self.per_file], self.pending[self.per_file:]
            name = f"rejects/rejects-{len(self.files):05d}.jsonl"
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chunk)
            storage.write_text(storage.join(self.output, name), text)
            self.files.append(name)


def consume(encoded: Any, cfg: PreprocessConfig, shards: ShardWriter, rejects: RejectWriter) -> int:
    """Drain the encoded stream in order into shards and rejects; returns the number of input rows.
    Only one batch plus one shard's rows are held at a time (the id set grows with the dataset)."""
    seen: set[str] = set()
    total = 0
    for batch in encoded.iter_batches(batch_format="pyarrow", batch_size=cfg.batch_size):
        total += batch.num_rows
        keep = []
        for i, row in enumerate(batch.select(["id", "ok", "reason", "record"]).to_pylist()):
            reason = row["reason"]
            if row["ok"] and row["id"] in seen:
                reason = f"duplicate_id: {row['id']} already written"
            if reason:
                rejects.add(row["id"], reason, json.loads(row["record"]) if row["record"] else row["id"])
            else:
                seen.add(row["id"])
                keep.append(i)
        if keep:
            shards.add(batch.take(keep).select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA))
    shards.flush()
    rejects.flush()
    return total


def build_manifest(cfg: PreprocessConfig, total: int, shards: ShardWriter, rejects: RejectWriter,
                   index: dict[str, Any], image_tokens: int) -> dict[str, Any]:
    written = sum(s["rows"] for s in shards.shards)
    modality: Counter = Counter()
    for shard in shards.shards:
        modality.update(shard["modality"])
    return {
        "format": MANIFEST_FORMAT,
        "counts": {"input": total, "written": written, "rejected": total - written},
        "reject_fraction": round((total - written) / total, 6) if total else 0.0,
        "rejects_by_reason": dict(sorted(rejects.reasons.items())),
        "reject_files": rejects.files,
        "shards": shards.shards,
        "index": index,
        "row_group_rows": cfg.row_group_rows,
        # What the token ids were made for: training checks its config against this.
        "dataset": {"template": cfg.template, "image_mode": cfg.images.image_mode,
                    "image_tokens_per_image": image_tokens, "max_length": cfg.max_length,
                    "image_format": cfg.images.store_format},
        "modality": dict(sorted(modality.items())),
        "total_tokens": sum(s["tokens"] for s in shards.shards),
        "schema": {f.name: str(f.type) for f in SHARD_SCHEMA},
        "config": cfg.model_dump(mode="json"),
        "config_digest": config_digest(cfg),
    }


def check_preprocess_inputs(cfg: PreprocessConfig) -> None:
    """On the driver, before Ray starts: the inputs, the image root and the processor exist (a
    missing processor otherwise fails minutes later inside Ray Data with a Hugging Face hub error)."""
    from llava_platform import preflight

    input_files(cfg)
    try:
        preflight.require_path(cfg.image_root, "image_root")
        preflight.require_model_dir(cfg.processor, "processor")
    except preflight.InputError as err:
        raise ConfigError(str(err)) from None


def run(cfg: PreprocessConfig) -> tuple[dict[str, Any], bool]:
    """Execute the pipeline; returns (manifest, whether it passed the reject limit)."""
    import ray

    check_preprocess_inputs(cfg)
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True  # deterministic shard contents across runs
    ctx.enable_progress_bars = False
    try:
        return _execute(cfg)
    finally:  # the context is process-wide: leave it as other Ray Data users in this process had it
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


def _execute(cfg: PreprocessConfig) -> tuple[dict[str, Any], bool]:
    import ray

    start = time.monotonic()
    manifest_uri = storage.join(cfg.output, "manifest.json")
    if storage.exists(manifest_uri):
        storage.delete(manifest_uri)  # until this run completes, no manifest vouches for the shards
    ds, image_fs, image_root = build_dataset(cfg)
    encoded = ds.map_batches(encode_batch, batch_format="pyarrow", batch_size=cfg.batch_size,
                             fn_kwargs={"cfg_json": cfg.model_dump_json(), "filesystem": image_fs,
                                        "image_root": image_root,
                                        "processor_fs": storage.pyarrow_filesystem(cfg.processor)[0]},
                             compute=ray.data.TaskPoolStrategy(size=cfg.num_workers), num_cpus=cfg.worker_cpus)
    shards = ShardWriter(cfg.output, cfg.rows_per_shard, cfg.row_group_rows)
    rejects = RejectWriter(cfg.output, cfg.rejects_per_file)
    total = consume(encoded, cfg, shards, rejects)
    index = shards.write_index()
    _remove_stale(cfg.output, "shards", {s["path"] for s in shards.shards})
    _remove_stale(cfg.output, "rejects", set(rejects.files))
    manifest = build_manifest(cfg, total, shards, rejects, index, _image_tokens(cfg))
    passed = manifest["reject_fraction"] <= cfg.max_reject_fraction
    if passed:
        storage.write_text(manifest_uri, json.dumps(manifest, indent=1, sort_keys=True))
    manifest["elapsed_s"] = round(time.monotonic() - start, 3)
    _log_mlflow(cfg, manifest, passed)
    return manifest, passed


def _image_tokens(cfg: PreprocessConfig) -> int:
    from llava.data.encode import image_token_count

    return image_token_count(cached_processor(cfg.processor, storage.pyarrow_filesystem(cfg.processor)[0]))


def _log_mlflow(cfg: PreprocessConfig, manifest: dict[str, Any], passed: bool) -> None:
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return
    from mlflow.tracking import MlflowClient

    from llava_platform import tracking

    tracking.configure(uri)
    run_id = tracking.start_job_run(cfg.mlflow.experiment, "preprocess", phase="preprocess")
    tracking.log_params(run_id, flatten(manifest["config"]))
    metrics = {f"count.{k}": v for k, v in manifest["counts"].items()}
    metrics.update({f"rejects.{k}": v for k, v in manifest["rejects_by_reason"].items()})
    metrics.update({"reject_fraction": manifest["reject_fraction"], "total_tokens": manifest["total_tokens"],
                    "elapsed_s": manifest["elapsed_s"]})
    tracking.log_metrics(run_id, metrics, step=0, timestamp_ms=int(time.time() * 1000))
    client = MlflowClient()
    client.set_tag(run_id, "llava.config_digest", manifest["config_digest"])
    client.log_text(run_id, json.dumps(manifest, indent=1, sort_keys=True), "manifest.json")
    tracking.finish_run(run_id, "FINISHED" if passed else "FAILED")


def print_summary(manifest: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    counts = manifest["counts"]
    print(f"preprocess: {counts['input']} records in, {counts['written']} written in "
          f"{len(manifest['shards'])} shard(s), {counts['rejected']} rejected "
          f"({manifest['reject_fraction']:.2%})", file=out)
    for reason, count in manifest["rejects_by_reason"].items():
        print(f"  rejected {reason}: {count}", file=out)


def main(argv: list[str] | None = None) -> int:
    config, overrides = job_arguments(argv, prog="python -m jobs.preprocess", config_required=False,
                                      description=__doc__.split("\n")[0], example="max_length=512",
                                      schema=PreprocessConfig)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = load_config(PreprocessConfig, config, overrides)
        manifest, passed = run(cfg)
    except (ConfigError, storage.StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(manifest)
    if not passed:
        print(f"error: reject fraction {manifest['reject_fraction']:.4f} exceeds max_reject_fraction "
              f"{cfg.max_reject_fraction}; see {storage.join(cfg.output, 'rejects')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
