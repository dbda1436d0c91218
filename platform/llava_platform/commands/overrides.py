"""One override syntax for every command and job: positional `key=value` after the options, as
`python -m jobs.<name> --config FILE key=value ...` takes them.

`--set KEY=VALUE` (how `serve` and `eval` took overrides before) still works for one release, with
a warning on stderr; it is hidden from --help.
"""

from __future__ import annotations

import argparse
import sys


def add_override_arguments(p: argparse.ArgumentParser, example: str, *, positional: bool = True) -> None:
    """`key=value ...` (unless the command parses its positionals itself) and the deprecated `--set`."""
    if positional:
        p.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {example}")
    p.add_argument("--set", dest="deprecated_set", action="append", default=[], metavar="KEY=VALUE",
                   help=argparse.SUPPRESS)


def collect_overrides(args: argparse.Namespace, prog: str) -> list[str]:
    """The overrides in the order given: the deprecated `--set` ones first, then the positional ones."""
    old = list(getattr(args, "deprecated_set", []) or [])
    if old:
        print(f"{prog}: --set is deprecated and will be removed; pass overrides as positional key=value "
              f"after the options: {' '.join(old)}", file=sys.stderr)
    return [*old, *(getattr(args, "overrides", []) or [])]
