"""`llavactl data synth | preprocess | generate`: the data pipeline subcommands.

    llavactl data synth --output URI --n N [--seed S] [--image-size PX] [--n-eval N]
    llavactl data preprocess [--input URI] [--output URI] [--config YAML] [--processor DIR] [key=value ...]
    llavactl data generate --input URI --output URI --teacher rule|openai [--config YAML] [key=value ...]

URIs are local paths or s3://bucket/prefix (credentials and endpoint from the standard AWS
variables). `preprocess` and `generate` run the job entrypoints (`python -m jobs.preprocess`,
`python -m jobs.generate_instructions`) in a child process, exactly as `ray job submit` would, so the
control plane never imports job internals.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from llava.data.templates import TEMPLATE_NAMES


def job_config(name: str) -> str:
    """Path of a shipped job config (jobs/configs/<name>), located without importing `jobs`."""
    spec = importlib.util.find_spec("jobs")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the 'jobs' package is not installed next to llava_platform")
    return str(Path(next(iter(spec.submodule_search_locations))) / "configs" / name)


def add_subcommands(data_subparsers: argparse._SubParsersAction) -> None:
    synth = data_subparsers.add_parser("synth", help="write the synthetic shapes dataset")
    synth.add_argument("--output", required=True, help="local directory or s3://bucket/prefix")
    synth.add_argument("--n", type=int, required=True, help="number of training images")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=64)
    synth.add_argument("--n-eval", type=int, default=None, help="held-out images (default max(10, n/10))")
    synth.set_defaults(func=synth_main)

    pre = data_subparsers.add_parser("preprocess", help="validate, tokenize and shard records with Ray Data")
    pre.add_argument("--input", action="append", help="LLaVA JSON/JSONL or Parquet file, or a folder/prefix of "
                     "them; repeat for several, in order (default: the config's, .llava/data/stage2.json as "
                     "`make run` writes it)")
    pre.add_argument("--output", help="where shards, rejects/ and manifest.json go (default: the config's)")
    pre.add_argument("--config", default=None, help="job YAML (default: jobs/configs/preprocess_stage2.yaml)")
    pre.add_argument("--processor", help="saved llava-hf processor/model directory (local or s3://; default: "
                     "the config's, .llava/models/stage2)")
    pre.add_argument("--image-root", help="where relative image paths resolve (default: the input's directory)")
    pre.add_argument("--template", choices=TEMPLATE_NAMES)
    pre.add_argument("--max-reject-fraction", type=float,
                     help="fail (exit 1, no manifest) when rejected/input exceeds this (config default 0.05)")
    pre.add_argument("overrides", nargs="*", help="more key=value config overrides")
    pre.set_defaults(func=preprocess_main)

    gen = data_subparsers.add_parser("generate", help="generate instruction data from captions + boxes")
    gen.add_argument("--input", required=True, help="captions+boxes JSONL (local or s3://)")
    gen.add_argument("--output", required=True, help="output directory or prefix")
    gen.add_argument("--teacher", choices=["rule", "openai"], default="rule")
    gen.add_argument("--config", default=None, help="job YAML (default: jobs/configs/generate_<teacher>.yaml)")
    gen.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    gen.add_argument("--model", help="teacher model name")
    gen.add_argument("--api-key-env", help="name of the variable holding the API key")
    gen.add_argument("--prompts-dir", help="prompt directory in the reference layout")
    gen.add_argument("--types", nargs="+", choices=["conversation", "detail_description", "complex_reasoning"])
    gen.add_argument("--seed", type=int)
    gen.add_argument("overrides", nargs="*", help="more key=value config overrides")
    gen.set_defaults(func=generate_main)


def synth_main(args: argparse.Namespace) -> int:
    from llava.data.synthetic import write_shapes_dataset
    from llava_platform import storage

    if args.n < 1:
        print("error: --n must be at least 1", file=sys.stderr)
        return 2
    if storage.is_s3(args.output):
        with tempfile.TemporaryDirectory(prefix="llava-synth-") as tmp:
            ds = write_shapes_dataset(tmp, args.n, seed=args.seed, image_size=args.image_size, n_eval=args.n_eval)
            count = storage.upload_dir(ds.root, args.output)
    else:
        ds = write_shapes_dataset(args.output, args.n, seed=args.seed, image_size=args.image_size,
                                  n_eval=args.n_eval)
        count = sum(1 for p in Path(ds.root).rglob("*") if p.is_file())
    print(f"wrote {count} files to {args.output}: captions.jsonl, stage1.json, stage2.json, images/, "
          "eval/shapes_qa.jsonl, eval/scienceqa.jsonl")
    return 0


def _run_job(module: str, config: str, overrides: list[str]) -> int:
    cmd = [sys.executable, "-m", module, "--config", config, *overrides]
    # the child must import `jobs` from wherever it is installed, also when run from another directory
    env = dict(os.environ)
    root = str(Path(config).resolve().parents[2]) if Path(config).resolve().parent.name == "configs" else None
    if root:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return subprocess.run(cmd, env=env, check=False).returncode


def preprocess_main(args: argparse.Namespace) -> int:
    config = args.config or job_config("preprocess_stage2.yaml")
    overrides = []
    inputs = args.input or []
    for key, value in (("input", inputs[0] if len(inputs) == 1 else f"[{', '.join(inputs)}]" if inputs else None),
                       ("output", args.output), ("processor", args.processor), ("image_root", args.image_root), ("template", args.template),
                       ("max_reject_fraction", args.max_reject_fraction)):
        if value is not None:
            overrides.append(f"{key}={value}")
    return _run_job("jobs.preprocess", config, [*overrides, *args.overrides])


def generate_main(args: argparse.Namespace) -> int:
    config = args.config or job_config(f"generate_{args.teacher}.yaml")
    overrides = [f"input={args.input}", f"output={args.output}", f"teacher.kind={args.teacher}"]
    for key, value in (("teacher.base_url", args.base_url), ("teacher.model", args.model),
                       ("teacher.api_key_env", args.api_key_env), ("prompts_dir", args.prompts_dir),
                       ("seed", args.seed)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.types:
        overrides.append(f"task_types=[{', '.join(args.types)}]")
    return _run_job("jobs.generate_instructions", config, [*overrides, *args.overrides])
