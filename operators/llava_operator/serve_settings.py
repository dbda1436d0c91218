"""A pipeline's `spec.serving` as the serving application's arguments (`serveConfigV2` args).

The arguments are validated with the serving app's own schema (`llava_platform.serving.config`,
pydantic only: no torch, no Ray), so a setting the replicas would reject fails the pipeline with
`InvalidSpec` here instead of a RayService whose replicas never start.

Serving is closed: the API key comes from a Secret (the pipeline's or the operator's default) as
an env var of every pod of the serving cluster, and a pipeline without one is invalid. Reload is
off unless an admin key Secret is named.
"""

from __future__ import annotations

from typing import Any

from llava_operator.spec import OperatorSettings, PipelineSpec, SecretKeyRef
from llava_platform.config import ConfigError
from llava_platform.serving.config import parse_serve_config

API_KEY_ENV = "LLAVA_API_KEY"
ADMIN_KEY_ENV = "LLAVA_ADMIN_KEY"
GIB = 1024**3


def key_secrets(spec: PipelineSpec, settings: OperatorSettings) -> tuple[SecretKeyRef, SecretKeyRef | None]:
    """(API key Secret, admin key Secret or None); ConfigError when no API key Secret is known."""
    auth = spec.serving.auth
    api = auth.apiKeySecret or (SecretKeyRef(name=settings.serving_api_key_secret, key=settings.serving_api_key_key)
                                if settings.serving_api_key_secret else None)
    if api is None:
        raise ConfigError("serving.auth.apiKeySecret: required (serving is closed by default); name the Secret "
                          "holding the API key, or give the operator a default (chart value "
                          "serving.auth.apiKeySecret.name)")
    admin = auth.adminKeySecret or (SecretKeyRef(name=settings.serving_admin_key_secret,
                                                 key=settings.serving_admin_key_key)
                                    if settings.serving_admin_key_secret else None)
    if admin is not None and (admin.name, admin.key) == (api.name, api.key):
        raise ConfigError("serving.auth.adminKeySecret: must differ from apiKeySecret (an inference key must "
                          "never be able to reload the model)")
    return api, admin


def key_env(spec: PipelineSpec, settings: OperatorSettings) -> list[dict[str, Any]]:
    """The serving keys as secretKeyRef env vars (the operator never reads their values)."""
    api, admin = key_secrets(spec, settings)
    env = [{"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": api.name, "key": api.key}}}]
    if admin is not None:
        env.append({"name": ADMIN_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": admin.name, "key": admin.key}}})
    return env


def serve_args(spec: PipelineSpec, settings: OperatorSettings) -> dict[str, Any]:
    """`build_app` args for the pipeline's champion: replicas, back-pressure, placement, engine, auth."""
    serving = spec.serving
    _, admin = key_secrets(spec, settings)
    resources: dict[str, Any] = {"num_cpus": serving.replica.cpus, "num_gpus": serving.replica.gpus}
    if serving.replica.memoryGi:
        resources["memory_bytes"] = int(serving.replica.memoryGi * GIB)
    model: dict[str, Any] = {
        "num_replicas": serving.numReplicas,
        "max_ongoing_requests": serving.maxOngoingRequests,
        "resources": resources,
        "device": serving.engine.device,
        "dtype": serving.engine.dtype,
        "max_batch_size": serving.engine.maxBatchSize,
        "compile_decode": serving.engine.compileDecode,
    }
    if serving.autoscaling is not None:
        a = serving.autoscaling
        model["autoscaling"] = {"min_replicas": a.minReplicas, "max_replicas": a.maxReplicas,
                                "target_ongoing_requests": a.targetOngoingRequests}
    auth: dict[str, Any] = {"api_key_env": API_KEY_ENV}
    if admin is not None:
        auth.update(admin_key_env=ADMIN_KEY_ENV, reload_any_uri=serving.auth.reloadAnyUri)
    args = {
        "model_uri": f"models:/{spec.registry.modelName}@{spec.registry.alias}",
        "auth": auth,
        "model": model,
    }
    try:
        parse_serve_config(args)
    except ConfigError as err:
        raise ConfigError(f"spec.serving does not make a valid serving config: {err}") from None
    return args
