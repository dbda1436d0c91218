"""Evaluation benchmarks come from one table (jobs.evaluate.BENCHMARKS): an entry added there runs
with the others and reports under its key; images are prepared as the model's metadata record says."""

from __future__ import annotations

import shutil
from pathlib import Path

from jobs import evaluate as ev
from llava.model.metadata import ModelMetadata, write_metadata
from llava_platform.config import load_config

CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "evaluate_shapes.yaml"


def test_an_added_benchmark_runs_and_images_follow_the_model_record(tiny_llava_dir, shapes_data, tmp_path,
                                                                     monkeypatch):
    seen: list[str] = []

    def count_questions(cfg, model, processor, images):
        seen.append(cfg.generation.image_mode)
        return {"n": len(ev.load_items(cfg, "shapes"))}

    monkeypatch.setitem(ev.BENCHMARKS, "shape_count", ev.Benchmark("shapes", "eval/shapes_qa.jsonl", count_questions))
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llava_dir, model_dir)
    write_metadata(model_dir, ModelMetadata(template="vicuna_v1", image_mode="resize", image_tokens_per_image=16,
                                            stop_token_ids=(2,)))
    cfg = load_config(ev.EvaluateConfig, CONFIG, [
        f"model={model_dir}", f"data_dir={shapes_data.root}", "tracking.enabled=false", "tracking.record_on_version=false",
        f"output_dir={tmp_path / 'out'}", "shapes.limit=2", "scienceqa.enabled=false"])
    results = ev.run_evaluation(cfg)
    assert results["shape_count"] == {"n": 2} and results["shapes"]["n"] == 2 and "scienceqa" not in results
    assert seen == ["resize"]
