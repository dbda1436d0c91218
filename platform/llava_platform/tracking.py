"""MLflow conventions: where runs go, how they nest, how they are tagged.

Every job run carries `llava.pipeline_id` / `llava.phase` (from the environment the operator or
`llavactl run` sets) so a pipeline's runs can be found without knowing their ids.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from llava_platform.config import flatten

PIPELINE_ID_ENV = "LLAVA_PIPELINE_ID"
PHASE_ENV = "LLAVA_PIPELINE_PHASE"
PARENT_RUN_ENV = "LLAVA_PARENT_RUN_ID"

_log = logging.getLogger(__name__)


# The embedded stack's directory (`make run`, `llavactl run`, the CLI's --workdir default).
DEFAULT_WORKDIR = ".llava"


def embedded_tracking_uri(workdir: str | Path) -> str:
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def configure(tracking_uri: str | None = None) -> str:
    """Use `tracking_uri`, else MLFLOW_TRACKING_URI, else the URI already set in this process, else the
    embedded store that `make run` writes (`sqlite:///.llava/mlflow.db`, artifacts beside it), said
    on stderr. Never MLflow's own default: ./mlflow.db and ./artifacts in whatever directory a job
    happens to run from. Returns the URI in use."""
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    # The environment names the store of the job at hand (a Ray job's runtime env, llavactl run):
    # it wins over a URI that earlier work in the same process left set, which MLflow would prefer.
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    elif not is_tracking_uri_set():
        default = embedded_tracking_uri(DEFAULT_WORKDIR)
        Path(DEFAULT_WORKDIR).mkdir(parents=True, exist_ok=True)
        print(f"[llava] no MLflow tracking URI (MLFLOW_TRACKING_URI) set: using the embedded store {default}",
              file=sys.stderr, flush=True)
        mlflow.set_tracking_uri(default)
    return mlflow.get_tracking_uri()


def sqlite_artifact_location(tracking_uri: str) -> str | None:
    """For an embedded sqlite store, artifacts live beside the database (not ./mlruns in the cwd)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "artifacts").as_uri()


def ensure_experiment(name: str, artifact_location: str | None = None) -> str:
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = artifact_location or sqlite_artifact_location(mlflow.get_tracking_uri())
    return client.create_experiment(name, artifact_location=location)


def run_tags(phase: str | None = None, parent_run_id: str | None = None) -> dict[str, str]:
    tags = {}
    if os.environ.get(PIPELINE_ID_ENV):
        tags["llava.pipeline_id"] = os.environ[PIPELINE_ID_ENV]
    phase = phase or os.environ.get(PHASE_ENV)
    if phase:
        tags["llava.phase"] = phase
    parent = parent_run_id or os.environ.get(PARENT_RUN_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent  # how MLflow nests runs across processes
    return tags


def start_job_run(experiment: str, run_name: str, phase: str, parent_run_id: str | None = None) -> str:
    """Create the run for one job (not made active here: workers log to it by id)."""
    exp_id = ensure_experiment(experiment)
    run = MlflowClient().create_run(exp_id, run_name=run_name, tags=run_tags(phase, parent_run_id))
    return run.info.run_id


def log_params(run_id: str, params: dict[str, Any]) -> None:
    flat = flatten(params)
    items = [Param(k, str(v)[:6000]) for k, v in sorted(flat.items())]
    client = MlflowClient()
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(run_id: str, metrics: dict[str, float], step: int, timestamp_ms: int) -> None:
    items = [Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items() if v is not None]
    MlflowClient().log_batch(run_id, metrics=items)


class MetricBuffer:
    """Per-step metrics held in memory and written to the run by a background thread, in one batch
    every `interval_s` seconds (or `max_steps` steps), and whenever `flush` is called.

    Why a buffer: a `log_batch` call is a store round trip (~6 ms of CPU on sqlite, a request on a
    tracking server) that the training step would otherwise wait for at every step; the lead worker
    also holds the other ranks at the next collective meanwhile. Every step keeps its own step number
    and timestamp, so the recorded history is the same as with per-step logging.

    Why a thread that never raises: a tracking server that restarts or drops off the network must not
    end a training run. A failed write keeps its metrics (the oldest beyond `max_pending` are dropped,
    and counted), is retried with exponential back-off up to `max_backoff_s`, and is reported once
    per outage as a warning; when the server answers again the whole history lands. `flush` waits
    at most `wait_s`, and `close` (the end of the run) at most `final_wait_s` for an outage to end.
    A worker killed during an outage loses what was not yet written (the restarted run resumes
    after its checkpoint and does not log those steps again).
    """

    MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch request

    def __init__(self, run_id: str, *, interval_s: float = 10.0, max_steps: int = 100, max_pending: int = 500_000,
                 wait_s: float = 10.0, final_wait_s: float = 600.0, max_backoff_s: float = 60.0):
        self.run_id = run_id
        self.interval_s = interval_s
        self.max_steps = max_steps
        self.max_pending = max_pending
        self.wait_s = wait_s
        self.final_wait_s = final_wait_s
        self.max_backoff_s = max_backoff_s
        self._cond = threading.Condition()
        self._pending: deque[Metric] = deque()
        self._added = 0  # metrics handed to the buffer
        self._done = 0  # of those, written or dropped
        self.dropped = 0
        self.last_step = 0  # the highest step added so far
        self._steps = 0
        self._wanted = 0  # write everything up to this `_added` count as soon as possible
        self._last_write = time.monotonic()
        self._failures = 0
        self._outage_started: float | None = None
        self._warned_slow = False
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="mlflow-metrics-writer", daemon=True)
        self._writer.start()

    def add(self, metrics: dict[str, float], step: int, timestamp_ms: int) -> None:
        with self._cond:
            before = len(self._pending)
            self._pending.extend(Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items() if v is not None)
            self._added += len(self._pending) - before
            self.last_step = max(self.last_step, step)
            self._steps += 1
            self._drop_beyond_bound()
            if self._steps >= self.max_steps or time.monotonic() - self._last_write >= self.interval_s:
                self._request_write()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Write everything added so far; wait up to `timeout_s` (default: `wait_s`, or not at all
        while the store is known to be failing or slow). True when everything is written."""
        with self._cond:
            if timeout_s is None:
                timeout_s = 0.0 if self._outage_started is not None or self._warned_slow else self.wait_s
            target = self._added
            self._request_write()
            done = self._cond.wait_for(lambda: self._done >= target, timeout=timeout_s)
            if not done and timeout_s > 0 and not self._warned_slow:
                self._warned_slow = True
                _log.warning("MLflow has not taken the metrics of run %s for %.0f s (%d pending); training goes "
                             "on and the writes are retried", self.run_id, timeout_s, len(self._pending))
            return done

    def close(self) -> bool:
        """The end of the run: wait up to `final_wait_s` for everything to be written, then stop the
        writer. Returns whether the whole history was written; what was not is named in a warning."""
        written = self.flush(self.final_wait_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            lost = len(self._pending)
        self._writer.join(timeout=5)
        if lost or self.dropped:
            _log.warning("run %s: %d metric values could not be written to MLflow (%d dropped over the buffer "
                         "bound of %d)", self.run_id, lost + self.dropped, self.dropped, self.max_pending)
        return written and not self.dropped

    def _request_write(self) -> None:
        self._wanted = self._added
        self._steps = 0
        self._cond.notify_all()

    def _drop_beyond_bound(self) -> None:
        excess = len(self._pending) - self.max_pending
        if excess <= 0:
            return
        if not self.dropped:
            _log.warning("run %s: more than %d metric values waiting for MLflow; dropping the oldest",
                         self.run_id, self.max_pending)
        for _ in range(excess):
            self._pending.popleft()
        self.dropped += excess
        self._done += excess
        self._cond.notify_all()

    def _write_loop(self) -> None:
        client = MlflowClient()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or (self._pending and self._done < self._wanted)
                                    or (self._pending and time.monotonic() - self._last_write >= self.interval_s),
                                    timeout=self.interval_s)
                if self._closed:
                    return
                if not self._pending:
                    continue
                batch = [self._pending.popleft() for _ in range(min(self.MAX_BATCH, len(self._pending)))]
            try:
                client.log_batch(self.run_id, metrics=batch)
            except Exception as err:  # any failure of the store: keep the batch, back off, retry
                with self._cond:
                    self._pending.extendleft(reversed(batch))
                    self._drop_beyond_bound()
                self._backoff(err)
                continue
            with self._cond:
                self._done += len(batch)
                self._last_write = time.monotonic()
                if self._outage_started is not None:
                    _log.warning("MLflow reachable again after %.0f s; the buffered metrics of run %s are being "
                                 "written", time.monotonic() - self._outage_started, self.run_id)
                self._failures = 0
                self._outage_started = None
                self._warned_slow = False
                self._cond.notify_all()

    def _backoff(self, err: Exception) -> None:
        self._failures += 1
        if self._outage_started is None:
            self._outage_started = time.monotonic()
            _log.warning("MLflow write for run %s failed (%s: %s); training goes on, %d metric values are kept "
                         "and retried with back-off", self.run_id, type(err).__name__, str(err)[:200],
                         len(self._pending))
        delay = min(self.max_backoff_s, 2.0 ** (self._failures - 1))
        with self._cond:
            self._cond.wait_for(lambda: self._closed, timeout=delay)


class SystemMetricsSampler:
    """CPU, memory, disk, network (and GPU) of this node, sampled every `interval_s` into a
    `MetricBuffer` as `system/...` metrics at the latest step the buffer holds (the training step).

    MLflow's own SystemMetricsMonitor stops for good at its first failed request; sampling into the
    buffer instead makes an outage delay these metrics, as it does the training ones. It reuses that
    monitor's collectors (which find the GPUs) without starting its thread.
    """

    def __init__(self, buffer: MetricBuffer, *, interval_s: float = 2.0):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.buffer = buffer
        self.interval_s = interval_s
        # its constructor announces at INFO which collectors it skipped (no GPU): noise in every stage's log
        monitor_log = logging.getLogger(SystemMetricsMonitor.__module__)
        level = monitor_log.level
        monitor_log.setLevel(logging.WARNING)
        try:
            self._collectors = SystemMetricsMonitor(buffer.run_id, sampling_interval=interval_s).monitors
        finally:
            monitor_log.setLevel(level)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_loop, name="system-metrics-sampler", daemon=True)

    def start(self) -> SystemMetricsSampler:
        self._thread.start()
        return self

    def sample(self) -> None:
        """Collect and buffer one point (the loop's thread calls it once more at the end: runs shorter
        than the interval still record their system metrics)."""
        values: dict[str, float] = {}
        for collector in self._collectors:
            collector.collect_metrics()
            values.update({f"system/{k}": v for k, v in collector.aggregate_metrics().items()})
            collector.clear_metrics()
        self.buffer.add(values, step=self.buffer.last_step, timestamp_ms=int(time.time() * 1000))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 5)
        try:
            self.sample()
        except Exception as err:  # a collector that cannot read this machine: nothing to record
            _log.warning("system metrics: last sample failed (%s)", err)

    def _sample_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception as err:
                _log.warning("system metrics: sampling failed, stopping it (%s)", err)
                return


def set_tag(run_id: str, key: str, value: str) -> None:
    MlflowClient().set_tag(run_id, key, value)


def finish_run(run_id: str, status: str = "FINISHED", *, wait_s: float = 300.0) -> bool:
    """Mark the run ended. The work it records is done by now, so an unreachable store is retried
    with back-off for up to `wait_s` and then only warned about (the run stays RUNNING in MLflow)
    rather than failing the job. Returns whether the status was written."""
    deadline = time.monotonic() + wait_s
    delay = 1.0
    while True:
        try:
            MlflowClient().set_terminated(run_id, status=status)
            return True
        except Exception as err:  # store unreachable or erroring: the outcome itself is not in doubt
            if time.monotonic() + delay > deadline:
                _log.warning("could not mark MLflow run %s %s (%s); it stays RUNNING there", run_id, status, err)
                return False
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
