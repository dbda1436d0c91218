"""MetricBuffer on a real sqlite MLflow store: per-step metrics written in batches keep every step's
number, value and timestamp, and nothing is lost at flush time."""

from __future__ import annotations

import time

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


def eventually(check, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "not written in time"
        time.sleep(0.05)


def test_max_steps_and_zero_interval_flush_on_their_own(run_id):
    by_count = tracking.MetricBuffer(run_id, interval_s=3600, max_steps=3)
    for step in range(1, 3):
        by_count.add({"a": step}, step=step, timestamp_ms=step)
    time.sleep(0.5)
    assert history(run_id, "a") == []  # below max_steps: nothing written yet
    by_count.add({"a": 3}, step=3, timestamp_ms=3)
    eventually(lambda: [s for s, _, _ in history(run_id, "a")] == [1, 2, 3])  # no flush() called
    by_time = tracking.MetricBuffer(run_id, interval_s=0.01)
    by_time.add({"b": 7.0}, step=1, timestamp_ms=1)
    eventually(lambda: history(run_id, "b") == [(1, 7.0, 1)])


def test_a_batch_larger_than_mlflows_limit_is_split(run_id):
    buf = tracking.MetricBuffer(run_id, interval_s=3600, max_steps=10_000)
    for step in range(300):  # 4 metrics x 300 steps = 1200 > 1000 per request
        buf.add({f"m{i}": float(step) for i in range(4)}, step=step, timestamp_ms=step)
    buf.flush()
    assert [len(history(run_id, f"m{i}")) for i in range(4)] == [300] * 4


def test_a_store_that_keeps_failing_never_raises_into_the_loop_and_the_buffer_stays_bounded(run_id, caplog):
    # a run id the store does not know: every write fails, as it would against an unreachable server
    buf = tracking.MetricBuffer("0" * 32, interval_s=0.01, max_pending=10, final_wait_s=1.0)
    for step in range(1, 31):
        buf.add({"loss": float(step)}, step=step, timestamp_ms=step)
    assert buf.flush() is False  # returns at once instead of raising
    assert buf.close() is False
    assert buf.dropped == 20  # the oldest beyond the bound, counted
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "training goes on" in messages and "could not be written" in messages


def test_system_metrics_are_sampled_into_the_buffer_at_the_training_step(run_id):
    buf = tracking.MetricBuffer(run_id, interval_s=3600)
    buf.add({"loss": 1.0}, step=7, timestamp_ms=1)
    sampler = tracking.SystemMetricsSampler(buf, interval_s=3600).start()
    sampler.stop()  # takes the last sample
    assert buf.close()
    cpu = history(run_id, "system/cpu_utilization_percentage")
    assert [step for step, _, _ in cpu] == [7]
