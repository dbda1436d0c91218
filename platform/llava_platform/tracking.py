"""MLflow conventions: where runs go, how they nest, how they are tagged.

Every job run carries `llava.pipeline_id` / `llava.phase` (from the environment the operator or
`llavactl run` sets) so a pipeline's runs can be found without knowing their ids.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from llava_platform.config import flatten

PIPELINE_ID_ENV = "LLAVA_PIPELINE_ID"
PHASE_ENV = "LLAVA_PIPELINE_PHASE"
PARENT_RUN_ENV = "LLAVA_PARENT_RUN_ID"


# The embedded stack's directory (`make run`, `llavactl run`, the CLI's --workdir default).
DEFAULT_WORKDIR = ".llava"


def embedded_tracking_uri(workdir: str | Path) -> str:
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def configure(tracking_uri: str | None = None) -> str:
    """Use `tracking_uri`, else the URI already set in this process or MLFLOW_TRACKING_URI, else the
    embedded store that `make run` writes (`sqlite:///.llava/mlflow.db`, artifacts beside it), said
    on stderr. Never MLflow's own default: ./mlflow.db and ./artifacts in whatever directory a job
    happens to run from. Returns the URI in use."""
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

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
    """Per-step metrics held in memory and written to the run in one batch every `interval_s` seconds
    (or `max_steps` steps), and whenever `flush` is called.

    Why: a `log_batch` call is a store round trip (~6 ms of CPU on sqlite, a request on a tracking
    server) that the training step would otherwise wait for at every step; the lead worker also
    holds the other ranks at the next collective meanwhile. Every step keeps its own step number and
    timestamp, so the recorded history is the same as with per-step logging. Callers flush before
    each checkpoint and at the end (also on errors): a worker killed in between loses only steps that
    come after its last checkpoint, which the restarted run trains, and logs, again.
    """

    MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch request

    def __init__(self, run_id: str, *, interval_s: float = 10.0, max_steps: int = 100):
        self.run_id = run_id
        self.interval_s = interval_s
        self.max_steps = max_steps
        self._pending: list[Metric] = []
        self._steps = 0
        self._last_flush = time.monotonic()

    def add(self, metrics: dict[str, float], step: int, timestamp_ms: int) -> None:
        self._pending.extend(Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items() if v is not None)
        self._steps += 1
        if self._steps >= self.max_steps or time.monotonic() - self._last_flush >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        client = MlflowClient() if self._pending else None
        while self._pending:
            # Dropped only once written: after a failed request the next flush retries the rest.
            client.log_batch(self.run_id, metrics=self._pending[: self.MAX_BATCH])
            del self._pending[: self.MAX_BATCH]
        self._steps = 0


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    MlflowClient().set_terminated(run_id, status=status)
