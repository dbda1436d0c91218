"""MetricBuffer on a real sqlite MLflow store: per-step metrics written in batches keep every step's
number, value and timestamp, and nothing is lost at flush time."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from llava_platform import tracking


@pytest.fixture
def run_id(tmp_path):
    previous = mlflow.get_tracking_uri()
    tracking.configure(f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield tracking.start_job_run("buffer-test", "run", "stage2")
    mlflow.set_tracking_uri(previous)


def history(run_id: str, key: str) -> list[tuple[int, float, int]]:
    return sorted((m.step, m.value, m.timestamp) for m in MlflowClient().get_metric_history(run_id, key))


def test_buffered_steps_reach_mlflow_with_their_own_step_and_timestamp(run_id):
    buf = tracking.MetricBuffer(run_id, interval_s=3600, max_steps=1000)
    for step in range(1, 6):
        buf.add({"loss": 1.0 / step, "lr": 1e-3, "skipped": None}, step=step, timestamp_ms=1_000 * step)
    assert history(run_id, "loss") == [], "held until the interval or a flush, not one write per step"
    buf.flush()
    assert history(run_id, "loss") == [(s, pytest.approx(1.0 / s), 1_000 * s) for s in range(1, 6)]
    assert [s for s, _, _ in history(run_id, "lr")] == [1, 2, 3, 4, 5]
    assert history(run_id, "skipped") == []
    buf.flush()  # nothing pending: writes nothing more
    assert len(history(run_id, "loss")) == 5


def test_max_steps_and_zero_interval_flush_on_their_own(run_id):
    by_count = tracking.MetricBuffer(run_id, interval_s=3600, max_steps=3)
    for step in range(1, 5):
        by_count.add({"a": step}, step=step, timestamp_ms=step)
    assert [s for s, _, _ in history(run_id, "a")] == [1, 2, 3]  # the 4th waits for the next batch
    by_time = tracking.MetricBuffer(run_id, interval_s=0.0)
    by_time.add({"b": 7.0}, step=1, timestamp_ms=1)
    assert history(run_id, "b") == [(1, 7.0, 1)]


def test_a_batch_larger_than_mlflows_limit_is_split(run_id):
    buf = tracking.MetricBuffer(run_id, interval_s=3600, max_steps=10_000)
    for step in range(300):  # 4 metrics x 300 steps = 1200 > 1000 per request
        buf.add({f"m{i}": float(step) for i in range(4)}, step=step, timestamp_ms=step)
    buf.flush()
    assert [len(history(run_id, f"m{i}")) for i in range(4)] == [300] * 4
