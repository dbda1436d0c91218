"""Worker-side data reading at LLaVA scale: memory flat in the dataset size, first batch fast.

    .venv/bin/python benchmarks/data_scale.py [--sizes 10000 100000 1000000] [--workdir DIR] [--keep]

Writes synthetic processed shards directly in the real format (`jobs.preprocess`: shard schema,
row groups, sorted `index.parquet`, v2 manifest) with about 600 tokens per sample and small JPEG
images, then, for each size in a fresh process, does what a training worker does: load the index
(`jobs.processed_data.open_processed`), compute the epoch order and this rank's schedule
(`RankSchedule`), and read + collate micro-batches through the DataLoader (`micro_batch_loader`,
the loop's own `CollateMicroBatch`). Measured per size: peak RSS of that process, time from
opening the data to the first micro-batch; at the largest size also sustained samples/s with 1 and
2 loader processes. Last line:

    RESULT rss_mib_10k=... rss_mib_1m=... rss_growth_mib=... first_batch_s_1m=... loader_samples_per_s=...

(`loader_samples_per_s` with 1 loader process, `loader_samples_per_s_2` with 2). Goals (issue 11):
growth from 10K to 1M at most 64 MiB, first batch within 15 s at 1M.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS_PER_SHARD = 1000
ROW_GROUP_ROWS = 16
POOL = 512  # distinct synthetic rows; shards draw from them (ids and row order differ)
GLOBAL_BATCH, MICRO_BATCH, WORLD = 128, 8, 2  # rank 0 of 2: 8 micro-batches of 8 per step
IMAGE_SIDE = 32


def _label(n: int) -> str:
    return f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}m"


def _row_pool(rng: np.random.Generator) -> list[dict]:
    from PIL import Image

    rows = []
    for k in range(POOL):
        length = int(np.clip(rng.normal(600, 120), 200, 1000))
        ids = rng.integers(3, 32000, size=length, dtype=np.int32)
        labels = ids.copy()
        labels[: int(length * 0.6)] = -100  # prompt masked, answer supervised
        text_only = k % 10 == 0
        images = []
        if not text_only:
            pixels = rng.integers(0, 255, size=(IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
            images = [buf.getvalue()]
        rows.append({"input_ids": ids, "labels": labels, "images": images, "length": length,
                     "modality": "text" if text_only else "image"})
    return rows


def write_dataset(out: Path, n: int, seed: int = 0) -> None:
    """Shards + index + manifest exactly as jobs.preprocess lays them out."""
    import pyarrow as pa

    from jobs.preprocess import SHARD_SCHEMA, ShardWriter
    from llava.train.sample_index import MANIFEST_FORMAT

    rng = np.random.default_rng(seed)
    rows = _row_pool(rng)
    pool = pa.table({
        "id": [""] * POOL,
        "input_ids": [r["input_ids"] for r in rows],
        "labels": [r["labels"] for r in rows],
        "images": [r["images"] for r in rows],
        "num_images": [len(r["images"]) for r in rows],
        "length": [r["length"] for r in rows],
        "modality": [r["modality"] for r in rows],
    }, schema=SHARD_SCHEMA)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(str(out), ROWS_PER_SHARD, ROW_GROUP_ROWS)
    for start in range(0, n, ROWS_PER_SHARD):
        count = min(ROWS_PER_SHARD, n - start)
        table = pool.take(rng.integers(0, POOL, size=count))
        ids = pa.array([f"s{start + i:08d}" for i in range(count)], pa.string())
        writer.add(table.set_column(0, SHARD_SCHEMA.field("id"), ids))
    writer.flush()
    index = writer.write_index()
    manifest = {"format": MANIFEST_FORMAT, "counts": {"input": n, "written": n, "rejected": 0},
                "shards": writer.shards, "index": index, "row_group_rows": ROW_GROUP_ROWS,
                "dataset": {"template": "synthetic", "image_mode": "pad", "image_tokens_per_image": 4,
                            "max_length": 1024, "image_format": "jpeg"}}
    (out / "manifest.json").write_text(json.dumps(manifest))


def _image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIDE}, crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE})


def _cpu_s() -> float:
    """CPU seconds of this process (the loader processes' first read is not counted): the work
    done before the first batch, whatever the machine's load."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def measure(data: Path, loader_workers: int, batches: int) -> dict:
    """In this (fresh) process: what one training worker does with the data."""
    import torch

    from jobs.processed_data import open_processed
    from llava.train.loader import CollateMicroBatch, RankSchedule, micro_batch_loader

    torch.set_num_threads(1)
    collate = CollateMicroBatch(packing=False, pad_id=0, image_processor=_image_processor(), max_length=1024)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cpu_before = _cpu_s()
    started = time.perf_counter()
    source = open_processed(str(data))
    n = len(source.index)
    per_epoch = -(-n // GLOBAL_BATCH)
    schedule = RankSchedule(source.index, seed=0, group_by_modality_length=True, global_batch=GLOBAL_BATCH,
                            micro_batch=MICRO_BATCH, rank=0, world_size=WORLD, start=0, total=per_epoch,
                            per_epoch=per_epoch)
    loader = iter(micro_batch_loader(source, schedule, collate, workers=loader_workers, prefetch=4))
    next(loader)
    first_batch = time.perf_counter() - started
    first_batch_cpu = _cpu_s() - cpu_before
    t0 = time.perf_counter()
    samples = 0
    for _ in range(batches):
        micro, ids = next(loader)
        samples += len(ids)
    rate = samples / (time.perf_counter() - t0)
    return {"samples": n, "index_mib": source.index.nbytes / 2**20, "first_batch_s": first_batch,
            "first_batch_cpu_s": first_batch_cpu,
            "samples_per_s": rate, "baseline_rss_mib": baseline,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loader_workers": loader_workers}


def _child(data: Path, loader_workers: int, batches: int) -> dict:
    cmd = [sys.executable, __file__, "--measure", str(data), "--loader-workers", str(loader_workers),
           "--batches", str(batches)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--workdir", default="/tmp/llava-data-scale")
    parser.add_argument("--keep", action="store_true", help="keep the written shards (reused by the next run)")
    parser.add_argument("--batches", type=int, default=150, help="micro-batches timed for samples/s")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--loader-workers", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.loader_workers, args.batches)))
        return 0
    work = Path(args.workdir)
    results = {}
    for n in sorted(args.sizes):
        data = work / f"n{n}"
        if not (data / "manifest.json").exists():
            t0 = time.perf_counter()
            write_dataset(data, n)
            size = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
            print(f"wrote {n} samples in {time.perf_counter() - t0:.0f} s, {size / 2**20:.0f} MiB on disk", flush=True)
        results[n] = _child(data, 1, 20)
        print(f"{n:>9} samples: peak RSS {results[n]['peak_rss_mib']:.0f} MiB (after imports "
              f"{results[n]['baseline_rss_mib']:.0f}), index {results[n]['index_mib']:.1f} MiB, "
              f"first batch {results[n]['first_batch_s']:.2f} s ({results[n]['first_batch_cpu_s']:.2f} s CPU)",
              flush=True)
    largest = max(results)
    rates = {w: _child(work / f"n{largest}", w, args.batches)["samples_per_s"] for w in (1, 2)}
    print(f"loader at {largest} samples: {rates[1]:.0f} samples/s with 1 process, {rates[2]:.0f} with 2", flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    small, big = min(results), largest
    print(f"RESULT rss_mib_{_label(small)}={results[small]['peak_rss_mib']:.0f} "
          f"rss_mib_{_label(big)}={results[big]['peak_rss_mib']:.0f} "
          f"rss_growth_mib={results[big]['peak_rss_mib'] - results[small]['peak_rss_mib']:.0f} "
          f"first_batch_s_{_label(big)}={results[big]['first_batch_s']:.2f} "
          f"first_batch_cpu_s_{_label(big)}={results[big]['first_batch_cpu_s']:.2f} "
          f"loader_samples_per_s={rates[1]:.0f} loader_samples_per_s_2={rates[2]:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
