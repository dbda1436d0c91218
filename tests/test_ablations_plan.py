"""benchmarks/ablations.py is long-running and never runs in the suite; its plan does, so the
script keeps reading the shipped recipe (configs) it claims to ablate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_ablations_dry_run_reads_the_shipped_recipe():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ablations.py"), "--dry-run"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = yaml.safe_load((REPO / "jobs" / "configs" / "pipeline_tiny.yaml").read_text())
    stage2 = yaml.safe_load((REPO / "jobs" / "configs" / "tiny_stage2.yaml").read_text())
    assert f"{pipe['n_images']} images of {pipe['image_size']} px" in proc.stdout
    assert f"stage 2 {stage2['optim']['max_steps']} steps" in proc.stdout
    variants = [line.split()[1].rstrip(":") for line in proc.stdout.splitlines() if line.startswith("variant ")]
    assert variants == ["both_stages", "no_stage1", "layer_-1", "linear"]
