"""helm lint + helm template for every CI values file; rendered objects checked against the schemas."""

from __future__ import annotations

import kubernetes_validate
import pytest

from tests.charts.helm_render import CHART, VALUES_FILES, helm, render
from tests.fixtures.k8s import schema_errors

K8S_VERSION = "1.31.0"
RAY_KINDS = ("RayCluster", "RayJob", "RayService")


def test_ci_values_files_cover_required_profiles():
    names = {p.name for p in VALUES_FILES}
    assert {"default-values.yaml", "gpu-values.yaml", "production-values.yaml"} <= names


@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda p: p.stem)
def test_helm_lint_strict(values):
    proc = helm("lint", str(CHART), "--strict", "-f", str(values), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda p: p.stem)
def test_core_objects_valid_for_kubernetes(values):
    objs = [o for o in render(values) if o["kind"] not in RAY_KINDS]
    assert objs
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {err.message} at {list(err.path)}")


@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda p: p.stem)
def test_ray_objects_valid_for_kuberay_crds(values, kuberay_validators):
    for obj in render(values):
        if obj["kind"] in RAY_KINDS:
            errors = schema_errors(kuberay_validators[obj["kind"]], obj)
            assert not errors, f"{obj['kind']}/{obj['metadata']['name']}: {errors}"


def test_gpu_profile_renders_gpu_worker_groups():
    cluster = next(o for o in render(VALUES_FILES[[p.stem for p in VALUES_FILES].index("gpu-values")])
                   if o["kind"] == "RayCluster")
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    gpu_pod = groups["a100"]["template"]["spec"]
    limits = gpu_pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 8
    assert gpu_pod["containers"][0]["image"].endswith("-gpu")
    assert gpu_pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert gpu_pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    cpu_pod = groups["cpu"]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu_pod["containers"][0]["resources"]["limits"]


def test_rayservice_serves_champion_through_serving_app():
    import yaml

    prod = next(p for p in VALUES_FILES if p.stem == "production-values")
    service = next(o for o in render(prod) if o["kind"] == "RayService")
    apps = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert apps[0]["import_path"] == "llava_platform.serving.app:build_app"
    assert apps[0]["args"]["model_uri"] == "models:/llava-13b@champion"


def test_operator_watches_listed_namespaces_with_a_role_in_each():
    prod = next(p for p in VALUES_FILES if p.stem == "production-values")
    objs = render(prod)
    roles = sorted(o["metadata"]["namespace"] for o in objs if o["kind"] == "Role")
    assert roles == ["team-research", "team-vision"]
    deployment = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("operator"))
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-vision" in args and "--namespace=team-research" in args


def test_cluster_wide_operator_uses_cluster_role():
    objs = render(None, "operator.clusterWide=true")
    kinds = {o["kind"] for o in objs}
    assert "ClusterRole" in kinds and "ClusterRoleBinding" in kinds and "Role" not in kinds
