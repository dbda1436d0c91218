"""Carry a reload from the replica that received `/admin/reload` to every replica of the deployment.

An HTTP request reaches one replica. That replica reloads at once and records the request in the
Ray cluster's key-value store (GCS) under the deployment's token; every replica compares that
record with the last one it applied on each health check (`health_check_period_s`) and reloads
when it is new. Replicas started later (autoscaling, restarts) start on the recorded model rather
than the one in the original config. The token is made once per `build_app` call, so a fresh
deployment of the app never inherits an old deployment's reload.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

NAMESPACE = "llava-serve"


@dataclass(frozen=True)
class ReloadRecord:
    id: str
    model_uri: str
    force: bool

    @staticmethod
    def new(model_uri: str, force: bool) -> ReloadRecord:
        return ReloadRecord(uuid.uuid4().hex, model_uri, force)


def new_token() -> str:
    return uuid.uuid4().hex


def _key(token: str) -> str:
    return f"reload/{token}"


def publish(token: str, record: ReloadRecord) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(_key(token), json.dumps(record.__dict__), overwrite=True, namespace=NAMESPACE)


def latest(token: str) -> ReloadRecord | None:
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():  # not inside a Ray worker (in-process use): nothing to follow
        return None
    raw = _internal_kv_get(_key(token), namespace=NAMESPACE)
    if not raw:
        return None
    data: dict[str, Any] = json.loads(raw)
    return ReloadRecord(str(data["id"]), str(data["model_uri"]), bool(data["force"]))
