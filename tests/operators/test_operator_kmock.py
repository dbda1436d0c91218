"""The real kopf operator (a `kopf run` subprocess) against the kmock Kubernetes API emulator.

The test plays the API server and KubeRay: it creates LlavaPipelines with the metadata the API server
would set (uid, generation, resourceVersion), bumps `generation` on spec changes, and moves RayJob and
RayService statuses the way the KubeRay operator does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import kmock
import pytest
import yaml
from kubernetes import client

from tests.fixtures.k8s import schema_errors
from tests.operators.pipelines import small_pipeline

NS = "default"
LP = ("llava.dev", "v1alpha1")
RAY = ("ray.io", "v1")


def declare(handler) -> None:
    def info(kind: str, namespaced: bool = True, status: bool = False):
        return kmock.ResourceInfo(kind=kind, singular=kind.lower(), namespaced=namespaced,
                                  verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
                                  subresources={"status"} if status else set())

    handler.resources["llava.dev/v1alpha1/llavapipelines"] = info("LlavaPipeline", status=True)
    handler.resources["ray.io/v1/rayjobs"] = info("RayJob", status=True)
    handler.resources["ray.io/v1/rayservices"] = info("RayService", status=True)
    handler.resources["v1/events"] = info("Event")
    # kopf's start-up discovery waits for these core resources to exist.
    handler.resources["v1/namespaces"] = info("Namespace", namespaced=False)
    handler.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = info(
        "CustomResourceDefinition", namespaced=False)


class Cluster:
    def __init__(self, emulator, tmp_path: Path) -> None:
        self.emulator = emulator
        self.api = client.CustomObjectsApi(emulator.client())
        self.tmp_path = tmp_path
        self.operators: list[subprocess.Popen] = []
        self.generation = 1

    # -- the operator ------------------------------------------------------------------------------
    def start_operator(self, **extra_env: str) -> subprocess.Popen:
        env = dict(os.environ, **extra_env, KUBECONFIG=str(self.emulator.kubeconfig), LLAVA_OPERATOR_RECONCILE_SECONDS="0.2")
        if "LLAVA_OPERATOR_MLFLOW_TRACKING_URI" not in extra_env:
            env.pop("MLFLOW_TRACKING_URI", None)
        # The child keeps its own copy of the log file descriptor once started.
        with open(self.tmp_path / f"operator-{len(self.operators)}.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "kopf", "run", "--standalone", "--namespace", NS,
                                     "-m", "llava_operator.handlers"], env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
        self.operators.append(proc)
        return proc

    def crash_operator(self, proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def logs(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.tmp_path.glob("operator-*.log")))

    # -- objects -----------------------------------------------------------------------------------
    def create_pipeline(self, raw: dict) -> None:
        raw["metadata"].update(uid="uid-" + raw["metadata"]["name"], generation=1, resourceVersion="1")
        self.api.create_namespaced_custom_object(*LP, NS, "llavapipelines", raw)

    def update_spec(self, name: str, spec_patch: dict) -> None:
        self.generation += 1  # what the API server does on every spec change
        self.api.patch_namespaced_custom_object(*LP, NS, "llavapipelines", name,
                                                {"metadata": {"generation": self.generation}, "spec": spec_patch})

    def pipeline(self, name: str) -> dict | None:
        try:
            return self.api.get_namespaced_custom_object(*LP, NS, "llavapipelines", name)
        except client.ApiException as err:
            if err.status == 404:
                return None
            raise

    def status(self, name: str) -> dict:
        return (self.pipeline(name) or {}).get("status") or {}

    def rayjobs(self) -> dict[str, dict]:
        items = self.api.list_namespaced_custom_object(*RAY, NS, "rayjobs")["items"]
        return {i["metadata"]["name"]: i for i in items}

    def rayservices(self) -> dict[str, dict]:
        items = self.api.list_namespaced_custom_object(*RAY, NS, "rayservices")["items"]
        return {i["metadata"]["name"]: i for i in items}

    def set_job(self, name: str, deployment: str, job: str = "", message: str | None = None) -> None:
        status = {"jobDeploymentStatus": deployment, "jobStatus": job, "jobId": f"raysubmit_{name}"}
        if message:
            status["message"] = message
        self.api.patch_namespaced_custom_object_status(*RAY, NS, "rayjobs", name, {"status": status})

    def creations(self, plural: str, name: str) -> int:
        """How many times an object came into existence (a recreate shows up as 2)."""
        history = self.emulator.history(f"{RAY[0]}/{RAY[1]}/{plural}", NS, name)
        return sum(1 for i, v in enumerate(history) if v is not None and (i == 0 or history[i - 1] is None))

    def wait(self, what: str, predicate: Callable[[], object], timeout: float = 90.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}\n--- operator logs ---\n{self.logs()[-4000:]}")


@pytest.fixture
def cluster(kube_emulator_factory, tmp_path) -> Iterator[Cluster]:
    c = Cluster(kube_emulator_factory(declare), tmp_path)
    yield c
    for proc in c.operators:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _job_started(c: Cluster, pipeline: str, expected: str):
    return lambda: c.status(pipeline).get("currentRayJob") == expected and expected in c.rayjobs()


def test_pipeline_walks_every_phase_then_delete_cleans_up(cluster, kuberay_validators):
    cluster.start_operator()
    cluster.create_pipeline(small_pipeline("demo"))
    for phase in ("preprocess", "stage1", "stage2", "evaluate", "promote"):
        name = f"demo-{phase}-1"
        cluster.wait(f"{name} to start", _job_started(cluster, "demo", name))
        job = cluster.rayjobs()[name]
        assert schema_errors(kuberay_validators["RayJob"], job) == []
        owner = job["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("LlavaPipeline", "demo", "uid-demo")
        assert job["metadata"]["labels"]["llava.dev/phase"] == phase
        cluster.set_job(name, "Running", "RUNNING")
        cluster.set_job(name, "Complete", "SUCCEEDED")

    service = cluster.wait("the RayService", lambda: cluster.rayservices().get("demo-serve"))
    assert schema_errors(kuberay_validators["RayService"], service) == []
    assert cluster.status("demo")["phase"] == "Serve"
    cluster.api.patch_namespaced_custom_object_status(
        *RAY, NS, "rayservices", "demo-serve",
        {"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "x", "message": "",
                                    "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
    status = cluster.wait("Succeeded", lambda: (s := cluster.status("demo")).get("phase") == "Succeeded" and s)
    assert status["rayJobs"] == {p: f"demo-{p}-1" for p in ("preprocess", "stage1", "stage2", "evaluate", "promote")}
    assert status["phases"]["stage2"]["jobId"] == "raysubmit_demo-stage2-1"
    assert status["modelUri"] == "models:/llava-tiny@champion"  # the CRD default name
    assert status["observedGeneration"] == 1
    assert len(cluster.rayjobs()) == 5, "exactly one RayJob per phase"

    cluster.api.delete_namespaced_custom_object(*LP, NS, "llavapipelines", "demo")
    cluster.wait("pipeline deletion", lambda: cluster.pipeline("demo") is None)
    assert cluster.rayjobs() == {} and cluster.rayservices() == {}


def test_restart_in_the_middle_never_duplicates(cluster):
    first = cluster.start_operator()
    cluster.create_pipeline(small_pipeline("restart"))
    cluster.wait("preprocess", _job_started(cluster, "restart", "restart-preprocess-1"))
    cluster.set_job("restart-preprocess-1", "Complete", "SUCCEEDED")
    cluster.wait("stage1", _job_started(cluster, "restart", "restart-stage1-1"))
    cluster.set_job("restart-stage1-1", "Running", "RUNNING")

    cluster.crash_operator(first)
    # While it is down, stage1 finishes; pretend the dead operator had already created the stage2 job
    # but died before recording it in the status.
    cluster.set_job("restart-stage1-1", "Complete", "SUCCEEDED")
    orphan = cluster.rayjobs()["restart-stage1-1"]
    orphan["metadata"] = {"name": "restart-stage2-1", "labels": orphan["metadata"]["labels"]}
    orphan.pop("status")
    cluster.api.create_namespaced_custom_object(*RAY, NS, "rayjobs", orphan)

    cluster.start_operator()
    cluster.wait("stage2 adopted", _job_started(cluster, "restart", "restart-stage2-1"))
    cluster.set_job("restart-stage2-1", "Complete", "SUCCEEDED")
    cluster.wait("evaluate", _job_started(cluster, "restart", "restart-evaluate-1"))

    assert sorted(cluster.rayjobs()) == ["restart-evaluate-1", "restart-preprocess-1", "restart-stage1-1",
                                         "restart-stage2-1"]
    for name in cluster.rayjobs():
        assert cluster.creations("rayjobs", name) == 1, f"{name} was created more than once"
    assert cluster.status("restart")["phases"]["stage1"]["attempt"] == 1


@pytest.mark.parametrize("max_attempts", [1, 2])
def test_failed_phase_with_and_without_retries_left(cluster, max_attempts):
    cluster.start_operator()
    cluster.create_pipeline(small_pipeline("flaky", max_attempts=max_attempts, serving=False))
    cluster.wait("preprocess", _job_started(cluster, "flaky", "flaky-preprocess-1"))
    cluster.set_job("flaky-preprocess-1", "Complete", "SUCCEEDED")
    cluster.wait("stage1", _job_started(cluster, "flaky", "flaky-stage1-1"))
    cluster.set_job("flaky-stage1-1", "Failed", "FAILED", message="out of memory")
    if max_attempts == 2:
        cluster.wait("the retry", _job_started(cluster, "flaky", "flaky-stage1-2"))
        status = cluster.status("flaky")
        assert status["phases"]["stage1"]["failures"] == 1 and status["phase"] == "Stage1"
        cluster.set_job("flaky-stage1-2", "Complete", "FAILED", message="loss is NaN")

    status = cluster.wait("Failed", lambda: (s := cluster.status("flaky")).get("phase") == "Failed" and s)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "PhaseFailed"
    assert status["phases"]["stage1"]["failures"] == max_attempts
    time.sleep(1.0)  # several reconcile periods: a failed pipeline must stay put
    assert sorted(n for n in cluster.rayjobs() if "stage1" in n) == [
        f"flaky-stage1-{i}" for i in range(1, max_attempts + 1)]
    assert "flaky-stage2-1" not in cluster.rayjobs()


def test_spec_change_while_running_finishes_phase_then_restarts(cluster):
    cluster.start_operator()
    cluster.create_pipeline(small_pipeline("change", serving=False))
    cluster.wait("preprocess", _job_started(cluster, "change", "change-preprocess-1"))
    cluster.set_job("change-preprocess-1", "Complete", "SUCCEEDED")
    cluster.wait("stage1", _job_started(cluster, "change", "change-stage1-1"))
    cluster.set_job("change-stage1-1", "Running", "RUNNING")

    cluster.update_spec("change", {"stages": {"stage1": {"overrides": ["optim.max_steps=5"]}}})
    status = cluster.wait("SpecChangedWhileRunning", lambda: (s := cluster.status("change")) and any(
        c["type"] == "SpecChangedWhileRunning" and c["status"] == "True" for c in s.get("conditions", [])) and s)
    assert status["currentRayJob"] == "change-stage1-1" and status["observedGeneration"] == 2
    assert "change-stage1-2" not in cluster.rayjobs(), "the running job is never interrupted"

    cluster.set_job("change-stage1-1", "Complete", "SUCCEEDED")
    cluster.wait("stage1 re-run", _job_started(cluster, "change", "change-stage1-2"))
    rerun = cluster.rayjobs()["change-stage1-2"]
    assert "optim.max_steps=5" in rerun["spec"]["entrypoint"]
    assert "change-preprocess-2" not in cluster.rayjobs(), "unchanged earlier phases are not re-run"


def test_invalid_spec_is_reported_not_crashed_on(cluster):
    cluster.start_operator()
    raw = small_pipeline("bad")
    raw["spec"]["stages"]["stage1"]["overrides"] = ["x=${no.such.key}"]
    cluster.create_pipeline(raw)
    cluster.wait("preprocess", _job_started(cluster, "bad", "bad-preprocess-1"))
    cluster.set_job("bad-preprocess-1", "Complete", "SUCCEEDED")
    status = cluster.wait("InvalidSpec", lambda: (s := cluster.status("bad")).get("phase") == "Failed" and s)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InvalidSpec" and "${no.such.key}" in ready["message"]
    assert not [n for n in cluster.rayjobs() if "stage1" in n]


def test_status_records_mlflow_runs_and_model_version(cluster, mlflow_server, tmp_path):
    """Jobs tag their MLflow runs; the operator finds them and the version the alias points at."""
    client = mlflow_server.client()
    experiment = mlflow_server.new_experiment("operator")
    runs = {}
    for phase in ("stage1", "stage2", "promote"):
        run = client.create_run(experiment, tags={"llava.pipeline_id": "uid-tracked", "llava.phase": phase})
        runs[phase] = run.info.run_id
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    model_run = mlflow_server.log_model_dir(tmp_path / "model", experiment)
    client.create_registered_model("tracked-llava")
    version = client.create_model_version("tracked-llava", f"runs:/{model_run}/model", run_id=model_run)
    client.set_registered_model_alias("tracked-llava", "champion", version.version)

    cluster.start_operator(LLAVA_OPERATOR_MLFLOW_TRACKING_URI=mlflow_server.tracking_uri)
    raw = small_pipeline("tracked", serving=False)
    raw["spec"]["stages"]["preprocess"]["enabled"] = False
    del raw["spec"]["stages"]["evaluate"]
    raw["spec"]["registry"] = {"modelName": "tracked-llava", "alias": "champion"}
    cluster.create_pipeline(raw)
    for phase in ("stage1", "stage2", "promote"):
        cluster.wait(phase, _job_started(cluster, "tracked", f"tracked-{phase}-1"))
        env = yaml.safe_load(cluster.rayjobs()[f"tracked-{phase}-1"]["spec"]["runtimeEnvYAML"])["env_vars"]
        assert env["MLFLOW_TRACKING_URI"] == mlflow_server.tracking_uri
        assert (env["LLAVA_PIPELINE_ID"], env["LLAVA_PIPELINE_PHASE"]) == ("uid-tracked", phase)
        cluster.set_job(f"tracked-{phase}-1", "Complete", "SUCCEEDED")
    status = cluster.wait("Succeeded", lambda: (s := cluster.status("tracked")).get("phase") == "Succeeded" and s)
    assert status["mlflowRunIds"] == runs
    assert status["modelVersion"] == str(version.version)
