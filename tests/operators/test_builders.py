"""RayJob / RayService objects the operator writes, checked against the KubeRay CRDs and our policy."""

from __future__ import annotations

import shlex

import pytest
import yaml

from llava_operator.builders import build_rayjob, build_rayservice
from llava_operator.phases import JOB_PHASES
from llava_operator.spec import OperatorSettings, parse_spec
from tests.fixtures.k8s import crd_validator, schema_errors
from tests.operators.pipelines import CRD, EXAMPLES, example_pipeline, small_pipeline

SETTINGS = OperatorSettings(mlflow_tracking_uri="http://llava-mlflow.ml.svc:5000",
                            mlflow_credentials_secret="mlflow-client")


def _rayjob(raw: dict, phase: str, attempt: int = 1) -> dict:
    spec = parse_spec(raw["spec"])
    return build_rayjob(spec, SETTINGS, pipeline=raw["metadata"]["name"], uid="uid-123", phase=phase,
                        attempt=attempt, job_name=f"{raw['metadata']['name']}-{phase}-{attempt}")


def _pods(cluster: dict) -> list[dict]:
    return [cluster["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster.get("workerGroupSpecs", [])]


@pytest.mark.parametrize("raw", [*(example_pipeline(p.stem) for p in EXAMPLES), small_pipeline()],
                         ids=[*(p.stem for p in EXAMPLES), "small"])
def test_pipelines_valid_for_the_llavapipeline_crd(raw):
    assert schema_errors(crd_validator(CRD, "v1alpha1"), raw) == []


def test_crd_rejects_what_the_spec_model_rejects():
    raw = small_pipeline()
    raw["spec"]["stages"]["stage1"]["overrides"] = ["no-equals-sign"]
    raw["spec"]["retryPolicy"]["maxAttempts"] = 0
    errors = schema_errors(crd_validator(CRD, "v1alpha1"), raw)
    assert any("overrides" in e for e in errors) and any("maxAttempts" in e for e in errors)


@pytest.mark.parametrize("raw", [example_pipeline(), small_pipeline()], ids=["example", "small"])
def test_rayjobs_valid_for_kuberay_crd(raw, kuberay_validators):
    phases = [p for p in JOB_PHASES if getattr(parse_spec(raw["spec"]).stages, p) is not None]
    assert len(phases) >= 4
    for phase in phases:
        assert schema_errors(kuberay_validators["RayJob"], _rayjob(raw, phase)) == [], phase


def test_rayjob_runs_the_job_contract():
    raw = example_pipeline()
    body = _rayjob(raw, "stage1", attempt=2)
    cd, command = body["spec"]["entrypoint"].split(" && ", 1)
    assert cd == "cd /home/ray/app"
    argv = shlex.split(command)
    assert argv[:5] == ["python", "-m", "jobs.train", "--config", "jobs/configs/llava15_7b_stage1.yaml"]
    assert "model.vision=openai/clip-vit-large-patch14-336" in argv
    assert "output=s3://llava-checkpoints/llava-v15-7b/stage1" in argv
    env = yaml.safe_load(body["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["LLAVA_PIPELINE_ID"] == "uid-123" and env["LLAVA_PIPELINE_PHASE"] == "stage1"
    assert env["MLFLOW_TRACKING_URI"] == "http://llava-mlflow.ml.svc:5000"
    spec = body["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 3600 and spec["backoffLimit"] == 1
    assert spec["activeDeadlineSeconds"] == 172800
    labels = body["metadata"]["labels"]
    assert labels["llava.dev/pipeline"] == "llava-v15-7b" and labels["llava.dev/attempt"] == "2"
    promote = shlex.split(_rayjob(raw, "promote")["spec"]["entrypoint"].split(" && ", 1)[1])
    assert promote[2] == "jobs.promote" and "simple_gate.threshold=0.6" in promote


def test_rayjob_pods_secure_with_gpu_workers_and_secret_refs():
    body = _rayjob(example_pipeline(), "stage2")
    cluster = body["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert worker["containers"][0]["image"].endswith("-gpu")
    assert worker["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    for pod in _pods(cluster) + [body["spec"]["submitterPodTemplate"]["spec"]]:
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            assert c["resources"]["requests"] == c["resources"]["limits"]
            for env in c["env"]:
                if any(word in env["name"] for word in ("SECRET", "PASSWORD", "KEY_ID")):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], env
    head_env = {e["name"]: e for e in _pods(cluster)[0]["containers"][0]["env"]}
    assert head_env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "llava-s3"
    assert head_env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-client"


def test_cpu_only_stage_has_no_worker_group_and_work_on_head():
    body = _rayjob(small_pipeline(), "preprocess")
    cluster = body["spec"]["rayClusterSpec"]
    assert "workerGroupSpecs" not in cluster
    assert "num-cpus" not in cluster["headGroupSpec"]["rayStartParams"]


@pytest.mark.parametrize("version", [None, "7"])
def test_rayservice_valid_and_serves_the_alias(version, kuberay_validators):
    raw = example_pipeline()
    body = build_rayservice(parse_spec(raw["spec"]), SETTINGS, pipeline="llava-v15-7b", uid="uid-123",
                            name="llava-v15-7b-serve", model_version=version)
    assert schema_errors(kuberay_validators["RayService"], body) == []
    app = yaml.safe_load(body["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "llava_platform.serving.app:build_app"
    assert app["args"]["model_uri"] == "models:/llava-v15-7b@champion"
    assert app["runtime_env"]["env_vars"].get("LLAVA_MODEL_VERSION") == version
    assert body["spec"]["rayClusterConfig"]["authOptions"]["mode"] == "token"
