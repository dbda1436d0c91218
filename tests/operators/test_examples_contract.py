"""Every shipped LlavaPipeline example, as `llavactl pipeline render` prints it: each object valid
for the KubeRay CRDs, each pod template valid for Kubernetes, and every RayJob entrypoint run for
real (`python -m jobs.<x> ... --dry-run`, with the RayJob's runtime-env variables), all exiting 0."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from llava_operator.render import settings_from_values
from tests.charts.helm_render import CHART, VALUES_FILES
from tests.fixtures.k8s import crd_validator, schema_errors
from tests.operators.pipelines import CRD, EXAMPLES, REPO_ROOT

K8S_VERSION = "1.31.0"
VALUES = {p.stem: p for p in VALUES_FILES}


def _render(example, values=None) -> list[dict]:
    argv = [sys.executable, "-m", "llava_platform.cli", "pipeline", "render", str(example)]
    if values is not None:
        argv += ["--values", str(values)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module", params=EXAMPLES, ids=lambda p: p.stem)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param.stem, _render(request.param, VALUES["production-values"])


def _pod_templates(obj: dict) -> list[dict]:
    spec = obj["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster.get("workerGroupSpecs", [])]
    return pods + ([spec["submitterPodTemplate"]] if "submitterPodTemplate" in spec else [])


def test_examples_are_valid_llavapipelines():
    validator = crd_validator(CRD, "v1alpha1")
    assert {p.stem for p in EXAMPLES} >= {"tiny", "llava15-7b"}
    for example in EXAMPLES:
        assert schema_errors(validator, yaml.safe_load(example.read_text())) == [], example.name


def test_rendered_objects_valid_for_kuberay_and_kubernetes(rendered, kuberay_validators):
    name, objects = rendered
    assert [o["kind"] for o in objects].count("RayService") == 1 and len(objects) >= 5
    for obj in objects:
        assert schema_errors(kuberay_validators[obj["kind"]], obj) == [], f"{name}: {obj['metadata']['name']}"
        for i, template in enumerate(_pod_templates(obj)):
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{obj['metadata']['name']}-{i}"},
                   "spec": template["spec"]}
            try:
                kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{name} {obj['metadata']['name']} pod {i}: {err.message} at {list(err.path)}")


def test_every_rayjob_entrypoint_passes_dry_run(rendered):
    name, objects = rendered
    jobs = [o for o in objects if o["kind"] == "RayJob"]
    for job in jobs:
        cd, command = job["spec"]["entrypoint"].split(" && ", 1)
        assert cd == "cd /home/ray/app"  # the repository copy in the image; here, the checkout
        env = {**os.environ, **yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]}
        argv = shlex.split(command)
        assert argv[:2] == ["python", "-m"]
        proc = subprocess.run([sys.executable, *argv[1:], "--dry-run"], capture_output=True, text=True,
                              timeout=120, cwd=REPO_ROOT, env=env)
        assert proc.returncode == 0, f"{name} {job['metadata']['name']}: {command}\n{proc.stderr[-3000:]}"
        effective = yaml.safe_load(proc.stdout)
        for override in argv[argv.index("--config") + 2:]:
            key, value = override.split("=", 1)
            node = effective
            for part in key.split("."):
                node = node[part]
            assert str(node).lower() == str(yaml.safe_load(value)).lower(), (name, override, node)


def test_dry_run_names_the_bad_key_and_exits_2():
    proc = subprocess.run([sys.executable, "-m", "jobs.train", "--config", "jobs/configs/tiny_stage1.yaml",
                           "model.vision_path=x", "--dry-run"], capture_output=True, text=True, timeout=120,
                          cwd=REPO_ROOT)
    assert proc.returncode == 2 and "model.vision_path: unknown key" in proc.stderr
    assert proc.stdout == ""


def test_gpu_example_serves_on_gpu_in_bf16(rendered):
    name, objects = rendered
    if name != "llava15-7b":
        pytest.skip("the CPU example")
    service = next(o for o in objects if o["kind"] == "RayService")
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["model"]["resources"]["num_gpus"] == 1 and args["model"]["device"] == "cuda"
    assert args["model"]["dtype"] == "bfloat16"
    worker = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1 and worker["image"].endswith("-gpu")


def test_render_uses_the_chart_settings():
    settings = settings_from_values(yaml.safe_load(VALUES["production-values"].read_text()))
    assert settings.image.startswith("registry.example.com/ml/llava-platform:")
    assert settings.image_pull_secrets == "registry-pull" and settings.ray_token_secret == "llava-ray-token"
    assert CHART.is_dir()


def test_a_pipeline_without_a_registry_name_serves_the_model_the_jobs_register():
    """One default model name: a LlavaPipeline that leaves `registry.modelName` out (CRD default,
    then the operator's spec model) looks up and serves the name `promote` and `llavactl run`
    register under by default."""
    from jobs.pipeline import PipelineConfig
    from jobs.promote import PromoteConfig
    from llava_operator.spec import Registry

    crd = yaml.safe_load(CRD.read_text())
    spec_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    registered = {PipelineConfig.model_fields["model_name"].default, PromoteConfig.model_fields["model_name"].default}
    assert registered == {spec_schema["registry"]["properties"]["modelName"]["default"], Registry().modelName}
