"""Write requirements/constraints.txt: the exact versions of every package in this venv.

    make lock        # = .venv/bin/python tools/lock_constraints.py

Run it in the venv the test suite passed in (`make install-dev`, then `make test`). `make install`,
`make install-dev` (so `make run`, `make test` and CI) and the image install with `pip install -c
requirements/constraints.txt`: a constraints file pins the version of whatever gets installed but
installs nothing by itself, so a dependency added to pyproject.toml and not locked yet still
installs (at its newest allowed version) until the next `make lock`.

The project itself (an editable install) is left out; torch is written without its local build label
(`2.13.0`, not `2.13.0+cpu`) so the same file serves the CPU venv and a CUDA image.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "requirements" / "constraints.txt"
PROJECT = "llava-platform"
# Build tools come with the venv (`make` upgrades them), not with the project's dependencies.
SKIP = {PROJECT, "pip", "setuptools", "wheel"}


def frozen() -> list[str]:
    """`name==version` of every installed distribution but the project and the build tools. A
    package installed from a wheel file is pinned by its version too: the index serves the same."""
    out = subprocess.run([sys.executable, "-m", "pip", "list", "--format=json", "--exclude-editable"], check=True,
                         capture_output=True, text=True).stdout
    pins = [f"{d['name']}=={d['version'].split('+')[0]}" for d in json.loads(out)
            if d["name"].lower().replace("_", "-") not in SKIP]
    return sorted(pins, key=str.lower)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=LOCK, help=f"where to write (default {LOCK})")
    out = parser.parse_args(argv).output
    pins = frozen()
    header = [
        "# Exact versions the test suite passed with; installed with `pip install -c` by make and the image.",
        "# Refresh: `make lock` (tools/lock_constraints.py) in the venv `make test` passed in.",
        f"# Written {datetime.now(timezone.utc):%Y-%m-%d} with Python {sys.version.split()[0]} on {sys.platform}.",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header + pins) + "\n")
    print(f"lock_constraints: {len(pins)} pins -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
