"""Security policy over everything the chart renders, for every CI values file.

No privileged or root pods, no privilege escalation, all capabilities dropped, requests and limits on
every container, credentials only through secretKeyRef, nothing exposed outside the cluster by
default, Ray token auth on, NetworkPolicies in front of Ray and MLflow, least-privilege operator RBAC.
"""

from __future__ import annotations

import re

import pytest

from tests.charts.helm_render import CHART, VALUES_FILES, helm, pod_specs, render

RAY_KINDS = ("RayCluster", "RayService")
SECRETISH = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL|BACKEND_STORE_URI)", re.I)
USERINFO = re.compile(r"://[^/@\s]+:[^/@\s]+@")
ALL_VALUES = pytest.mark.parametrize("values", VALUES_FILES, ids=lambda p: p.stem)


def _containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


@ALL_VALUES
def test_pods_run_unprivileged_as_non_root(values):
    pods = [(o["kind"], where, pod) for o in render(values) for where, pod in pod_specs(o)]
    assert pods
    for kind, where, pod in pods:
        label = f"{kind}/{where}"
        assert pod["securityContext"]["runAsNonRoot"] is True, label
        assert pod["securityContext"].get("runAsUser", 1) != 0, label
        assert not (pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC")), label
        assert not any("hostPath" in v for v in pod.get("volumes", [])), label
        for c in _containers(pod):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, label
            assert sc.get("privileged", False) is False, label
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), label
            assert sc.get("runAsUser", 1) != 0, label
            # Ray pods write session files and runtime envs into the image; every other pod is read-only.
            if kind not in RAY_KINDS:
                assert sc["readOnlyRootFilesystem"] is True, label


@ALL_VALUES
def test_every_container_has_requests_and_limits(values):
    for obj in render(values):
        for where, pod in pod_specs(obj):
            for c in _containers(pod):
                res = c.get("resources", {})
                for part in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(res.get(part, {})), f"{obj['kind']}/{where}/{c['name']} {part}"


@ALL_VALUES
def test_no_plaintext_credentials(values):
    objs = render(values)
    assert not [o for o in objs if o["kind"] == "Secret"], "the chart must not carry Secret values"
    for obj in objs:
        for where, pod in pod_specs(obj):
            for c in _containers(pod):
                for env in c.get("env", []):
                    # A URI with user:password@ is a credential whatever the variable is called.
                    assert not USERINFO.search(str(env.get("value", ""))), env
                    if env["name"] == "MLFLOW_BACKEND_STORE_URI" and str(env.get("value")).startswith("sqlite:"):
                        continue  # a file path on the PVC, no credential in it
                    if SECRETISH.search(env["name"]) and not env["name"].startswith("LLAVA_OPERATOR_"):
                        assert "value" not in env, f"{obj['kind']}/{where}: {env['name']} given as plaintext"
                        assert "secretKeyRef" in env["valueFrom"], env
        if obj["kind"] == "ConfigMap":
            for key in obj.get("data") or {}:
                assert not SECRETISH.search(key), f"ConfigMap key {key} looks like a credential"


@ALL_VALUES
def test_nothing_exposed_outside_the_cluster_by_default(values):
    objs = render(values)
    for obj in objs:
        if obj["kind"] == "Service":
            assert obj["spec"].get("type", "ClusterIP") == "ClusterIP", obj["metadata"]["name"]
        if obj["kind"] in RAY_KINDS:
            spec = obj["spec"].get("rayClusterConfig", obj["spec"])
            assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
            if obj["kind"] == "RayService" and "serveService" in obj["spec"]:
                assert obj["spec"]["serveService"]["spec"]["type"] == "ClusterIP"
        if obj["kind"] == "Ingress":
            annotations = obj["metadata"].get("annotations") or {}
            assert any("auth" in k for k in annotations), "an ingress must sit behind authentication"
            assert values.stem == "production-values", "no ingress unless asked for"


@ALL_VALUES
def test_ray_token_auth_on(values):
    for obj in render(values):
        if obj["kind"] in RAY_KINDS:
            spec = obj["spec"].get("rayClusterConfig", obj["spec"])
            assert spec["authOptions"]["mode"] == "token", obj["metadata"]["name"]


@ALL_VALUES
def test_network_policies_guard_ray_and_mlflow(values):
    objs = render(values)
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    selectors = [p["spec"]["podSelector"]["matchLabels"] for p in policies]
    assert {"ray.io/is-ray-node": "yes"} in selectors
    assert any(s.get("app.kubernetes.io/component") == "mlflow" for s in selectors)
    for policy in policies:
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"].get("ingress", []):
            # Every rule names who may connect: an empty `from` would admit the whole world.
            assert rule.get("from"), f"{policy['metadata']['name']} has a rule open to everyone"


@ALL_VALUES
def test_operator_rbac_is_least_privilege(values):
    roles = [o for o in render(values) if o["kind"] in ("Role", "ClusterRole")]
    assert roles
    allowed = {
        ("llava.dev", "llavapipelines"): {"get", "list", "watch", "patch"},
        ("llava.dev", "llavapipelines/status"): {"get", "patch"},
        ("llava.dev", "llavapipelines/finalizers"): {"update"},
        ("ray.io", "rayjobs"): {"get", "list", "create", "delete"},
        ("ray.io", "rayservices"): {"get", "list", "create", "patch", "delete"},
        ("", "events"): {"create"},
    }
    for role in roles:
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    assert (group, resource) in allowed, f"unexpected access to {group}/{resource}"
                    assert set(rule["verbs"]) <= allowed[(group, resource)], (group, resource, rule["verbs"])


@pytest.mark.parametrize("bad_setting", [
    "mlflow.password=hunter2",
    "s3.credentialsSecret.secretAccessKey=AKIAEXAMPLE",
    "minio.rootPassword=minio123",
    "ray.auth.token=abc",
    "mlflow.backendStore.external.uri=postgresql://u:p@db/mlflow",
])
def test_schema_rejects_plaintext_secret_values(bad_setting):
    proc = helm("lint", str(CHART), "--set", bad_setting, check=False)
    assert proc.returncode != 0
    assert "additional properties" in proc.stdout + proc.stderr


@pytest.mark.parametrize("settings,needle", [
    (["ingress.enabled=true", "ingress.mlflowHost=mlflow.example.com"], "allOf"),
    (["minio.enabled=true"], "allOf"),
    (["mlflow.auth.enabled=true"], "allOf"),
    (["podSecurityContext.runAsNonRoot=false"], "runAsNonRoot"),
    (["mlflow.resources.limits=null"], "limits"),
])
def test_schema_rejects_insecure_or_incomplete_settings(settings, needle):
    args = ["lint", str(CHART)]
    for item in settings:
        args += ["--set", item]
    proc = helm(*args, check=False)
    assert proc.returncode != 0 and needle in proc.stdout + proc.stderr, proc.stdout
