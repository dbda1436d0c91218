"""jobs.evaluate end to end on CPU: tiny model from the registry, synthetic held-out data, loopback judge.

The tiny model answers nonsense, so the numbers are near zero; what is checked is that every item is
scored, the scores agree with the scorers applied to the recorded replies, the outputs are written,
and the metrics reach the MLflow run and the registry version where the gate reads them.
"""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path

import pytest

from llava.eval import scienceqa, shapes
from llava_platform import registry as reg
from tests.eval.judge_server import JudgeServer

CONFIG = Path(__file__).resolve().parents[2] / "jobs/configs/evaluate_shapes.yaml"


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    from llava.data.synthetic import write_shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root, 2, n_eval=2, image_size=32)
    return root


def _judge_reply(messages):
    from llava.eval.judge import load_rules

    if load_rules()["detail"].prompt in messages[-1]["content"]:
        return "sorry, no scores"  # detail questions: unparseable on purpose
    return "8, 2\nThe reference is right."


def test_evaluate_registry_model_with_judge(mlflow_sqlite, tiny_llava_dir, shapes_data, tmp_path, monkeypatch,
                                            capsys):
    from jobs.evaluate import main as evaluate_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("JUDGE_TEST_KEY", "judge-test-key")
    client = mlflow_sqlite.client()
    name = f"llava-{uuid.uuid4().hex[:6]}"
    run_id = mlflow_sqlite.log_model_dir(Path(tiny_llava_dir))
    version = reg.register_version(name, run_id, client=client)
    out = tmp_path / "eval-out"
    with JudgeServer(_judge_reply) as server:
        code = evaluate_main([
            "--config", str(CONFIG), f"model=models:/{name}@candidate", f"data_dir={shapes_data}",
            f"output_dir={out}", f"cache_dir={tmp_path / 'cache'}", f"tracking.tracking_uri={mlflow_sqlite.tracking_uri}",
            "judge.enabled=true", f"judge.base_url={server.base_url}", "judge.api_key_env=JUDGE_TEST_KEY",
            "judge.model=loopback-judge", "judge.backoff_base_s=0", "generation.batch_size=4",
            "bench.max_new_tokens=12", "tracking.record_on_version=true",
        ])
    assert code == 0
    (out,) = out.iterdir()  # the evaluation's own folder
    results = json.loads((out / "results.json").read_text())
    assert (out / "report.md").read_text().startswith(f"# Evaluation of `models:/{name}@candidate`")
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    qa = [json.loads(x) for x in (shapes_data / "eval/shapes_qa.jsonl").read_text().splitlines()]
    sqa = [json.loads(x) for x in (shapes_data / "eval/scienceqa.jsonl").read_text().splitlines()]
    rows = results["shapes"]["rows"]
    assert len(rows) == len(qa) and results["shapes"]["n"] == len(qa)
    rescored = shapes.score_shapes(qa, [r["prediction"] for r in rows])
    assert rescored["accuracy"] == results["shapes"]["accuracy"]
    rescored = scienceqa.score_scienceqa(sqa, [r["reply"] for r in results["scienceqa"]["rows"]])
    assert rescored["accuracy"] == results["scienceqa"]["accuracy"]
    assert rescored["unparseable"] == results["scienceqa"]["unparseable"]

    judged = results["judge"]
    per_cat = judged["scores"]["per_category"]
    n_images = len((shapes_data / "eval/captions.jsonl").read_text().splitlines())
    assert per_cat["detail"]["unparseable"] == per_cat["detail"]["n"] == n_images
    assert per_cat["conv"]["relative"] == pytest.approx(25.0)  # 2 / 8 * 100, from the loopback judge
    assert judged["scores"]["overall"]["unparseable"] == n_images
    assert len(server.requests) == 3 * n_images

    # metrics on the MLflow run and on the registry version (what the gate reads)
    metrics = results["metrics"]
    eval_run = client.get_run(results["eval_run_id"])
    assert eval_run.data.tags["llava.phase"] == "evaluate"
    assert eval_run.data.tags["llava.evaluated_run_id"] == run_id
    assert eval_run.data.metrics["shapes.accuracy"] == pytest.approx(metrics["shapes.accuracy"])
    assert eval_run.data.metrics["judge.relative_score"] == pytest.approx(25.0)
    artifacts = {a.path for a in client.list_artifacts(eval_run.info.run_id, "eval")}
    assert {"eval/results.json", "eval/report.md", "eval/chart.png"} <= artifacts
    mv = client.get_model_version(name, version)
    assert reg.version_metrics(mv)["scienceqa.accuracy"] == pytest.approx(metrics["scienceqa.accuracy"])
    assert mv.tags["llava.eval_run_id"] == eval_run.info.run_id
    assert not (tmp_path / "mlruns").exists()

    # A quick --limit look afterwards, as a user runs it: a folder of its own, the version's
    # recorded metrics (the gate's evidence) untouched; asking to record it is refused up front.
    from llava_platform.commands import eval as eval_cmd

    recorded = dict(client.get_model_version(name, version).tags)
    parser = argparse.ArgumentParser(prog="llavactl")
    eval_cmd.register(parser.add_subparsers(dest="command", required=True))
    quick = ["eval", "--model", f"models:/{name}@candidate", "--data", str(shapes_data), "--out", str(out.parent),
             "--limit", "1", "--tracking-uri", mlflow_sqlite.tracking_uri, f"cache_dir={tmp_path / 'cache'}"]
    args = parser.parse_args(quick)
    assert args.func(args) == 0
    assert len(list(out.parent.iterdir())) == 2 and (out / "report.md").exists()
    assert dict(client.get_model_version(name, version).tags) == recorded
    args = parser.parse_args([*quick, "--record"])
    assert args.func(args) == 2
    assert "never recorded" in capsys.readouterr().err


def test_evaluate_rejects_bad_config_and_missing_data(tmp_path, capsys, tiny_llava_dir):
    from jobs.evaluate import main as evaluate_main

    assert evaluate_main(["--config", str(CONFIG), "shapes.limit=0"]) == 2
    assert "shapes.limit" in capsys.readouterr().err
    code = evaluate_main(["--config", str(CONFIG), f"model={tiny_llava_dir}", f"data_dir={tmp_path}",
                          "tracking.enabled=false", f"output_dir={tmp_path / 'out'}"])
    assert code == 2
    assert "shapes_qa.jsonl does not exist" in capsys.readouterr().err


def test_llavactl_eval_on_a_local_model_without_a_store(tiny_llava_dir, shapes_data, tmp_path, monkeypatch, capsys):
    from llava_platform.commands import eval as eval_cmd

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    parser = argparse.ArgumentParser(prog="llavactl")
    eval_cmd.register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli-out"
    args = parser.parse_args(["eval", "--model", str(tiny_llava_dir), "--data", str(shapes_data), "--out", str(out),
                              "--limit", "2", "--workdir", str(tmp_path / "no-store"),
                              "generation.batch_size=2"])
    assert args.func(args) == 0
    assert "results are written locally only" in capsys.readouterr().err
    (folder,) = out.iterdir()
    results = json.loads((folder / "results.json").read_text())
    assert results["shapes"]["n"] == 2 and results["scienceqa"]["n"] == 2
    assert "judge" not in results and results["eval_run_id"] is None
    # registry URIs need a store: refused up front with a message saying so
    args = parser.parse_args(["eval", "--model", "models:/llava@champion", "--workdir", str(tmp_path / "no-store")])
    with pytest.raises(SystemExit, match="needs an MLflow store"):
        args.func(args)


def test_evaluate_s3_model_and_data_against_http_server(mlflow_server, tiny_llava_dir, shapes_data, tmp_path,
                                                       monkeypatch):
    """The Kubernetes shape: model and data in S3, tracking on an `mlflow server` with S3 artifacts."""
    from jobs.evaluate import EvaluateConfig, run_evaluation
    from llava_platform import storage
    from llava_platform.config import load_config

    monkeypatch.chdir(tmp_path)
    bucket = f"eval-{uuid.uuid4().hex[:8]}"
    storage.default().s3_client().create_bucket(Bucket=bucket)
    storage.upload_dir(tiny_llava_dir, f"s3://{bucket}/models/tiny")
    storage.upload_dir(shapes_data, f"s3://{bucket}/data")
    cfg = load_config(EvaluateConfig, CONFIG, [
        f"model=s3://{bucket}/models/tiny", f"data_dir=s3://{bucket}/data", f"output_dir={tmp_path / 'out'}",
        f"cache_dir={tmp_path / 'cache'}", f"tracking.tracking_uri={mlflow_server.tracking_uri}",
        "shapes.limit=2", "scienceqa.limit=3", "generation.batch_size=3"])
    results = run_evaluation(cfg)
    assert results["shapes"]["n"] == 2 and results["scienceqa"]["n"] == 3
    run = mlflow_server.client().get_run(results["eval_run_id"])
    assert run.data.tags["llava.model_uri"] == f"s3://{bucket}/models/tiny"
    assert run.data.metrics["scienceqa.accuracy"] == pytest.approx(results["metrics"]["scienceqa.accuracy"])
    keys = [o["Key"] for o in storage.default().s3_client().list_objects_v2(Bucket=mlflow_server.bucket)["Contents"]]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/eval/report.md") for k in keys)


def test_pipeline_model_reference_finds_the_stage2_run(mlflow_sqlite, monkeypatch):
    from jobs.evaluate import EvaluateConfig, identify_model

    client = mlflow_sqlite.client()
    pipeline = f"pipe-{uuid.uuid4().hex[:6]}"
    run = client.create_run(mlflow_sqlite.new_experiment(), tags={"llava.pipeline_id": pipeline, "llava.phase": "stage2"})
    cfg = EvaluateConfig(model="pipeline:stage2", data_dir="unused",
                         tracking={"tracking_uri": mlflow_sqlite.tracking_uri})
    monkeypatch.setenv("LLAVA_PIPELINE_ID", pipeline)
    info = identify_model(cfg)
    assert info["resolve_uri"] == f"runs:/{run.info.run_id}/model" and info["run_id"] == run.info.run_id
    monkeypatch.setenv("LLAVA_PIPELINE_ID", "another-pipeline")
    with pytest.raises(ValueError, match="no MLflow run tagged"):
        identify_model(cfg)
