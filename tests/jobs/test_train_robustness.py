"""Training runs that a user repeats, resumes, or runs through a tracking-server restart, on real
Ray Train + DeepSpeed (CPU, gloo) and a real `mlflow server` over HTTP."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from jobs.train import CHECKPOINT_TAG, run_training
from llava_platform.config import ConfigError
from tests.fixtures.mlflow_server import start_mlflow_server, stop_mlflow_server
from tests.jobs.test_train import stage_cfg, weights


def steps_logged(run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in MlflowClient().get_metric_history(run_id, key))


@pytest.fixture
def sqlite_tracking(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.slow
def test_rerun_trains_from_scratch_and_only_a_named_resume_continues(ray_local, sqlite_tracking, tiny_checkpoints,
                                                                     shapes_data, tmp_path):
    common = ["optim.max_steps=4", "checkpoint.every_n_steps=2", "name=rerun"]
    stopped = run_training(stage_cfg(2, tiny_checkpoints, shapes_data, tmp_path, *common, "stop_after_steps=2"))
    # The same config again (same name, same checkpoint storage): a new run that trains every step.
    rerun = run_training(stage_cfg(2, tiny_checkpoints, shapes_data, tmp_path, *common))
    assert rerun.run_id != stopped.run_id
    assert steps_logged(rerun.run_id) == [1, 2, 3, 4]
    assert not MlflowClient().get_metric_history(rerun.run_id, "resumed_at_step")
    folders = {MlflowClient().get_run(r.run_id).data.tags[CHECKPOINT_TAG] for r in (stopped, rerun)}
    assert folders == {str(tmp_path / "ckpt" / f"rerun-{r.run_id}") for r in (stopped, rerun)}
    assert rerun.checkpoint.startswith(str(tmp_path / "ckpt" / f"rerun-{rerun.run_id}"))

    # Asked by name, the stopped run continues: same MLflow run, from its step-2 checkpoint, and it
    # ends on the same weights as the uninterrupted rerun.
    resumed = run_training(stage_cfg(2, tiny_checkpoints, shapes_data, tmp_path, *common,
                                     f"checkpoint.resume_run={stopped.run_id}", "output=" + str(tmp_path / "res")))
    assert resumed.run_id == stopped.run_id and resumed.metrics["step"] == 4
    assert steps_logged(stopped.run_id) == [1, 2, 3, 4]
    assert [m.value for m in MlflowClient().get_metric_history(stopped.run_id, "resumed_at_step")] == [2]
    assert MlflowClient().get_run(stopped.run_id).info.status == "FINISHED"
    a, b = weights(rerun.output), weights(resumed.output)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)

    with pytest.raises(ConfigError, match="no MLflow run 'nope'"):
        run_training(stage_cfg(2, tiny_checkpoints, shapes_data, tmp_path, *common, "checkpoint.resume_run=nope"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _restart_server_mid_training(uri: str, root: Path, port: int, state: dict) -> None:
    """Once two steps are in MLflow, stop the server for a while (training goes on), then start it
    again on the same port and store."""
    client = MlflowClient(uri)
    deadline = time.time() + 300
    while time.time() < deadline:
        exp = client.get_experiment_by_name("llava")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        # any run of the experiment: the newest one need not be the training run
        if any(len(client.get_metric_history(r.info.run_id, "loss")) >= 2 for r in runs):
            break
        time.sleep(0.3)
    stop_mlflow_server(state["proc"])
    state["down_ms"] = int(time.time() * 1000)
    time.sleep(6)
    state["proc"] = start_mlflow_server(root, port, str(root / "artifacts"))
    state["up_ms"] = int(time.time() * 1000)


@pytest.mark.slow
def test_training_survives_an_mlflow_server_restart(ray_local, tiny_checkpoints, shapes_data, tmp_path, monkeypatch):
    root = tmp_path / "mlflow"
    root.mkdir()
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    state = {"proc": start_mlflow_server(root, port, str(root / "artifacts"))}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # the client gives up on a refused connection after one quick retry (the default retries for
    # minutes); the metrics buffer's own back-off then takes over, which is what is under test
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    steps = 30
    cfg = stage_cfg(2, tiny_checkpoints, shapes_data, tmp_path, f"optim.max_steps={steps}", "name=outage",
                    "checkpoint.every_n_steps=5", "tracking.flush_interval_s=1", "distributed.max_failures=0")
    watcher = threading.Thread(target=_restart_server_mid_training, args=(uri, root, port, state))
    watcher.start()
    try:
        result = run_training(cfg)
        watcher.join()
        assert "up_ms" in state, "the server was not restarted during the test"
        assert result.metrics["step"] == steps
        history = MlflowClient().get_metric_history(result.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(1, steps + 1)), "every step once, none lost"
        during = [m.step for m in history if state["down_ms"] <= m.timestamp <= state["up_ms"]]
        assert during, "no step ran while the server was down: the test did not exercise the outage"
        run = MlflowClient().get_run(result.run_id)
        assert run.info.status == "FINISHED"
        assert any(k.startswith("system/") for k in run.data.metrics), "system metrics also recorded"
        assert (Path(result.output) / "model.safetensors").exists()
    finally:
        watcher.join()
        stop_mlflow_server(state["proc"])
