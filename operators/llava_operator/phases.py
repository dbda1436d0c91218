"""The pipeline state machine: which phase runs next, as a pure function of spec, status and children.

Phases run in a fixed order; preprocess, evaluate and serve may be disabled and are then skipped.
Each phase has a digest chained over everything that feeds it (the digest of a phase includes the
digest of the phase before), so a spec change invalidates exactly the first affected phase and all
later ones. `reconcile()` never talks to Kubernetes: it returns a `Decision` that the kopf handler
carries out (create a RayJob, apply the RayService) before writing the status it returns.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from llava_operator.spec import PipelineSpec

JOB_PHASES = ("preprocess", "stage1", "stage2", "evaluate", "promote")
ALL_PHASES = (*JOB_PHASES, "serve")
# The module each job phase runs: `python -m <module> --config <yaml> key=value ...`.
ENTRYPOINT_MODULES = {
    "preprocess": "jobs.preprocess",
    "stage1": "jobs.train",
    "stage2": "jobs.train",
    "evaluate": "jobs.evaluate",
    "promote": "jobs.promote",
}
# Human-facing phase names in status.phase and the printer column.
PHASE_TITLES = {
    "preprocess": "Preprocess", "stage1": "Stage1", "stage2": "Stage2",
    "evaluate": "Evaluate", "promote": "Promote", "serve": "Serve",
}

RUNNING, SUCCEEDED, FAILED = "Running", "Succeeded", "Failed"
MAX_NAME = 47  # KubeRay derives cluster and pod names from the RayJob name; keep room for suffixes.


def enabled_phases(spec: PipelineSpec) -> list[str]:
    phases = []
    for phase in JOB_PHASES:
        stage = getattr(spec.stages, phase)
        if stage is not None and stage.enabled:
            phases.append(phase)
    if spec.serving.enabled:
        phases.append("serve")
    return phases


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def phase_digests(spec: PipelineSpec) -> dict[str, str]:
    """Chained digest per enabled phase: changes when the phase's inputs or any earlier phase change.

    Retry policy and TTL are left out on purpose: changing them must not re-run finished work.
    """
    common = spec.model_dump(
        mode="json", include={"image", "gpuImage", "serviceAccountName", "data", "models", "cluster", "s3"}
    )
    digests: dict[str, str] = {}
    previous = _hash(common)
    for phase in enabled_phases(spec):
        if phase == "serve":
            own: Any = {"serving": spec.serving.model_dump(mode="json"), "registry": spec.registry.model_dump()}
        else:
            own = getattr(spec.stages, phase).model_dump(mode="json")
            if phase == "promote":
                own = {"stage": own, "evaluation": spec.evaluation.model_dump(mode="json"),
                       "registry": spec.registry.model_dump()}
        previous = digests[phase] = _hash({"previous": previous, "own": own})
    return digests


def child_name(pipeline: str, phase: str, attempt: int | None = None) -> str:
    """Deterministic child name: restarts recompute the same name, so they can never duplicate a job."""
    suffix = f"-{phase}" + (f"-{attempt}" if attempt is not None else "")
    base = pipeline
    if len(base) + len(suffix) > MAX_NAME:
        keep = MAX_NAME - len(suffix) - 9
        base = f"{pipeline[:keep].rstrip('-')}-{hashlib.sha256(pipeline.encode()).hexdigest()[:8]}"
    return base + suffix


PLACEHOLDER = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


def placeholder_values(spec: PipelineSpec, name: str, uid: str) -> dict[str, str]:
    values = {
        "pipeline.name": name,
        "pipeline.uid": uid,
        "data.sourceUri": spec.data.sourceUri,
        "data.outputUri": spec.data.outputUri,
        "models.vision": spec.models.vision,
        "models.language": spec.models.language,
        "registry.modelName": spec.registry.modelName,
        "registry.alias": spec.registry.alias,
    }
    gate = spec.evaluation.gate
    if gate is not None:
        values.update({"gate.metric": gate.metric, "gate.threshold": str(gate.threshold),
                       "gate.higherIsBetter": str(gate.higherIsBetter).lower()})
    return values


def render_overrides(overrides: list[str], values: dict[str, str]) -> list[str]:
    """Substitute ${...} placeholders; an unknown one is an error naming it and the known ones."""
    def replace(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise ValueError(f"unknown placeholder ${{{key}}}; known: {', '.join(sorted(values))}")
        return values[key]

    return [PLACEHOLDER.sub(replace, text) for text in overrides]


def job_outcome(rayjob: dict | None) -> str:
    """Map a KubeRay RayJob status onto Running / Succeeded / Failed (or "Missing")."""
    if rayjob is None:
        return "Missing"
    status = rayjob.get("status") or {}
    deployment = status.get("jobDeploymentStatus", "")
    job = status.get("jobStatus", "")
    if deployment == "Complete" and job == "SUCCEEDED":
        return SUCCEEDED
    if deployment in ("Failed", "ValidationFailed") or (deployment == "Complete" and job in ("FAILED", "STOPPED")):
        return FAILED
    return RUNNING


def service_ready(rayservice: dict | None) -> bool:
    status = (rayservice or {}).get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Ready" and cond.get("status") == "True":
            return True
    return status.get("serviceStatus") == "Running"


@dataclass
class Launch:
    """What the handler must create before the returned status is true."""

    phase: str
    attempt: int
    name: str
    digest: str


@dataclass
class Decision:
    status: dict[str, Any]
    launch: Launch | None = None
    finished_phase: str | None = None  # a job phase that just succeeded (the handler looks up run ids)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)


def set_condition(status: dict, ctype: str, value: bool, reason: str, message: str, now: str) -> None:
    conditions = status.setdefault("conditions", [])
    wanted = "True" if value else "False"
    for cond in conditions:
        if cond.get("type") == ctype:
            if cond.get("status") != wanted:
                cond["lastTransitionTime"] = now
            cond.update(status=wanted, reason=reason, message=message)
            return
    conditions.append({"type": ctype, "status": wanted, "reason": reason, "message": message,
                       "lastTransitionTime": now})


def reconcile(
    spec: PipelineSpec,
    status: dict[str, Any],
    *,
    name: str,
    generation: int,
    current_child: dict | None,
    now: str,
) -> Decision:
    """One step of the state machine.

    `status` is the pipeline's current status (not modified); `current_child` is the RayJob or
    RayService named in status.current, as read from the API (None when absent).
    """
    st: dict[str, Any] = json.loads(json.dumps(status or {}))
    st.setdefault("phases", {})
    st.setdefault("rayJobs", {})
    st.setdefault("mlflowRunIds", {})
    digests = phase_digests(spec)
    decision = Decision(status=st)
    current = st.get("current")

    if current:
        waiting = _advance_current(spec, st, current, current_child, digests, generation, now, decision)
        if waiting:
            st["observedGeneration"] = generation
            return decision

    target = next((p for p in enabled_phases(spec)
                   if not (st["phases"].get(p, {}).get("state") == SUCCEEDED
                           and st["phases"][p].get("digest") == digests[p])), None)
    st["observedGeneration"] = generation
    set_condition(st, "SpecChangedWhileRunning", False, "UpToDate", "", now)
    if target is None:
        st.update(phase=SUCCEEDED, current=None, currentRayJob=None)
        set_condition(st, "Ready", True, "PipelineSucceeded", "every phase succeeded for this spec", now)
        return decision
    record = st["phases"].get(target, {})
    same_spec = record.get("digest") == digests[target]
    failures = record.get("failures", 0) if same_spec else 0
    if record.get("state") == FAILED and same_spec and failures >= spec.retryPolicy.maxAttempts:
        # Out of attempts for this spec: stay failed until the spec of this phase (or before) changes.
        st.update(phase=FAILED, current=None, currentRayJob=None)
        return decision
    _launch(spec, st, target, digests[target], failures, name, now, decision)
    return decision


def _advance_current(spec, st, current, child, digests, generation, now, decision) -> bool:
    """Move the running phase on from its child's state; True while the pipeline must keep waiting."""
    phase, digest = current["phase"], current["digest"]
    record = st["phases"].setdefault(phase, {})
    changed = digests.get(phase) != digest
    if phase == "serve":
        if changed:
            return False  # re-apply the RayService with the new spec right away
        if not service_ready(child):
            return True
        record.update(state=SUCCEEDED, finishedAt=now)
        st["current"] = None
        decision.events.append(("Normal", "Serving", f"RayService {current['name']} is ready"))
        return False

    outcome = job_outcome(child)
    if outcome == RUNNING:
        if changed or generation != current.get("generation", generation):
            set_condition(st, "SpecChangedWhileRunning", True, "WaitingForRunningPhase",
                          f"spec changed while {phase} was running; {current['name']} finishes first, "
                          "then the pipeline restarts from the first affected phase", now)
        jobid = ((child or {}).get("status") or {}).get("jobId")
        if jobid:
            record["jobId"] = jobid
        return True
    st["current"] = None
    if outcome == SUCCEEDED:
        jobid = ((child or {}).get("status") or {}).get("jobId")
        record.update(state=SUCCEEDED, finishedAt=now, jobId=jobid or record.get("jobId"))
        decision.finished_phase = phase
        decision.events.append(("Normal", "PhaseSucceeded", f"{phase}: RayJob {current['name']} succeeded"))
        return False
    reason = "RayJobMissing" if outcome == "Missing" else "RayJobFailed"
    message = ((child or {}).get("status") or {}).get("message") or f"RayJob {current['name']} {reason}"
    record.update(state=FAILED, failures=record.get("failures", 0) + 1, finishedAt=now, message=message)
    decision.events.append(("Warning", reason, f"{phase} attempt {current['attempt']}: {message}"))
    if not changed and record["failures"] >= spec.retryPolicy.maxAttempts:
        st.update(phase=FAILED, currentRayJob=None)
        set_condition(st, "Ready", False, "PhaseFailed",
                      f"{phase} failed {record['failures']} time(s), retry policy allows "
                      f"{spec.retryPolicy.maxAttempts}", now)
    return False


def _launch(spec, st, phase, digest, failures, name, now, decision) -> None:
    record = st["phases"].setdefault(phase, {})
    attempt = record.get("attempt", 0) + 1
    child = child_name(name, "serve") if phase == "serve" else child_name(name, phase, attempt)
    record.update(state=RUNNING, attempt=attempt, failures=failures, digest=digest, startedAt=now,
                  finishedAt=None, message=None)
    if phase == "serve":
        record["rayService"] = child
        st["rayService"] = child
    else:
        record["rayJob"] = child
        record["jobId"] = None
        st["rayJobs"][phase] = child
    st["current"] = {"phase": phase, "attempt": attempt, "name": child, "digest": digest,
                     "generation": st.get("observedGeneration")}
    st.update(phase=PHASE_TITLES[phase], currentRayJob=None if phase == "serve" else child)
    set_condition(st, "Ready", False, "Running", f"{PHASE_TITLES[phase]} attempt {attempt}: {child}", now)
    decision.launch = Launch(phase=phase, attempt=attempt, name=child, digest=digest)
    decision.events.append(("Normal", "PhaseStarted", f"{phase} attempt {attempt}: {child}"))
