"""A real training worker's peak host memory on processed shards at two sizes ten times apart.

    .venv/bin/python benchmarks/train_worker_rss.py [--sizes 500 5000] [--steps 6] [--workdir DIR]

For each size: the `make run` data (`llavactl data synth`'s shapes dataset, stage-1 captions, one
record per image), pre-processed by `python -m jobs.preprocess`, then `python -m jobs.train` on the
tiny stage-1 preset (2 Ray Train workers, DeepSpeed on CPU) for a few steps. The lead worker logs
its peak RSS per step (`worker_peak_rss_mib`); the figure is the last step's. The mean share of step
time spent waiting for data (`data_wait_fraction`) is printed too. With the data read by
position the two figures should match; before, a worker held every sample (about 199 KiB each).
Last line: `RESULT rss_mib_small=... rss_mib_large=... rss_growth_mib=... samples_small=... samples_large=...`
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _run(cmd: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def measure(work: Path, n: int, steps: int, base: tuple[Path, Path], processor_dir: Path) -> tuple[float, int]:
    import json

    from mlflow.tracking import MlflowClient

    from llava.data.synthetic import write_shapes_dataset

    ds = write_shapes_dataset(work / f"data{n}", n, seed=0, image_size=64, n_eval=1)
    processed = work / f"processed{n}"
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "DS_ACCELERATOR": "cpu", "RAY_DISABLE_USAGE_STATS": "1"}
    _run([sys.executable, "-m", "jobs.preprocess", "--config", "jobs/configs/preprocess_stage1.yaml",
          f"input={ds.stage1}", f"output={processed}", f"processor={processor_dir}", "mlflow.tracking_uri=null"], env)
    written = json.loads((processed / "manifest.json").read_text())["counts"]["written"]
    vision, lm = base
    _run([sys.executable, "-m", "jobs.train", "--config", "jobs/configs/tiny_stage1.yaml", f"model.vision={vision}",
          f"model.language_model={lm}", "data.records=null", f"data.processed={processed}", "data.image_root=null",
          f"optim.max_steps={steps}", f"checkpoint.storage={work / 'ckpt'}", "checkpoint.every_n_steps=1000",
          f"output={work / f'model{n}'}", f"tracking.run_name=rss-{n}", "tracking.experiment=rss"], env)
    client = MlflowClient(tracking)
    run = client.search_runs([client.get_experiment_by_name("rss").experiment_id],
                             filter_string=f"attributes.run_name = 'rss-{n}'")[0]
    waits = [m.value for m in client.get_metric_history(run.info.run_id, "data_wait_fraction")]
    print(f"{written} samples: data wait {sum(waits) / len(waits):.1%} of step time (mean over {len(waits)} steps)",
          flush=True)
    return run.data.metrics["worker_peak_rss_mib"], written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[500, 5000])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    from llava.model.builder import build_llava, save_llava
    from llava.model.tiny import build_tiny_checkpoints

    with tempfile.TemporaryDirectory(prefix="llava-rss-", dir=args.workdir) as tmp:
        work = Path(tmp)
        base = build_tiny_checkpoints(work / "base", pretrain_steps=0)
        model, processor = build_llava(*base, template="plain")
        processor_dir = save_llava(model, processor, work / "llava")
        results = {}
        for n in args.sizes:
            results[n] = measure(work, n, args.steps, base, processor_dir)
            print(f"{results[n][1]} samples: lead worker peak RSS {results[n][0]:.0f} MiB", flush=True)
    (small, n_small), (large, n_large) = results[args.sizes[0]], results[args.sizes[1]]
    print(f"RESULT rss_mib_small={small:.0f} rss_mib_large={large:.0f} rss_growth_mib={large - small:.0f} "
          f"samples_small={n_small} samples_large={n_large}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
