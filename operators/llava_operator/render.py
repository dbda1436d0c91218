"""The objects the operator would create for a LlavaPipeline, without a cluster: what
`llavactl pipeline render FILE [--values VALUES]` prints.

The manifests come from the builders the operator runs (`builders.build_rayjob` per enabled job
phase, attempt 1, and `builders.build_rayservice`); the operator settings come from the chart
values the same way the chart's operator Deployment sets them (`settings_from_values`, compared
with the rendered Deployment's env by tests/operators/test_render.py).
"""

from __future__ import annotations

from typing import Any

import yaml

from llava_operator.builders import build_rayjob, build_rayservice
from llava_operator.phases import child_name, enabled_phases
from llava_operator.spec import OperatorSettings, parse_spec


def _dig(values: dict, path: str, default: Any = None) -> Any:
    node: Any = values
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def settings_from_values(values: dict, *, release: str = "llava", namespace: str = "default") -> OperatorSettings:
    """OperatorSettings as the chart's operator Deployment configures them (charts/llava-platform)."""
    fullname = release if "llava-platform" in release else f"{release}-llava-platform"
    image = f"{_dig(values, 'image.repository', 'ghcr.io/llava-platform/llava-platform')}:" \
            f"{_dig(values, 'image.tag', '0.1.0')}"
    gpu_image = f"{_dig(values, 'image.repository', 'ghcr.io/llava-platform/llava-platform')}:" \
                f"{_dig(values, 'image.gpuTag', '0.1.0-gpu')}"
    env: dict[str, str] = {
        "LLAVA_OPERATOR_IMAGE": image,
        "LLAVA_OPERATOR_GPU_IMAGE": gpu_image,
        "LLAVA_OPERATOR_RAY_VERSION": str(_dig(values, "rayVersion", "2.60.0")),
        "LLAVA_OPERATOR_RUN_AS_USER": str(_dig(values, "podSecurityContext.runAsUser", 1000)),
    }
    optional = {
        "LLAVA_OPERATOR_RAY_SERVICE_ACCOUNT": _dig(values, "operator.rayServiceAccount"),
        "LLAVA_OPERATOR_IMAGE_PULL_SECRETS": ",".join(s["name"] for s in _dig(values, "imagePullSecrets") or []),
        "LLAVA_OPERATOR_RAY_TOKEN_SECRET": _dig(values, "ray.auth.tokenSecret"),
        "LLAVA_OPERATOR_S3_REGION": _dig(values, "s3.region"),
        "LLAVA_OPERATOR_S3_ENDPOINT_URL": _dig(values, "s3.endpointUrl") or (
            f"http://{fullname}-minio.{namespace}.svc:9000" if _dig(values, "minio.enabled") else None),
        "LLAVA_OPERATOR_SERVING_API_KEY_SECRET": _dig(values, "serving.auth.apiKeySecret.name"),
        "LLAVA_OPERATOR_SERVING_API_KEY_KEY": _dig(values, "serving.auth.apiKeySecret.key"),
        "LLAVA_OPERATOR_SERVING_ADMIN_KEY_SECRET": _dig(values, "serving.auth.adminKeySecret.name"),
        "LLAVA_OPERATOR_SERVING_ADMIN_KEY_KEY": _dig(values, "serving.auth.adminKeySecret.key"),
    }
    if _dig(values, "s3.credentialsSecret.name"):
        optional.update({
            "LLAVA_OPERATOR_S3_CREDENTIALS_SECRET": _dig(values, "s3.credentialsSecret.name"),
            "LLAVA_OPERATOR_S3_ACCESS_KEY_ID_KEY": _dig(values, "s3.credentialsSecret.accessKeyIdKey"),
            "LLAVA_OPERATOR_S3_SECRET_ACCESS_KEY_KEY": _dig(values, "s3.credentialsSecret.secretAccessKeyKey"),
        })
    if _dig(values, "mlflow.enabled", True):
        optional["LLAVA_OPERATOR_MLFLOW_TRACKING_URI"] = \
            f"http://{fullname}-mlflow.{namespace}.svc:{_dig(values, 'mlflow.port', 5000)}"
        if _dig(values, "mlflow.auth.enabled"):
            optional["LLAVA_OPERATOR_MLFLOW_CREDENTIALS_SECRET"] = _dig(values, "mlflow.auth.clientCredentialsSecret")
    env.update({k: str(v) for k, v in optional.items() if v})
    return OperatorSettings.from_env(env)


def render_pipeline(pipeline: dict, settings: OperatorSettings, *, uid: str = "preview") -> list[dict[str, Any]]:
    """Every RayJob (attempt 1 of each enabled job phase) and the RayService, as the operator builds them."""
    name = pipeline["metadata"]["name"]
    spec = parse_spec(pipeline.get("spec") or {})
    objects: list[dict[str, Any]] = []
    for phase in enabled_phases(spec):
        if phase == "serve":
            objects.append(build_rayservice(spec, settings, pipeline=name, uid=uid,
                                            name=child_name(name, "serve"), model_version=None))
        else:
            objects.append(build_rayjob(spec, settings, pipeline=name, uid=uid, phase=phase, attempt=1,
                                        job_name=child_name(name, phase, 1)))
    namespace = (pipeline.get("metadata") or {}).get("namespace")
    if namespace:
        for obj in objects:
            obj["metadata"]["namespace"] = namespace
    return objects


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)
