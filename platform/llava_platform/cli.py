"""`llavactl`: one entry point, one module per command group under `llava_platform.commands`.

Each command module exposes `register(subparsers)`; it adds its parser and sets `func` to a
callable taking the parsed namespace and returning an exit code. Modules are imported lazily by
name so that `llavactl --help` stays fast and a group's heavy imports load only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from llava_platform import preflight

# Command-group modules under llava_platform.commands, in --help order.
COMMAND_MODULES = ["run", "serve", "chat", "models", "submit", "pipeline", "data", "eval"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llavactl", description="Train, evaluate and serve LLaVA models.")
    parser.add_argument("--verbose", action="store_true",
                        help="print the traceback of a failure (also in the jobs a command starts: LLAVA_VERBOSE=1)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"llava_platform.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[preflight.VERBOSE_ENV] = "1"  # inherited by the job processes commands start
    try:
        # A failure is one line naming its cause (the traceback with --verbose), not a page of stack.
        sub = getattr(args, f"{args.command}_command", None)  # e.g. data_command = "show-sample"
        prog = " ".join(["llavactl", args.command, *([sub] if isinstance(sub, str) else [])])
        return preflight.guarded(prog, lambda: int(args.func(args) or 0))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
