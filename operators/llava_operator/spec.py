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
    modelName: str = Field("llava", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")


class Serving(StrictModel):
    enabled: bool = True
    numReplicas: int = Field(1, ge=1)
    maxOngoingRequests: int = Field(8, ge=1)
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
    s3_credentials_secret: str | None = None
    s3_access_key_id_key: str = "AWS_ACCESS_KEY_ID"
    s3_secret_access_key_key: str = "AWS_SECRET_ACCESS_KEY"
    ray_service_account: str | None = None
    reconcile_seconds: float = Field(10.0, gt=0)
    mlflow_timeout_seconds: float = Field(5.0, gt=0)
    run_as_user: int = 1000

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
