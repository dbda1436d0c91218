"""`llavactl eval`: evaluate a model (path, runs:/, models:/ or s3:// URI) with `jobs.evaluate`.

    llavactl eval --model models:/llava-tiny@candidate [--data DIR] [--out DIR] [--limit N] [--record]
                  [--judge-url URL --judge-model NAME --judge-api-key-env VAR [--judge-rules FILE]]
                  [--config FILE] [key=value ...]

Each evaluation writes results.json, report.md and chart.png to a new folder under --out (default
.llava/eval/<UTC time>-<model>-<run>/). The metrics become the registry version's (what the
promotion gate reads) only with --record, and never from a --limit run.

The evaluation runs as the job module in a child process, exactly as `ray job submit -- python -m
jobs.evaluate ...` would run it on a cluster (the control plane does not import job code). MLflow:
`--tracking-uri`, else MLFLOW_TRACKING_URI, else the embedded store under `--workdir` when it exists;
with none of those a local model is still evaluated, just not logged.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from llava_platform.commands.overrides import add_override_arguments, collect_overrides

DEFAULT_CONFIG = "evaluate_shapes.yaml"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model: shapes exact match, ScienceQA format, judge")
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model, "
                   "s3://bucket/prefix or a local llava-hf directory")
    p.add_argument("--config", help=f"evaluation YAML (default: jobs/configs/{DEFAULT_CONFIG})")
    p.add_argument("--data", help="synthetic data directory holding eval/*.jsonl (local or s3://)")
    p.add_argument("--out", help="parent directory: each evaluation writes its own folder under it")
    p.add_argument("--limit", type=int, help="evaluate only the first N items of each set (a quick look, never recorded)")
    p.add_argument("--record", action="store_true",
                   help="record the metrics on the registry version (models:/ only): what the promotion gate reads")
    p.add_argument("--judge-url", help="OpenAI-compatible base URL of the judge (enables LLaVA-Bench judging)")
    p.add_argument("--judge-model", help="judge model name")
    p.add_argument("--judge-api-key-env", help="environment variable holding the judge API key")
    p.add_argument("--judge-rules", help="rule file in the reference rule.json format")
    p.add_argument("--tracking-uri", help="MLflow tracking URI")
    p.add_argument("--workdir", default=".llava", help="embedded-stack directory (default .llava)")
    add_override_arguments(p, "generation.batch_size=4")
    p.set_defaults(func=eval_main)


def default_config() -> Path:
    spec = importlib.util.find_spec("jobs")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llavactl eval: the jobs package is not installed; pass --config")
    return Path(list(spec.submodule_search_locations)[0]) / "configs" / DEFAULT_CONFIG


def build_overrides(args: argparse.Namespace) -> list[str]:
    out = [f"model={args.model}"]
    if args.data:
        out.append(f"data_dir={args.data}")
    if args.out:
        out.append(f"output_dir={args.out}")
    if args.limit:
        out += [f"{b}.limit={args.limit}" for b in ("shapes", "scienceqa", "bench")]
    if args.record:
        out.append("tracking.record_on_version=true")
    if args.judge_url:
        out += ["judge.enabled=true", "bench.enabled=true", f"judge.base_url={args.judge_url}"]
    if args.judge_model:
        out.append(f"judge.model={args.judge_model}")
    if args.judge_api_key_env is not None:
        out.append(f"judge.api_key_env={args.judge_api_key_env}")
    if args.judge_rules:
        out.append(f"judge.rules={args.judge_rules}")
    tracking = tracking_override(args)
    if tracking:
        out.append(tracking)
    return out + collect_overrides(args, "llavactl eval")


def tracking_override(args: argparse.Namespace) -> str | None:
    if args.tracking_uri:
        return f"tracking.tracking_uri={args.tracking_uri}"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None  # the job reads it from the environment
    db = Path(args.workdir).resolve() / "mlflow.db"
    if db.is_file():
        return f"tracking.tracking_uri=sqlite:///{db}"
    if args.model.startswith(("runs:/", "models:/")):
        raise SystemExit(f"llavactl eval: {args.model} needs an MLflow store: pass --tracking-uri, set "
                         f"MLFLOW_TRACKING_URI, or run where {db} exists")
    print("llavactl eval: no MLflow store found; results are written locally only", file=sys.stderr)
    return "tracking.enabled=false"


def eval_main(args: argparse.Namespace) -> int:
    config = Path(args.config) if args.config else default_config()
    if not config.is_file():
        print(f"llavactl eval: config {config} does not exist", file=sys.stderr)
        return 2
    if args.record and not args.model.startswith("models:/"):
        print(f"llavactl eval: --record needs a registry version (models:/NAME@ALIAS or models:/NAME/VERSION), "
              f"not {args.model}", file=sys.stderr)
        return 2
    if args.record and args.limit:
        print("llavactl eval: --record with --limit: a partial evaluation is never recorded on a version",
              file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "jobs.evaluate", "--config", str(config), *build_overrides(args)]
    return subprocess.run(cmd, check=False).returncode
