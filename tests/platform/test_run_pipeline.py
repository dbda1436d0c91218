"""`llavactl run` end to end as a user runs it: a subprocess on the embedded default, then the
champion loaded from the registry with plain transformers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_llavactl_run_end_to_end(tmp_path):
    workdir = tmp_path / "work"
    # The tiny preset, shortened: fewer images and steps keep the suite inside CI's budget.
    overrides = ["n_images=64", "lm_pretrain_steps=60", 'stage1_overrides=["optim.max_steps=12"]',
                 'stage2_overrides=["optim.max_steps=16"]']
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "llava_platform.cli", "run", "--workdir", str(workdir),
                           "--port", str(free_port()), *overrides],
                          env=env, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    for line in ("[pipeline] stage 1: done", "[pipeline] stage 2: done", "promoted to champion", "[run] answer:",
                 "/v1/chat/completions", "mlflow ui --backend-store-uri sqlite:///"):
        assert line in out, f"missing {line!r} in output:\n{out[-4000:]}"
    assert "stage 2 step 16/16 loss" in out  # progress was visible

    summary = json.loads((workdir / "pipeline_summary.json").read_text())
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    client = MlflowClient()
    mv = client.get_model_version_by_alias("llava-tiny", "champion")
    assert str(mv.version) == str(summary["version"])
    # Nested runs: both stages are children of the pipeline run.
    for stage in ("stage1", "stage2"):
        run = client.get_run(summary["runs"][stage])
        assert run.data.tags["mlflow.parentRunId"] == summary["pipeline_run_id"]
        assert len(client.get_metric_history(run.info.run_id, "loss")) > 0

    # The champion loads with plain transformers straight from the artifact store and answers.
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    local = mlflow.artifacts.download_artifacts("models:/llava-tiny@champion", dst_path=str(tmp_path / "champion"))
    model = AutoModelForImageTextToText.from_pretrained(local)
    processor = AutoProcessor.from_pretrained(local)
    image = Image.open(sorted(Path(workdir, "data", "images").glob("shapes_eval_*.png"))[0])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes are there?"}]}]
    inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True), images=[image],
                       return_tensors="pt")
    out_ids = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = processor.decode(out_ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip(), "the champion produced no text"
