"""`llavactl pipeline render FILE [--values VALUES]`: the RayJobs and the RayService the operator
would create for a LlavaPipeline, printed as YAML from the operator's own builders, to preview or
to check with `kubectl apply --dry-run=server -f -`.

    llavactl pipeline render operators/llava_operator/examples/tiny.yaml --values my-values.yaml

`--values` is the chart values file the operator was installed with (its settings: images, Ray
version, S3, MLflow, pull secrets, Ray token and serving Secrets); without it, the chart defaults.
The pipeline uid is not known before `kubectl apply`, so LLAVA_PIPELINE_ID reads `--uid`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pipeline", help="LlavaPipeline tools: render what the operator creates")
    sub = p.add_subparsers(dest="pipeline_command", required=True)
    r = sub.add_parser("render", help="print the RayJob / RayService manifests for a LlavaPipeline file")
    r.add_argument("file", type=Path, help="LlavaPipeline YAML (e.g. operators/llava_operator/examples/tiny.yaml)")
    r.add_argument("--values", type=Path, help="chart values file the operator runs with (default: chart defaults)")
    r.add_argument("--release", default="llava", help="helm release name (names the in-chart MLflow service)")
    r.add_argument("--namespace", default="default", help="release namespace")
    r.add_argument("--uid", default="preview", help="pipeline uid to write into LLAVA_PIPELINE_ID")
    r.set_defaults(func=render_main)


def render_main(args: argparse.Namespace) -> int:
    import yaml

    from llava_operator.render import render_pipeline, settings_from_values, to_yaml
    from llava_platform.config import ConfigError

    try:
        pipeline = yaml.safe_load(args.file.read_text())
        values = yaml.safe_load(args.values.read_text()) or {} if args.values else {}
        if not isinstance(pipeline, dict) or pipeline.get("kind") != "LlavaPipeline":
            raise ConfigError(f"{args.file}: not a LlavaPipeline manifest")
        settings = settings_from_values(values, release=args.release, namespace=args.namespace)
        objects = render_pipeline(pipeline, settings, uid=args.uid)
    except (OSError, yaml.YAMLError, ConfigError, ValueError) as err:
        print(f"llavactl pipeline render: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(to_yaml(objects))
    return 0
