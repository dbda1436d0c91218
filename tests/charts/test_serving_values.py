"""Serving settings and Ray pods agree between the chart and the operator for the same values:
serveConfigV2 args, operator settings (the chart's operator Deployment env), and Ray pod specs."""

from __future__ import annotations

import pytest
import yaml

from llava_operator.builders import build_rayservice
from llava_operator.render import settings_from_values
from llava_operator.serve_settings import serve_args
from llava_operator.spec import OperatorSettings, parse_spec
from llava_platform.serving.config import parse_serve_config
from tests.charts.helm_render import CHART, VALUES_FILES, helm, render
from tests.operators.pipelines import small_pipeline

VALUES = {p.stem: p for p in VALUES_FILES}
SERVING = [p for p in VALUES_FILES if (yaml.safe_load(p.read_text()) or {}).get("rayService", {}).get("enabled")]


def _values(path) -> dict:
    """The chart's defaults with the CI file on top, as helm merges them."""
    def merge(base: dict, top: dict) -> dict:
        out = dict(base)
        for k, v in top.items():
            out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        return out

    return merge(yaml.safe_load((CHART / "values.yaml").read_text()), yaml.safe_load(path.read_text()) or {})


def _chart_service(path) -> dict:
    return next(o for o in render(path) if o["kind"] == "RayService")


def _chart_args(path) -> dict:
    return yaml.safe_load(_chart_service(path)["spec"]["serveConfigV2"])["applications"][0]["args"]


def _pipeline_like_chart(values: dict) -> dict:
    """A pipeline whose spec.serving says what the chart's rayService values say."""
    rs, auth = values["rayService"], values["serving"]["auth"]
    serving = {"numReplicas": rs["numReplicas"], "maxOngoingRequests": rs["maxOngoingRequests"],
               "replica": {k: v for k, v in rs["replica"].items() if v},
               "engine": rs["engine"], "auth": {"reloadAnyUri": auth["reloadAnyUri"]}}
    serving["replica"].setdefault("cpus", 0)
    if rs["autoscaling"]["enabled"]:
        serving["autoscaling"] = {k: v for k, v in rs["autoscaling"].items() if k != "enabled"}
    raw = small_pipeline()
    raw["spec"]["serving"] = serving
    raw["spec"]["registry"] = {"modelName": rs["modelName"], "alias": rs["alias"]}
    return raw


def test_gpu_profile_serves_each_replica_on_a_gpu_in_bf16():
    args = parse_serve_config(_chart_args(VALUES["gpu-values"]))
    assert args.model.resources.num_gpus == 1 and args.model.device == "cuda" and args.model.dtype == "bfloat16"
    assert args.model.num_replicas == 1
    workers = _chart_service(VALUES["gpu-values"])["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize("values", SERVING, ids=lambda p: p.stem)
def test_chart_and_operator_write_the_same_serve_args(values):
    merged = _values(values)
    settings = settings_from_values(merged)
    spec = parse_spec(_pipeline_like_chart(merged)["spec"])
    spec.serving.auth.apiKeySecret = None  # the operator's default Secret: the chart's serving.auth
    chart = _chart_args(values)
    assert parse_serve_config(chart) == parse_serve_config(serve_args(spec, settings))
    assert chart["auth"]["api_key_env"] == "LLAVA_API_KEY"


@pytest.mark.parametrize("values", SERVING, ids=lambda p: p.stem)
def test_serving_pods_read_the_keys_from_secrets(values):
    merged = _values(values)
    for pod in [_chart_service(values)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]]:
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["LLAVA_API_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": merged["serving"]["auth"]["apiKeySecret"]["name"], "key": "api-key"}
        assert ("LLAVA_ADMIN_KEY" in env) == bool(merged["serving"]["auth"]["adminKeySecret"]["name"])


def test_rayservice_without_an_api_key_secret_does_not_render():
    proc = helm("template", "llava", str(CHART), "--set", "rayService.enabled=true", check=False)
    assert proc.returncode != 0 and "serving.auth.apiKeySecret.name" in proc.stderr


@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda p: p.stem)
def test_operator_deployment_env_gives_the_settings_render_uses(values):
    deployment = next(o for o in render(values, ) if o["kind"] == "Deployment"
                      and o["metadata"]["name"].endswith("-operator"))
    env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
           if "value" in e and e["name"].startswith(("LLAVA_OPERATOR_", "MLFLOW_TRACKING_URI"))}
    env.pop("LLAVA_OPERATOR_RECONCILE_SECONDS")
    assert OperatorSettings.from_env(env) == settings_from_values(_values(values), release="llava", namespace="ml")


def _pod_essentials(pod: dict) -> dict:
    c = pod["containers"][0]
    return {"image": c["image"], "pullSecrets": pod.get("imagePullSecrets"), "podSecurity": pod["securityContext"],
            "containerSecurity": {k: v for k, v in c["securityContext"].items() if k != "readOnlyRootFilesystem"},
            "resources": c["resources"], "volumes": pod["volumes"], "mounts": c["volumeMounts"],
            "env": sorted(e["name"] for e in c["env"] if not e["name"].startswith("LLAVA_PIPELINE")),
            "account": pod.get("serviceAccountName")}


@pytest.mark.parametrize("values", SERVING, ids=lambda p: p.stem)
def test_operator_ray_pods_match_the_charts(values):
    """Head and worker pods of the chart's RayService and of an operator-made one, same values."""
    merged = _values(values)
    settings = settings_from_values(merged, release="llava", namespace="ml")
    raw = _pipeline_like_chart(merged)
    rs = merged["rayService"]
    raw["spec"]["cluster"]["head"] = {"cpu": str(rs["head"]["resources"]["limits"]["cpu"]),
                                      "memory": rs["head"]["resources"]["limits"]["memory"]}
    w = rs["workers"]
    raw["spec"]["serving"]["workers"] = {"replicas": w["replicas"], "gpu": w["gpu"],
                                         "cpu": str(w["resources"]["limits"]["cpu"]),
                                         "memory": w["resources"]["limits"]["memory"],
                                         "nodeSelector": w.get("nodeSelector") or {},
                                         "tolerations": w.get("tolerations") or []}
    spec = parse_spec(raw["spec"])
    spec.serving.auth.apiKeySecret = None
    ours = build_rayservice(spec, settings, pipeline="p", uid="u", name="p-serve", model_version=None)
    chart = _chart_service(values)["spec"]["rayClusterConfig"]
    ours_cluster = ours["spec"]["rayClusterConfig"]
    assert ours_cluster["authOptions"] == chart["authOptions"]
    assert ours_cluster["rayVersion"] == chart["rayVersion"]
    pairs = [(ours_cluster["headGroupSpec"], chart["headGroupSpec"]),
             (ours_cluster["workerGroupSpecs"][0], chart["workerGroupSpecs"][0])]
    for mine, theirs in pairs:
        a, b = _pod_essentials(mine["template"]["spec"]), _pod_essentials(theirs["template"]["spec"])
        assert a == b, {k: (a[k], b[k]) for k in a if a[k] != b[k]}
