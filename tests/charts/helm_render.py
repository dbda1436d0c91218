"""Run the real helm binary on charts/llava-platform and parse what it renders."""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "llava-platform"
VALUES_FILES = sorted((CHART / "ci").glob("*.yaml"))


def helm_binary() -> str:
    """helm on PATH or the one tools/install_helm.sh put in .tools/bin; a missing helm fails the test."""
    found = shutil.which("helm") or (str(REPO_ROOT / ".tools/bin/helm")
                                     if (REPO_ROOT / ".tools/bin/helm").exists() else None)
    if not found:
        pytest.fail("no helm binary: run `bash tools/install_helm.sh` (make test does) or put helm on PATH")
    return found


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@cache
def _render(values_file: str, extra: tuple[str, ...]) -> tuple:
    args = ["template", "llava", str(CHART), "--namespace", "ml", "--include-crds"]
    if values_file:
        args += ["-f", values_file]
    for item in extra:
        args += ["--set", item]
    out = helm(*args).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def render(values_file: Path | None = None, *sets: str) -> list[dict]:
    """Every object helm renders (CRDs included); cached per values file and --set list."""
    return [dict(d) for d in _render(str(values_file) if values_file else "", tuple(sets))]


def pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) for every pod template in a rendered object, Ray CRDs included."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [(kind, spec["template"]["spec"])]
    if kind == "RayService":
        spec = spec["rayClusterConfig"]
    if kind in ("RayCluster", "RayService"):
        pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
        pods += [(g["groupName"], g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]
        return pods
    return []
