"""The LlavaPipeline spec as typed models, and the operator's own settings read from the environment.

The models mirror the CRD's OpenAPI schema in charts/llava-platform/crds/, including its defaults:
the API server fills those defaults on a real cluster, these models fill them everywhere else
(the emulator in tests, objects created before a default was added).
"""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import Field, field_validator

from llava_platform.config import ConfigError, StrictModel, validate_config

QUANTITY_CPU = r"^[0-9]+(\.[0-9]+)?m?$"
QUANTITY_MEMORY = r"^[0-9]+(\.[0-9]+)?([EPTGMK]i?)?$"


class Toleration(StrictModel):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: int | None = None


class Workers(StrictModel):
    replicas: int = Field(1, ge=0, le=512)
    cpu: str = Field("4", pattern=QUANTITY_CPU)
    memory: str = Field("16Gi", pattern=QUANTITY_MEMORY)
    gpu: int = Field(0, ge=0, le=16)
    nodeSelector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)


class Head(StrictModel):
    cpu: str = Field("2", pattern=QUANTITY_CPU)
    memory: str = Field("8Gi", pattern=QUANTITY_MEMORY)


class Cluster(StrictModel):
    head: Head = Field(default_factory=Head)
    workers: Workers = Field(default_factory=Workers)


class Stage(StrictModel):
    enabled: bool = True
    config: str = Field(min_length=1)
    overrides: list[str] = Field(default_factory=list)
    workers: Workers | None = None

    @field_validator("overrides")
    @classmethod
    def _key_value(cls, values: list[str]) -> list[str]:
        for text in values:
            if not re.match(r"^[A-Za-z0-9_.-]+=", text):
                raise ValueError(f"override {text!r} is not of the form key=value")
        return values


class Stages(StrictModel):
    preprocess: Stage | None = None
    stage1: Stage
    stage2: Stage
    evaluate: Stage | None = None
    promote: Stage


class Data(StrictModel):
    sourceUri: str = Field(min_length=1)
    outputUri: str = Field(min_length=1)


class Models(StrictModel):
    vision: str = Field(min_length=1)
    language: str = Field(min_length=1)


class Gate(StrictModel):
    metric: str = Field(min_length=1)
    threshold: float
    higherIsBetter: bool = True


class Evaluation(StrictModel):
    gate: Gate | None = None


class Registry(StrictModel):
    modelName: str = Field("llava-tiny", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")


class ServeReplica(StrictModel):
    """What one Serve replica reserves on its Ray node (`ray_actor_options`)."""

    cpus: float = Field(1.0, ge=0)
    gpus: float = Field(0.0, ge=0)
    memoryGi: float | None = Field(None, gt=0)


class ServeEngine(StrictModel):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    maxBatchSize: int = Field(32, ge=1, le=256)
    compileDecode: bool = True


class ServeAutoscaling(StrictModel):
    minReplicas: int = Field(1, ge=0)
    maxReplicas: int = Field(1, ge=1)
    targetOngoingRequests: float = Field(8.0, gt=0)


class SecretKeyRef(StrictModel):
    name: str = Field(min_length=1)
    key: str = Field(min_length=1)


class ServeAuth(StrictModel):
    """Serving is closed: the API key Secret is required (here or as the operator's default);
    `/admin/reload` stays off unless an admin key Secret is named."""

    apiKeySecret: SecretKeyRef | None = None
    adminKeySecret: SecretKeyRef | None = None
    reloadAnyUri: bool = False


class Serving(StrictModel):
    enabled: bool = True
    numReplicas: int = Field(1, ge=1, description="Serve replicas (ignored when autoscaling is set)")
    maxOngoingRequests: int = Field(32, ge=1)
    autoscaling: ServeAutoscaling | None = None
    replica: ServeReplica = Field(default_factory=ServeReplica)
    engine: ServeEngine = Field(default_factory=ServeEngine)
    auth: ServeAuth = Field(default_factory=ServeAuth)
    workers: Workers | None = None


class RetryPolicy(StrictModel):
    maxAttempts: int = Field(2, ge=1, le=10)
    backoffLimit: int = Field(0, ge=0, le=10)
    activeDeadlineSeconds: int | None = Field(None, ge=60)


class SecretKeys(StrictModel):
    name: str = Field(min_length=1)
    accessKeyIdKey: str = "AWS_ACCESS_KEY_ID"
    secretAccessKeyKey: str = "AWS_SECRET_ACCESS_KEY"


class S3(StrictModel):
    endpointUrl: str | None = None
    region: str | None = None
    credentialsSecret: SecretKeys | None = None


class PipelineSpec(StrictModel):
    image: str | None = None
    gpuImage: str | None = None
    serviceAccountName: str | None = None
    data: Data
    models: Models
    stages: Stages
    cluster: Cluster = Field(default_factory=Cluster)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    registry: Registry = Field(default_factory=Registry)
    serving: Serving = Field(default_factory=Serving)
    retryPolicy: RetryPolicy = Field(default_factory=RetryPolicy)
    ttlSecondsAfterFinished: int = Field(600, ge=0)
    s3: S3 = Field(default_factory=S3)


def parse_spec(raw: dict) -> PipelineSpec:
    """Validate a pipeline's spec; raises ConfigError naming the offending key."""
    return validate_config(PipelineSpec, dict(raw), source="LlavaPipeline.spec")


class OperatorSettings(StrictModel):
    """Cluster-wide defaults, set by the Helm chart as LLAVA_OPERATOR_* environment variables."""

    image: str = "ghcr.io/llava-platform/llava-platform:0.1.0"
    gpu_image: str = "ghcr.io/llava-platform/llava-platform:0.1.0-gpu"
    ray_version: str = "2.60.0"
    # Where the runtime image keeps the repository; job config paths in a pipeline are relative to it.
    app_dir: str = "/home/ray/app"
    mlflow_tracking_uri: str | None = None
    # Secret holding MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD when MLflow has auth on.
    mlflow_credentials_secret: str | None = None
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_credentials_secret: str | None = None
    s3_access_key_id_key: str = "AWS_ACCESS_KEY_ID"
    s3_secret_access_key_key: str = "AWS_SECRET_ACCESS_KEY"
    ray_service_account: str | None = None
    # The chart's imagePullSecrets (comma-separated names) and shared Ray token Secret, so that
    # operator-made pods match the chart's own Ray pods.
    image_pull_secrets: str | None = None
    ray_token_secret: str | None = None
    reconcile_seconds: float = Field(10.0, gt=0)
    mlflow_timeout_seconds: float = Field(5.0, gt=0)
    run_as_user: int = 1000
    # The chart's serving Secrets: used by pipelines whose spec names none.
    serving_api_key_secret: str | None = None
    serving_api_key_key: str = "api-key"
    serving_admin_key_secret: str | None = None
    serving_admin_key_key: str = "admin-key"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> OperatorSettings:
        env = os.environ if environ is None else environ
        prefix = "LLAVA_OPERATOR_"
        data: dict[str, str] = {}
        for name in cls.model_fields:
            key = prefix + name.upper()
            if env.get(key):
                data[name] = env[key]
        if "mlflow_tracking_uri" not in data and env.get("MLFLOW_TRACKING_URI"):
            data["mlflow_tracking_uri"] = env["MLFLOW_TRACKING_URI"]
        return validate_config(cls, data, source="operator environment")


__all__ = ["ConfigError", "OperatorSettings", "PipelineSpec", "parse_spec"]
