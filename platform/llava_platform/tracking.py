"""MLflow conventions: where runs go, how they nest, how they are tagged.

Every job run carries `llava.pipeline_id` / `llava.phase` (from the environment the operator or
`llavactl run` sets) so a pipeline's runs can be found without knowing their ids.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from llava_platform.config import flatten

PIPELINE_ID_ENV = "LLAVA_PIPELINE_ID"
PHASE_ENV = "LLAVA_PIPELINE_PHASE"
PARENT_RUN_ENV = "LLAVA_PARENT_RUN_ID"


def embedded_tracking_uri(workdir: str | Path) -> str:
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def configure(tracking_uri: str | None = None) -> str:
    """Use `tracking_uri`, else MLFLOW_TRACKING_URI, else MLflow's default; return the one in use."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
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


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    MlflowClient().set_terminated(run_id, status=status)
