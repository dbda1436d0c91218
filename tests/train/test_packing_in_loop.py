"""`data.packing=true` in the real training loop (Ray Train + DeepSpeed on CPU): the same samples per
micro-batch, so the same loss curve as padded batches, with less padding."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from jobs.train import run_training
from jobs.train_config import TrainConfig
from llava_platform.config import load_config

CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "tiny_stage2.yaml"


def history(run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.slow
def test_packed_training_follows_the_padded_loss_curve(ray_local, tiny_checkpoints, shapes_data, tmp_path,
                                                       monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    vision, lm = tiny_checkpoints
    runs = {}
    for packing in (False, True):
        name = f"packing-{packing}".lower()
        cfg = load_config(TrainConfig, CONFIG, [
            f"model.vision={vision}", f"model.language_model={lm}", "model.init_from=null",
            f"data.records={shapes_data.stage2}", f"data.image_root={shapes_data.image_root}",
            f"data.packing={str(packing).lower()}", "data.group_by_modality_length=false", "optim.max_steps=3",
            "optim.global_batch=16", "optim.micro_batch=4", "checkpoint.every_n_steps=100",
            f"checkpoint.storage={tmp_path / 'ckpt'}", f"output={tmp_path / name}", f"name={name}"])
        runs[packing] = run_training(cfg).run_id
    padded, packed = (history(runs[p], "loss") for p in (False, True))
    assert len(padded) == len(packed) == 3
    assert padded[0] != pytest.approx(padded[-1], rel=1e-3), "the runs should have trained"
    # Same samples in every micro-batch and an exact block mask: only float summation order differs.
    assert packed == pytest.approx(padded, rel=1e-4)
    pad_padded, pad_packed = (history(runs[p], "padding_fraction") for p in (False, True))
    assert sum(pad_packed) < sum(pad_padded)
