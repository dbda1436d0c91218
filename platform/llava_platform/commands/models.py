"""`llavactl models`: list, show, promote and roll back registered model versions.

    llavactl models list [NAME]
    llavactl models show NAME [VERSION]
    llavactl models promote NAME VERSION [--alias champion] [--gate FILE] [--force --reason TEXT]
    llavactl models rollback NAME [--alias champion]

The registry is MLflow's: `--tracking-uri`, else MLFLOW_TRACKING_URI, else the embedded store that
`llavactl run` writes (`sqlite:///<workdir>/mlflow.db`, workdir `.llava`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_WORKDIR = ".llava"


def add_tracking_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI, "
                   "else sqlite:///<workdir>/mlflow.db)")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="embedded-stack directory (default .llava)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="registered model versions: list, show, promote, rollback")
    sub = p.add_subparsers(dest="models_command", required=True)

    ls = sub.add_parser("list", help="registered models, or the versions of one, with aliases and metrics")
    ls.add_argument("name", nargs="?")
    show = sub.add_parser("show", help="one version (default: every version) with metrics and lineage")
    show.add_argument("name")
    show.add_argument("version", nargs="?")
    pr = sub.add_parser("promote", help="point an alias at a version if it passes the gate")
    pr.add_argument("name")
    pr.add_argument("version")
    pr.add_argument("--alias", default="champion")
    pr.add_argument("--gate", help="gate YAML (thresholds / regression); default: the shipped gate")
    pr.add_argument("--force", action="store_true", help="promote even if the gate fails (needs --reason)")
    pr.add_argument("--reason", help="why the gate is overridden; recorded on the version and in the history")
    rb = sub.add_parser("rollback", help="move an alias back to the version it held before")
    rb.add_argument("name")
    rb.add_argument("--alias", default="champion")
    rb.add_argument("--expect-current", help="only roll back if the alias still points at this version "
                    "(makes a retried rollback a no-op)")
    hist = sub.add_parser("history", help="the alias history recorded on a registered model")
    hist.add_argument("name")
    for sp in (ls, show, pr, rb, hist):
        add_tracking_args(sp)
        sp.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=list_main)
    show.set_defaults(func=show_main)
    pr.set_defaults(func=promote_main)
    rb.set_defaults(func=rollback_main)
    hist.set_defaults(func=history_main)


def resolve_tracking_uri(args: argparse.Namespace) -> str:
    """The store to talk to; refuses to invent an empty embedded store where none exists."""
    if getattr(args, "tracking_uri", None):
        return args.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = Path(getattr(args, "workdir", None) or DEFAULT_WORKDIR).resolve() / "mlflow.db"
    if not db.is_file():
        raise SystemExit(f"llavactl: no MLflow store found: {db} does not exist; pass --tracking-uri "
                         "or set MLFLOW_TRACKING_URI")
    return f"sqlite:///{db}"


def _client(args: argparse.Namespace):
    from llava_platform.registry import get_client

    return get_client(resolve_tracking_uri(args))


def _fmt_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())) or "-"


def _print_version(d: dict[str, Any], verbose: bool) -> None:
    aliases = ",".join(d["aliases"]) or "-"
    print(f"  v{d['version']:<4} aliases={aliases:<20} created={d['created']}  run={d['run_id']}")
    print(f"        metrics: {_fmt_metrics(d['metrics'])}")
    if d["lineage"]:
        print("        lineage: " + ", ".join(f"{k}={v}" for k, v in sorted(d["lineage"].items())))
    if verbose:
        print(f"        source: {d['source']}")
        for key, value in sorted(d["tags"].items()):
            shown = value if len(value) <= 200 else value[:197] + "..."
            print(f"        tag {key}: {shown}")


def _registry_errors():
    from mlflow.exceptions import MlflowException

    from llava_platform.registry import RegistryError

    return (RegistryError, MlflowException)


def list_main(args: argparse.Namespace) -> int:
    from llava_platform import registry as reg

    client = _client(args)
    try:
        names = [args.name] if args.name else [m["name"] for m in reg.list_models(client=client)]
        out = {name: reg.list_versions(name, client=client) for name in names}
    except _registry_errors() as err:
        print(f"llavactl models list: {getattr(err, 'message', err)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if not out:
        print("no registered models")
    for name, versions in out.items():
        print(f"{name}: {len(versions)} version(s)")
        for d in versions:
            _print_version(d, verbose=False)
    return 0


def show_main(args: argparse.Namespace) -> int:
    from llava_platform import registry as reg

    client = _client(args)
    try:
        versions = reg.list_versions(args.name, client=client)
    except _registry_errors() as err:
        print(f"llavactl models show: {getattr(err, 'message', err)}", file=sys.stderr)
        return 1
    if args.version:
        versions = [d for d in versions if d["version"] == str(args.version)]
        if not versions:
            print(f"llavactl models show: {args.name} has no version {args.version}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(versions if not args.version else versions[0], indent=2))
        return 0
    print(f"{args.name}:")
    for d in versions:
        _print_version(d, verbose=True)
    return 0


def promote_main(args: argparse.Namespace) -> int:
    from llava_platform import registry as reg
    from llava_platform.config import ConfigError

    if args.force and not (args.reason and args.reason.strip()):
        print("llavactl models promote: --force needs --reason TEXT", file=sys.stderr)
        return 2
    try:
        gate = reg.load_gate(args.gate) if args.gate else reg.default_gate()
    except (ConfigError, OSError) as err:
        print(f"llavactl models promote: gate {args.gate}: {err}", file=sys.stderr)
        return 2
    try:
        decision = reg.promote(args.name, args.version, alias=args.alias, gate=gate, force=args.force,
                               reason=args.reason, client=_client(args))
    except _registry_errors() as err:
        print(f"llavactl models promote: {getattr(err, 'message', err)}", file=sys.stderr)
        return 1
    print_decision(decision, as_json=args.json)
    return 0 if decision.promoted else 3


def print_decision(decision, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(decision.to_dict(), indent=2))
        return
    if decision.noop:
        verdict = "unchanged"
    elif decision.forced:
        verdict = "FORCED"
    else:
        verdict = "PROMOTED" if decision.promoted else "REFUSED"
    prev = f" (was v{decision.previous})" if decision.previous else ""
    print(f"{verdict}: {decision.name} v{decision.version} -> @{decision.alias}{prev}")
    for check in decision.checks:
        print(f"  [{'ok' if check.passed else 'FAIL'}] {check.detail}")
    for line in decision.reasons:
        if not any(line == c.detail for c in decision.checks):
            print(f"  {line}")


def rollback_main(args: argparse.Namespace) -> int:
    from llava_platform import registry as reg

    try:
        result = reg.rollback(args.name, alias=args.alias, client=_client(args), expect_current=args.expect_current)
    except _registry_errors() as err:
        print(f"llavactl models rollback: {getattr(err, 'message', err)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.__dict__, indent=2))
    else:
        note = " (already done)" if result.noop else ""
        print(f"ROLLED BACK: {result.name}@{result.alias} v{result.from_version} -> v{result.to_version}{note}")
    return 0


def history_main(args: argparse.Namespace) -> int:
    from llava_platform import registry as reg

    try:
        history = reg.alias_history(args.name, client=_client(args))
    except _registry_errors() as err:
        print(f"llavactl models history: {getattr(err, 'message', err)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(history, indent=2))
        return 0
    for e in history:
        reason = f"  reason: {e['reason']}" if e.get("reason") else ""
        print(f"{e['when']}  @{e['alias']:<10} {e['action']:<8} v{e['from'] or '-'} -> v{e['to']}  by {e['who']}{reason}")
    return 0
