"""The shipped tiny LlavaPipeline end to end on loopback: the real kopf operator against kmock, a
test-side KubeRay stand-in running each RayJob it creates for real on a local Ray head (`ray job
submit`), MLflow over HTTP, S3 on moto, until the operator serves the promoted model and it answers.

Only the pipeline's inputs change from the shipped example: the synthetic data and tiny base
checkpoints are paths on this machine, the outputs go to a moto bucket. What this does not cover
(a real KubeRay controller, scheduling, GPUs, images): operators/llava_operator/README.md.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from kubernetes import client

from tests.operators.kuberay_standin import KubeRayStandIn
from tests.operators.pipelines import EXAMPLES_DIR, REPO_ROOT
from tests.operators.test_operator_kmock import declare
from tests.platform.test_submit import _free_ports, ray_head_process

NS = "default"
LP = ("llava.dev", "v1alpha1")


@pytest.fixture
def ray_head_for_jobs(tmp_path):
    """(dashboard URL, token) of a Ray head with the Jobs and Serve REST APIs on 127.0.0.1 and token
    auth on (as KubeRay's `authOptions.mode: token`); its jobs run `python` from this venv."""
    # Ray's OOM killer watches the whole machine, which the rest of the suite shares: it would kill
    # these jobs for other processes' memory. The jobs here are small (a tiny model, one worker).
    env = dict(RAY_memory_monitor_refresh_ms="0", DS_ACCELERATOR="cpu", OMP_WAIT_POLICY="PASSIVE",
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1")
    with ray_head_process("re2e", num_cpus=4, workers=60, env=env,
                          extra_args=("--memory", str(8 * 1024**3))) as head:
        yield head


def _tiny_pipeline(shapes_data, tiny_checkpoints, bucket: str, s3_endpoint: str) -> dict:
    raw = yaml.safe_load((EXAMPLES_DIR / "tiny.yaml").read_text())
    vision, lm = tiny_checkpoints
    raw["metadata"].update(namespace=NS, uid="uid-e2e", generation=1, resourceVersion="1")
    raw["spec"]["data"] = {"sourceUri": f"{shapes_data.root}/", "outputUri": f"s3://{bucket}/pipelines/"}
    raw["spec"]["models"] = {"vision": str(vision), "language": str(lm)}
    raw["spec"]["s3"]["endpointUrl"] = s3_endpoint
    return raw


@pytest.mark.slow
@pytest.mark.timeout(2400)  # ~5 min on an idle 2-core machine; the waits below leave room for a loaded one
def test_tiny_example_reaches_an_answer_from_the_promoted_model(
        kube_emulator_factory, ray_head_for_jobs, mlflow_server, s3_bucket, shapes_data, tiny_checkpoints,
        tmp_path):
    emulator = kube_emulator_factory(declare)
    api = client.CustomObjectsApi(emulator.client())
    api_key = secrets.token_hex(16)
    (serve_port,) = _free_ports(1)
    dashboard, token = ray_head_for_jobs
    standin = KubeRayStandIn(api, NS, dashboard, token, {
        "llava-s3": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
        "llava-api-keys": {"api-key": api_key},
    }, serve_port, tmp_path).start()
    env = dict(os.environ, KUBECONFIG=str(emulator.kubeconfig), LLAVA_OPERATOR_RECONCILE_SECONDS="0.5",
               LLAVA_OPERATOR_APP_DIR=str(REPO_ROOT), LLAVA_OPERATOR_MLFLOW_TRACKING_URI=mlflow_server.tracking_uri)
    with open(tmp_path / "operator.log", "w") as log:
        operator = subprocess.Popen([sys.executable, "-m", "kopf", "run", "--standalone", "--namespace", NS,
                                     "-m", "llava_operator.handlers"], env=env, stdout=log, stderr=subprocess.STDOUT)

    def status() -> dict:
        return api.get_namespaced_custom_object(*LP, NS, "llavapipelines", "llava-tiny").get("status") or {}

    def wait(what: str, predicate, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert not standin.errors, standin.errors
            value = predicate()
            if value:
                return value
            if status().get("phase") == "Failed":
                break
            time.sleep(1.0)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(tmp_path.glob("*.log")))
        pytest.fail(f"timed out waiting for {what}; status={status()}\n{logs}")

    try:
        api.create_namespaced_custom_object(*LP, NS, "llavapipelines",
                                            _tiny_pipeline(shapes_data, tiny_checkpoints, s3_bucket,
                                                           mlflow_server.s3_endpoint))
        wait("the RayService of the promoted model", lambda: standin.deployed.get("llava-tiny-serve"), 1800)
        assert standin.finished == {f"llava-tiny-{p}-1": "SUCCEEDED" for p in ("stage1", "stage2", "evaluate",
                                                                                   "promote")}
        st = status()
        assert st["modelUri"] == "models:/llava-tiny@champion" and st["modelVersion"]
        champion = mlflow_server.client().get_model_version_by_alias("llava-tiny", "champion")
        assert str(champion.version) == st["modelVersion"]

        url = f"http://127.0.0.1:{serve_port}"
        wait("the served model", lambda: _ready(url), 600)
        question = {"model": "llava", "max_tokens": 8,
                    "messages": [{"role": "user", "content": "How many shapes are there?"}]}
        refused = httpx.post(f"{url}/v1/chat/completions", json=question, timeout=60)
        assert refused.status_code == 401
        answer = httpx.post(f"{url}/v1/chat/completions", json=question, timeout=120,
                            headers={"Authorization": f"Bearer {api_key}"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"].strip()
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=30).json()
        assert models["data"][0]["root"] == "models:/llava-tiny@champion"
        reload = httpx.post(f"{url}/admin/reload", json={}, timeout=30, headers={"Authorization": f"Bearer {api_key}"})
        assert reload.status_code == 403  # no admin key in the example: reload is off
        wait("Succeeded", lambda: status().get("phase") == "Succeeded", 120)
    finally:
        standin.stop()
        operator.terminate()
        try:
            operator.wait(15)
        except subprocess.TimeoutExpired:
            operator.kill()
            operator.wait(5)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
