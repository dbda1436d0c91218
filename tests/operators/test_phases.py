"""The pipeline state machine on its own: order, retries, spec changes, serving, naming."""

from __future__ import annotations

import copy

import pytest

from llava_operator.phases import (
    MAX_NAME,
    child_name,
    job_outcome,
    phase_digests,
    reconcile,
    render_overrides,
)
from llava_operator.spec import ConfigError, parse_spec
from tests.operators.pipelines import small_pipeline

NOW = "2026-01-01T00:00:00Z"


def job(deployment: str, status: str = "") -> dict:
    return {"status": {"jobDeploymentStatus": deployment, "jobStatus": status, "jobId": "raysubmit_x"}}


def step(raw: dict, status: dict, child: dict | None = None, generation: int = 1):
    return reconcile(parse_spec(raw["spec"]), status, name="demo", generation=generation,
                     current_child=child, now=NOW)


def run_through(raw: dict, phases: list[str]) -> dict:
    status: dict = {}
    for phase in phases:
        decision = step(raw, status, None if not status.get("current") else job("Complete", "SUCCEEDED"))
        status = decision.status
        assert decision.launch is not None and decision.launch.phase == phase
    return status


def test_walks_every_phase_in_order_then_succeeds():
    raw = small_pipeline()
    status = {}
    seen = []
    child = None
    for _ in range(7):
        decision = step(raw, status, child)
        status = decision.status
        if decision.launch is None:
            break
        seen.append((decision.launch.phase, decision.launch.name))
        child = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}} \
            if decision.launch.phase == "serve" else job("Complete", "SUCCEEDED")
    assert seen == [("preprocess", "demo-preprocess-1"), ("stage1", "demo-stage1-1"), ("stage2", "demo-stage2-1"),
                    ("evaluate", "demo-evaluate-1"), ("promote", "demo-promote-1"), ("serve", "demo-serve")]
    assert status["phase"] == "Succeeded"
    assert status["rayJobs"] == {p: f"demo-{p}-1" for p in ("preprocess", "stage1", "stage2", "evaluate", "promote")}
    assert next(c for c in status["conditions"] if c["type"] == "Ready")["status"] == "True"


def test_running_job_keeps_the_pipeline_waiting():
    raw = small_pipeline()
    status = step(raw, {}).status
    again = step(raw, status, job("Running", "RUNNING"))
    assert again.launch is None and again.status["phase"] == "Preprocess"
    assert again.status["phases"]["preprocess"]["jobId"] == "raysubmit_x"


def test_disabled_phases_are_skipped():
    raw = small_pipeline(serving=False)
    raw["spec"]["stages"]["preprocess"]["enabled"] = False
    del raw["spec"]["stages"]["evaluate"]
    status = run_through(raw, ["stage1", "stage2", "promote"])
    final = step(raw, status, job("Complete", "SUCCEEDED"))
    assert final.launch is None and final.status["phase"] == "Succeeded"


@pytest.mark.parametrize("failure", [job("Failed"), job("Complete", "FAILED"), job("Complete", "STOPPED"), None])
def test_failure_retries_then_fails_when_attempts_run_out(failure):
    raw = small_pipeline(max_attempts=2)
    status = step(raw, {}).status
    retry = step(raw, status, failure)
    assert retry.launch.name == "demo-preprocess-2"
    assert retry.status["phases"]["preprocess"]["failures"] == 1
    final = step(raw, retry.status, failure)
    assert final.launch is None
    assert final.status["phase"] == "Failed"
    ready = next(c for c in final.status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "PhaseFailed"
    # Staying failed is stable: more ticks launch nothing.
    assert step(raw, final.status).launch is None


def test_failed_pipeline_restarts_when_the_failing_phase_spec_changes():
    raw = small_pipeline(max_attempts=1)
    status = step(raw, {}).status
    failed = step(raw, status, job("Failed")).status
    assert failed["phase"] == "Failed"
    raw["spec"]["stages"]["preprocess"]["overrides"] = ["num_shards=4"]
    decision = step(raw, failed, generation=2)
    assert decision.launch.name == "demo-preprocess-2"
    assert decision.status["phases"]["preprocess"]["failures"] == 0


def test_spec_change_while_running_waits_then_reruns_from_first_affected_phase():
    raw = small_pipeline()
    status = run_through(raw, ["preprocess", "stage1", "stage2"])
    changed = copy.deepcopy(raw)
    changed["spec"]["stages"]["stage1"]["overrides"].append("lr=1e-3")
    waiting = step(changed, status, job("Running", "RUNNING"), generation=2)
    assert waiting.launch is None and waiting.status["phase"] == "Stage2"
    cond = next(c for c in waiting.status["conditions"] if c["type"] == "SpecChangedWhileRunning")
    assert cond["status"] == "True"
    # stage2 finishes under the old spec; stage1 is the first phase whose inputs changed.
    rerun = step(changed, waiting.status, job("Complete", "SUCCEEDED"), generation=2)
    assert rerun.launch.phase == "stage1" and rerun.launch.name == "demo-stage1-2"
    cond = next(c for c in rerun.status["conditions"] if c["type"] == "SpecChangedWhileRunning")
    assert cond["status"] == "False"


def test_digests_chain_so_later_phases_follow_earlier_changes():
    raw = small_pipeline()
    before = phase_digests(parse_spec(raw["spec"]))
    raw["spec"]["stages"]["stage2"]["overrides"] = ["epochs=3"]
    after = phase_digests(parse_spec(raw["spec"]))
    assert [p for p in before if before[p] != after[p]] == ["stage2", "evaluate", "promote", "serve"]
    raw["spec"]["retryPolicy"]["maxAttempts"] = 5
    assert phase_digests(parse_spec(raw["spec"])) == after, "retry policy must not invalidate work"


def test_serving_change_only_reapplies_the_rayservice():
    raw = small_pipeline()
    status = run_through(raw, ["preprocess", "stage1", "stage2", "evaluate", "promote", "serve"])
    done = step(raw, status, {"status": {"serviceStatus": "Running"}}).status
    assert done["phase"] == "Succeeded"
    raw["spec"]["serving"]["numReplicas"] = 3
    decision = step(raw, done, generation=2)
    assert decision.launch.phase == "serve" and decision.launch.name == "demo-serve"


def test_job_outcome_mapping():
    assert job_outcome(job("Running", "RUNNING")) == "Running"
    assert job_outcome(job("Retrying", "FAILED")) == "Running"
    assert job_outcome(job("Initializing")) == "Running"
    assert job_outcome(job("Complete", "SUCCEEDED")) == "Succeeded"
    assert job_outcome(job("ValidationFailed")) == "Failed"
    assert job_outcome(None) == "Missing"


def test_child_names_are_deterministic_and_short_enough():
    assert child_name("demo", "stage1", 3) == "demo-stage1-3"
    long = "a" * 80
    name = child_name(long, "preprocess", 10)
    assert len(name) <= MAX_NAME and name == child_name(long, "preprocess", 10)
    assert child_name(long, "preprocess", 10) != child_name("a" * 81, "preprocess", 10)


def test_placeholders_substituted_and_unknown_ones_named():
    assert render_overrides(["a=${x.y}-z"], {"x.y": "v"}) == ["a=v-z"]
    with pytest.raises(ValueError, match=r"unknown placeholder \$\{nope\}"):
        render_overrides(["a=${nope}"], {"x.y": "v"})


def test_bad_spec_names_the_key():
    raw = small_pipeline()
    raw["spec"]["stages"]["stage1"]["workers"] = {"gpu": -1}
    raw["spec"]["serving"]["replicas"] = 2
    with pytest.raises(ConfigError) as err:
        parse_spec(raw["spec"])
    assert "stages.stage1.workers.gpu" in str(err.value) and "serving.replicas: unknown key" in str(err.value)
