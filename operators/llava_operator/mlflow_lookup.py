"""Read-only MLflow REST look-ups: the run a job logged for a pipeline phase, and the aliased version.

Jobs tag their runs with `llava.pipeline_id` and `llava.phase`; the operator finds them through
`/api/2.0/mlflow/runs/search`. Everything here is best effort: MLflow being down must never stop
a pipeline, so failures return None and the caller records the RayJob's job id instead.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import httpx

log = logging.getLogger(__name__)


def _client(tracking_uri: str, timeout: float) -> httpx.Client:
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    auth = httpx.BasicAuth(user, password) if user and password else None
    return httpx.Client(base_url=tracking_uri.rstrip("/"), timeout=timeout, auth=auth)


def _is_http(uri: str | None) -> bool:
    return bool(uri) and uri.startswith(("http://", "https://"))


def _post(http: httpx.Client, path: str, payload: dict[str, Any]) -> dict[str, Any]:
    response = http.post(path, json=payload)
    response.raise_for_status()
    return response.json()


def find_run_id(tracking_uri: str | None, pipeline_id: str, phase: str, timeout: float = 5.0) -> str | None:
    """Newest run tagged with this pipeline id and phase, across all experiments."""
    if not _is_http(tracking_uri):
        return None
    try:
        with _client(tracking_uri, timeout) as http:
            experiments = _post(http, "/api/2.0/mlflow/experiments/search", {"max_results": 1000})
            ids = [e["experiment_id"] for e in experiments.get("experiments", [])]
            if not ids:
                return None
            flt = f"tags.`llava.pipeline_id` = '{pipeline_id}' and tags.`llava.phase` = '{phase}'"
            runs = _post(http, "/api/2.0/mlflow/runs/search", {
                "experiment_ids": ids, "filter": flt, "max_results": 1,
                "order_by": ["attributes.start_time DESC"],
            })
    except (httpx.HTTPError, ValueError, KeyError) as err:
        log.warning("MLflow run look-up for %s/%s failed: %s", pipeline_id, phase, err)
        return None
    found = runs.get("runs") or []
    return found[0]["info"]["run_id"] if found else None


def alias_version(tracking_uri: str | None, model: str, alias: str, timeout: float = 5.0) -> str | None:
    """The registered model version an alias points at (None when unknown or unreachable)."""
    if not _is_http(tracking_uri):
        return None
    try:
        with _client(tracking_uri, timeout) as http:
            response = http.get("/api/2.0/mlflow/registered-models/alias", params={"name": model, "alias": alias})
            if response.status_code == 404:
                return None
            response.raise_for_status()
            return str(response.json()["model_version"]["version"])
    except (httpx.HTTPError, ValueError, KeyError) as err:
        log.warning("MLflow alias look-up %s@%s failed: %s", model, alias, err)
        return None
