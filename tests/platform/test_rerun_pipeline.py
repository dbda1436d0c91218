"""`make run` again in the same checkout: the pipeline trains every step anew and registers the next
version (Ray Train's checkpoints of the first run are not picked up); and `make run`'s output is
the pipeline's, not Ray's noise."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.platform.conftest import user_env

# Shorter than the first run: the second one only has to show that it trains and registers. (Before
# each run had its own checkpoint folder, it restored the first run's final step and trained none.)
RERUN_OVERRIDES = ["n_images=32", "lm_pretrain_steps=20", "clip_pretrain_steps=10",
                   'stage1_overrides=["optim.max_steps=6"]', 'stage2_overrides=["optim.max_steps=8"]']


def test_make_run_prints_each_step_once_and_no_ray_controller_spam(made_run):
    assert made_run.returncode == 0, made_run.output[-4000:]
    out = made_run.output
    assert out.count("stage 2 step 16/16 loss") == 1, "the last step line, once"
    assert "Failed to query Ray Train Controller actor state" not in out
    assert "PlacementGroupCleaner" not in out


@pytest.mark.slow
def test_second_run_in_the_same_workdir_trains_and_registers_the_next_version(made_run):
    from mlflow.tracking import MlflowClient

    assert made_run.returncode == 0, made_run.output[-4000:]
    work = made_run.workdir
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    first = json.loads((work / "pipeline_summary.json").read_text())
    before = max(int(v.version) for v in client.search_model_versions("name = 'llava-tiny'"))

    proc = subprocess.run([sys.executable, "-m", "jobs.pipeline", "workdir=.llava", *RERUN_OVERRIDES],
                          cwd=made_run.checkout, env={**user_env(), "MLFLOW_TRACKING_URI": uri},
                          capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode in (0, 3), out[-6000:]  # 3: trained and registered, refused by the gate
    second = json.loads((work / "pipeline_summary.json").read_text())
    for stage, steps in (("stage1", 6), ("stage2", 8)):
        run_id = second["runs"][stage]
        assert run_id != first["runs"][stage]
        assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, steps + 1))
        assert not client.get_metric_history(run_id, "resumed_at_step"), f"{stage} resumed the first run"
    assert int(second["version"]) == before + 1
    champion = str(client.get_model_version_by_alias("llava-tiny", "champion").version)
    verdict = "promoted to champion" if second["promoted"] else "NOT promoted to champion"
    assert f"registered llava-tiny v{second['version']}, {verdict}: " in out
    assert (champion == str(second["version"])) == second["promoted"]
