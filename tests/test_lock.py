"""requirements/constraints.txt (written by `make lock`) is what a fresh machine installs: it must
satisfy pyproject.toml's ranges, cover every dependency, and be what the tests run with."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the project's CI runs 3.11
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "constraints.txt"
REFRESH = "run `make lock` in a venv where `make test` passed"


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{LOCK.name}: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    return [r for r in map(Requirement, reqs) if r.marker is None or r.marker.evaluate()]


def test_lock_pins_every_dependency_within_its_range():
    pins = locked()
    missing = [str(r) for r in project_requirements() if canonicalize_name(r.name) not in pins]
    assert not missing, f"not in {LOCK.name}: {missing}; {REFRESH}"
    outside = [f"{r} (locked {pins[canonicalize_name(r.name)]})" for r in project_requirements()
               if not r.specifier.contains(pins[canonicalize_name(r.name)], prereleases=True)]
    assert not outside, f"locked versions outside pyproject.toml's ranges: {outside}; {REFRESH}"


def test_the_tests_run_with_the_locked_versions():
    drifted = []
    for name, version in locked().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # pinned for another platform or Python, or an optional extra's dependency
        if installed.split("+")[0] != version:
            drifted.append(f"{name} {installed} (locked {version})")
    assert not drifted, f"installed versions differ from {LOCK.name}: {drifted}; {REFRESH}"


def test_make_lock_pins_this_venv_without_the_project_or_local_build_labels(tmp_path):
    import subprocess

    out = tmp_path / "constraints.txt"
    subprocess.run([sys.executable, str(ROOT / "tools" / "lock_constraints.py"), "--output", str(out)], check=True,
                   capture_output=True, text=True)
    pins = dict(line.split("==") for line in out.read_text().splitlines() if line and not line.startswith("#"))
    assert pins["torch"] == "2.13.0"  # the venv has 2.13.0+cpu: the label would not match a CUDA wheel
    assert pins["ray"] == metadata.version("ray") and pins["mlflow"] == metadata.version("mlflow")
    assert "llava-platform" not in pins and "pip" not in pins
