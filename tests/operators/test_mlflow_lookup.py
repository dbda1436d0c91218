"""The operator's MLflow REST look-ups against a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

from llava_operator.mlflow_lookup import alias_version, find_run_id


def _tagged_run(client, experiment_id: str, pipeline_id: str, phase: str) -> str:
    run = client.create_run(experiment_id, tags={"llava.pipeline_id": pipeline_id, "llava.phase": phase})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_finds_the_run_of_a_pipeline_phase(mlflow_server):
    client = mlflow_server.client()
    exp_a, exp_b = mlflow_server.new_experiment("lookup-a"), mlflow_server.new_experiment("lookup-b")
    stage1 = _tagged_run(client, exp_a, "uid-42", "stage1")
    stage2 = _tagged_run(client, exp_b, "uid-42", "stage2")
    _tagged_run(client, exp_a, "uid-other", "stage2")
    uri = mlflow_server.tracking_uri
    assert find_run_id(uri, "uid-42", "stage1") == stage1
    assert find_run_id(uri, "uid-42", "stage2") == stage2, "runs are searched across experiments"
    assert find_run_id(uri, "uid-42", "evaluate") is None


def test_alias_version_and_unreachable_or_local_stores(mlflow_server, tmp_path):
    client = mlflow_server.client()
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    run_id = mlflow_server.log_model_dir(model_dir)
    name = f"lookup-model-{run_id[:6]}"
    client.create_registered_model(name)
    client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id)
    second = client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id)
    client.set_registered_model_alias(name, "champion", second.version)
    assert alias_version(mlflow_server.tracking_uri, name, "champion") == str(second.version)
    assert alias_version(mlflow_server.tracking_uri, name, "nope") is None
    # Best effort: a dead server or a non-HTTP store answers None instead of failing the pipeline.
    assert find_run_id("http://127.0.0.1:9", "uid", "stage1", timeout=1.0) is None
    assert alias_version("sqlite:///x.db", name, "champion") is None
