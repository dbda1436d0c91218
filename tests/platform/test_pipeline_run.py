"""`llavactl run` end to end as a user runs it: a subprocess on the embedded default, then the
champion loaded from the registry with plain transformers.

Named to run before test_readme_walk.py and test_rerun_pipeline.py, which promote and register more
versions in the same session work dir (the second run may keep the first champion)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


@pytest.mark.slow
def test_llavactl_run_end_to_end(made_run, tmp_path):
    workdir, out = made_run.workdir, made_run.output
    assert made_run.returncode == 0, out[-6000:]
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
        # the gradient-norm curve is real at every step (it was NaN under ZeRO-0 fp32)
        norms = [m.value for m in client.get_metric_history(run.info.run_id, "grad_norm")]
        assert norms and all(math.isfinite(v) and v > 0 for v in norms), norms

    # The champion loads with plain transformers straight from the artifact store and answers.
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    # The version is an MLflow Model; its llava-hf files are at artifacts/llava_hf (llava_platform.logged_model).
    root = Path(mlflow.artifacts.download_artifacts("models:/llava-tiny@champion", dst_path=str(tmp_path / "champion")))
    assert (root / "MLmodel").is_file()
    local = root / "artifacts" / "llava_hf"
    model = AutoModelForImageTextToText.from_pretrained(local)
    processor = AutoProcessor.from_pretrained(local)
    image = Image.open(sorted(Path(workdir, "data", "images").glob("shapes_eval_*.png"))[0])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes are there?"}]}]
    inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True), images=[image],
                       return_tensors="pt")
    out_ids = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = processor.decode(out_ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip(), "the champion produced no text"

    # ... and through MLflow's own loader, as pyfunc, in the OpenAI chat format
    from llava_platform.logged_model import image_data_url

    request = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_data_url(image)}},
        {"type": "text", "text": "How many shapes are there?"}]}], "max_tokens": 12}
    [reply] = mlflow.pyfunc.load_model("models:/llava-tiny@champion").predict(request)
    assert reply["text"] and reply["usage"]["completion_tokens"] >= 1
