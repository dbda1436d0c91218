"""kopf handlers for LlavaPipeline: a periodic reconcile that walks the state machine, and cleanup.

One timer per pipeline is the only writer of its status, so two handlers can never race on the
same pipeline. Each tick reads the child named in status.current, lets `phases.reconcile` decide,
creates the child it asks for (an existing child of that name counts as created: that is how a
restarted operator picks up where it stopped) and then returns the new status through `patch`.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

import kopf

from llava_operator import GROUP, PLURAL, VERSION, mlflow_lookup
from llava_operator.builders import LABEL_PIPELINE, build_rayjob, build_rayservice
from llava_operator.kube import RayObjects, load_config
from llava_operator.phases import FAILED, Decision, reconcile, set_condition
from llava_operator.spec import ConfigError, OperatorSettings, PipelineSpec, parse_spec

SETTINGS = OperatorSettings.from_env()
_ray: RayObjects | None = None


def ray() -> RayObjects:
    global _ray
    if _ray is None:
        _ray = RayObjects()
    return _ray


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, logger: logging.Logger, **_: Any) -> None:
    # Only the namespaces and resources given at start-up are served: no cluster-wide list/watch of
    # namespaces or CRDs, which keeps the RBAC to what the operator really touches.
    settings.scanning.disabled = True
    settings.persistence.finalizer = "llava.dev/cleanup"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="llava.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="llava.dev")
    settings.posting.level = logging.INFO
    load_config()
    logger.info("llava operator settings: %s", SETTINGS.model_dump(exclude_none=True))


def _carry_out(decision: Decision, spec: PipelineSpec, body: kopf.Body, name: str, namespace: str,
               uid: str, logger: logging.Logger) -> None:
    launch = decision.launch
    if launch is None:
        return
    if launch.phase == "serve":
        version = decision.status.get("modelVersion")
        obj = build_rayservice(spec, SETTINGS, pipeline=name, uid=uid, name=launch.name, model_version=version)
        kopf.adopt(obj, owner=body)
        ray().apply("rayservices", namespace, obj)
        logger.info("applied RayService %s", launch.name)
        return
    obj = build_rayjob(spec, SETTINGS, pipeline=name, uid=uid, phase=launch.phase, attempt=launch.attempt,
                       job_name=launch.name)
    kopf.adopt(obj, owner=body)
    created = ray().create("rayjobs", namespace, obj)
    logger.info("%s RayJob %s", "created" if created else "found existing", launch.name)


def _record_lookups(decision: Decision, spec: PipelineSpec, uid: str) -> None:
    phase = decision.finished_phase
    if phase is None:
        return
    run_id = mlflow_lookup.find_run_id(SETTINGS.mlflow_tracking_uri, uid, phase,
                                       SETTINGS.mlflow_timeout_seconds)
    if run_id:
        decision.status["mlflowRunIds"][phase] = run_id
        decision.status["phases"][phase]["mlflowRunId"] = run_id
    if phase == "promote":
        version = mlflow_lookup.alias_version(SETTINGS.mlflow_tracking_uri, spec.registry.modelName,
                                              spec.registry.alias, SETTINGS.mlflow_timeout_seconds)
        decision.status["modelVersion"] = version
        decision.status["modelUri"] = f"models:/{spec.registry.modelName}@{spec.registry.alias}"


def _invalid(patch: kopf.Patch, status: dict, reason: str, message: str, generation: int) -> None:
    st = dict(status or {})
    set_condition(st, "Ready", False, reason, message, _now())
    patch.status.update(phase=FAILED, observedGeneration=generation, conditions=st["conditions"])


@kopf.timer(GROUP, VERSION, PLURAL, interval=SETTINGS.reconcile_seconds, backoff=SETTINGS.reconcile_seconds)
def reconcile_pipeline(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, name: str,
                       namespace: str, uid: str, patch: kopf.Patch, logger: logging.Logger,
                       **_: Any) -> None:
    generation = int(meta.get("generation") or 1)
    try:
        parsed = parse_spec(dict(spec))
    except ConfigError as err:
        _invalid(patch, dict(status), "InvalidSpec", str(err), generation)
        return
    current = dict(status).get("current") or None
    child = None
    if current:
        plural = "rayservices" if current["phase"] == "serve" else "rayjobs"
        child = ray().get(plural, namespace, current["name"])
    try:
        decision = reconcile(parsed, dict(status), name=name, generation=generation, current_child=child,
                             now=_now())
        _record_lookups(decision, parsed, uid)
        _carry_out(decision, parsed, body, name, namespace, uid, logger)
    except ValueError as err:  # e.g. an unknown ${placeholder} in a stage's overrides
        _invalid(patch, dict(status), "InvalidSpec", str(err), generation)
        return
    for kind, reason, message in decision.events:
        kopf.event(body, type=kind, reason=reason, message=message)
    patch.status.update(decision.status)


@kopf.on.delete(GROUP, VERSION, PLURAL)
def cleanup(name: str, namespace: str, logger: logging.Logger, **_: Any) -> None:
    """Delete every child explicitly; owner references let the garbage collector do the same."""
    for plural in ("rayjobs", "rayservices"):
        for child in ray().children(plural, namespace, LABEL_PIPELINE, name):
            child_name = child["metadata"]["name"]
            if ray().delete(plural, namespace, child_name):
                logger.info("deleted %s %s", plural, child_name)
