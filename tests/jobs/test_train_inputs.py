"""jobs.train on the driver: inputs are checked before any MLflow run or Ray starts, a failure is one
line naming the key, and a run that fails after it was created (before training) is FAILED."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from jobs.train import main as train_main
from jobs.train import run_training
from jobs.train_config import TrainConfig
from llava_platform.config import load_config
from llava_platform.preflight import InputError

CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "tiny_stage1.yaml"


def _cfg(tmp_path, shapes_data, vision: str, lm: str, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, CONFIG, [
        f"model.vision={vision}", f"model.language_model={lm}", f"data.records={shapes_data.stage1}",
        f"data.image_root={shapes_data.image_root}", f"checkpoint.storage={tmp_path / 'ckpt'}",
        f"output={tmp_path / 'out'}", "optim.global_batch=8", "optim.micro_batch=2", *extra])


def test_missing_model_dir_fails_before_any_run(tmp_path, shapes_data, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = _cfg(tmp_path, shapes_data, str(tmp_path / "no-vision"), "lmsys/vicuna-7b-v1.5")
    with pytest.raises(InputError, match=r"^model.vision: model directory .*/no-vision does not exist$"):
        run_training(cfg)
    assert not MlflowClient(uri).search_experiments(filter_string="name = 'llava'"), "no run before the checks pass"
    # the entrypoint as a user runs it: exit 2, the cause on the first line, no traceback
    code = train_main(["--config", str(CONFIG), f"model.vision={tmp_path / 'no-vision'}",
                       f"data.records={shapes_data.stage1}"])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines()[-1].startswith("python -m jobs.train: model.vision: model directory")
    assert "Traceback" not in err


def test_failure_after_the_run_started_marks_it_failed(tmp_path, shapes_data, tiny_checkpoints, monkeypatch):
    import jobs.train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    def cluster_gone():
        raise ConnectionError("the Ray cluster went away")

    monkeypatch.setattr(jobs.train, "_ray_init", cluster_gone)  # the failure injected between run start and fit
    with pytest.raises(ConnectionError):
        # The URI named in the config: an earlier test of the session may have set another one
        # in this process, which would win over MLFLOW_TRACKING_URI.
        run_training(_cfg(tmp_path, shapes_data, *map(str, tiny_checkpoints), f"tracking.tracking_uri={uri}"))
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("llava").experiment_id])
    assert run.info.status == "FAILED"
