"""KubeRay objects for a pipeline: one RayJob per job phase attempt and one RayService for serving.

Every pod the operator asks for runs as non-root with no privilege escalation and all capabilities
dropped, with requests equal to limits; credentials reach pods only as secretKeyRef env vars. Ray
token authentication is on for every cluster (KubeRay `authOptions.mode: token`).
The root filesystem of Ray pods stays writable: Ray writes session files, runtime envs and caches
under /tmp and the home directory of the image, which also holds the Python environment.
"""

from __future__ import annotations

import shlex
from typing import Any

import yaml

from llava_operator.phases import ENTRYPOINT_MODULES, placeholder_values, render_overrides
from llava_operator.serve_settings import key_env, serve_args
from llava_operator.spec import OperatorSettings, PipelineSpec, Workers

LABEL_PIPELINE = "llava.dev/pipeline"
LABEL_PHASE = "llava.dev/phase"
LABEL_ATTEMPT = "llava.dev/attempt"
MANAGED_BY = {"app.kubernetes.io/managed-by": "llava-operator"}
SHM_SIZE = "2Gi"


def _security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
    }


def _pod_security_context(settings: OperatorSettings) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": settings.run_as_user,
        "runAsGroup": 100,
        "fsGroup": 100,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _resources(cpu: str, memory: str, gpu: int = 0) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpu:
        amounts["nvidia.com/gpu"] = gpu
    return {"requests": dict(amounts), "limits": dict(amounts)}


def secret_env(spec: PipelineSpec, settings: OperatorSettings) -> list[dict[str, Any]]:
    """Credentials as secretKeyRef references only; the operator never reads secret values."""
    env: list[dict[str, Any]] = []
    s3_secret = spec.s3.credentialsSecret
    name = s3_secret.name if s3_secret else settings.s3_credentials_secret
    if name:
        keys = (s3_secret.accessKeyIdKey, s3_secret.secretAccessKeyKey) if s3_secret else (
            settings.s3_access_key_id_key, settings.s3_secret_access_key_key)
        for var, key in zip(("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), keys, strict=True):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": name, "key": key}}})
    if settings.mlflow_credentials_secret:
        for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {
                "name": settings.mlflow_credentials_secret, "key": var}}})
    return env


def plain_env(spec: PipelineSpec, settings: OperatorSettings, uid: str, phase: str) -> dict[str, str]:
    env = {"LLAVA_PIPELINE_ID": uid, "LLAVA_PIPELINE_PHASE": phase}
    if settings.mlflow_tracking_uri:
        env["MLFLOW_TRACKING_URI"] = settings.mlflow_tracking_uri
    endpoint = spec.s3.endpointUrl or settings.s3_endpoint_url
    if endpoint:
        env["AWS_ENDPOINT_URL_S3"] = endpoint
    region = spec.s3.region or settings.s3_region
    if region:
        env["AWS_DEFAULT_REGION"] = region
    return env


def _container(name: str, image: str, resources: dict, env: list[dict], ports: list[dict] | None = None) -> dict:
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "resources": resources,
        "securityContext": _security_context(),
        "env": env,
        "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
    }
    if ports:
        container["ports"] = ports
    return container


def _pod(containers: list[dict], spec: PipelineSpec, settings: OperatorSettings, workers: Workers | None = None) -> dict:
    pod: dict[str, Any] = {
        "securityContext": _pod_security_context(settings),
        "automountServiceAccountToken": False,
        "containers": containers,
        "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}}],
    }
    account = spec.serviceAccountName or settings.ray_service_account
    if account:
        pod["serviceAccountName"] = account
    if settings.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n.strip()} for n in settings.image_pull_secrets.split(",") if n.strip()]
    if workers is not None:
        if workers.nodeSelector:
            pod["nodeSelector"] = dict(workers.nodeSelector)
        if workers.tolerations:
            pod["tolerations"] = [t.model_dump(exclude_none=True) for t in workers.tolerations]
    return {"spec": pod}


def auth_options(settings: OperatorSettings) -> dict[str, Any]:
    """KubeRay token auth, with the chart's shared token Secret when it names one."""
    options: dict[str, Any] = {"mode": "token"}
    if settings.ray_token_secret:
        options["secretName"] = settings.ray_token_secret
    return options


def ray_cluster_spec(spec: PipelineSpec, settings: OperatorSettings, env: dict[str, str],
                     workers: Workers, extra_env: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The cluster a RayJob or RayService brings up: a head plus (optionally) one worker group."""
    env_list = ([{"name": k, "value": v} for k, v in sorted(env.items())] + secret_env(spec, settings)
                + list(extra_env or []))
    image = spec.image or settings.image
    head_params: dict[str, str] = {"dashboard-host": "0.0.0.0"}
    if workers.replicas > 0:
        head_params["num-cpus"] = "0"  # keep work off the head when there are workers to run it
    ports = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
             {"containerPort": 10001, "name": "client"}, {"containerPort": 8000, "name": "serve"}]
    head = _container("ray-head", image, _resources(spec.cluster.head.cpu, spec.cluster.head.memory),
                      env_list, ports)
    cluster: dict[str, Any] = {
        "rayVersion": settings.ray_version,
        "authOptions": auth_options(settings),
        "headGroupSpec": {"rayStartParams": head_params, "template": _pod([head], spec, settings)},
    }
    if workers.replicas > 0:
        worker_image = (spec.gpuImage or settings.gpu_image) if workers.gpu else image
        worker = _container("ray-worker", worker_image, _resources(workers.cpu, workers.memory, workers.gpu),
                            env_list)
        cluster["workerGroupSpecs"] = [{
            "groupName": "gpu-workers" if workers.gpu else "cpu-workers",
            "replicas": workers.replicas,
            "minReplicas": workers.replicas,
            "maxReplicas": workers.replicas,
            "rayStartParams": {},
            "template": _pod([worker], spec, settings, workers),
        }]
    return cluster


def entrypoint(spec: PipelineSpec, settings: OperatorSettings, phase: str, name: str, uid: str) -> str:
    """`cd <app dir> && python -m jobs.<x> --config <yaml> k=v ...`: the job contract, run from the image's
    copy of the repository so that relative config paths mean the same as in a checkout."""
    stage = getattr(spec.stages, phase)
    overrides = render_overrides(stage.overrides, placeholder_values(spec, name, uid))
    argv = ["python", "-m", ENTRYPOINT_MODULES[phase], "--config", stage.config, *overrides]
    return f"cd {shlex.quote(settings.app_dir)} && {shlex.join(argv)}"


def build_rayjob(spec: PipelineSpec, settings: OperatorSettings, *, pipeline: str, uid: str,
                 phase: str, attempt: int, job_name: str) -> dict[str, Any]:
    stage = getattr(spec.stages, phase)
    env = plain_env(spec, settings, uid, phase)
    workers = stage.workers or spec.cluster.workers
    body: dict[str, Any] = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": job_name,
            "labels": {**MANAGED_BY, LABEL_PIPELINE: pipeline, LABEL_PHASE: phase, LABEL_ATTEMPT: str(attempt)},
        },
        "spec": {
            "entrypoint": entrypoint(spec, settings, phase, pipeline, uid),
            "runtimeEnvYAML": yaml.safe_dump({"env_vars": env}, sort_keys=True),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": spec.ttlSecondsAfterFinished,
            "backoffLimit": spec.retryPolicy.backoffLimit,
            "submissionMode": "K8sJobMode",
            "submitterPodTemplate": _pod([_container(
                "ray-job-submitter", spec.image or settings.image, _resources("500m", "512Mi"), [])],
                spec, settings),
            "rayClusterSpec": ray_cluster_spec(spec, settings, env, workers),
        },
    }
    body["spec"]["submitterPodTemplate"]["spec"]["restartPolicy"] = "Never"
    if spec.retryPolicy.activeDeadlineSeconds:
        body["spec"]["activeDeadlineSeconds"] = spec.retryPolicy.activeDeadlineSeconds
    return body


def serve_config(spec: PipelineSpec, settings: OperatorSettings, uid: str, model_version: str | None) -> str:
    env = plain_env(spec, settings, uid, "serve")
    # A new registered version under the same alias must redeploy the app: Serve only reloads when
    # serveConfigV2 changes, so the version the operator saw is part of the config.
    if model_version:
        env["LLAVA_MODEL_VERSION"] = str(model_version)
    app = {
        "name": "llava",
        "route_prefix": "/",
        "import_path": "llava_platform.serving.app:build_app",
        "args": serve_args(spec, settings),
        "runtime_env": {"env_vars": env},
    }
    return yaml.safe_dump({"applications": [app]}, sort_keys=False)


def build_rayservice(spec: PipelineSpec, settings: OperatorSettings, *, pipeline: str, uid: str,
                     name: str, model_version: str | None) -> dict[str, Any]:
    env = plain_env(spec, settings, uid, "serve")
    # Pods for the Serve replicas (spec.serving.numReplicas / autoscaling count replicas, not pods).
    workers = spec.serving.workers or Workers(replicas=1, cpu="4", memory="16Gi")
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": {**MANAGED_BY, LABEL_PIPELINE: pipeline, LABEL_PHASE: "serve"}},
        "spec": {
            "serveConfigV2": serve_config(spec, settings, uid, model_version),
            "rayClusterConfig": ray_cluster_spec(spec, settings, env, workers, key_env(spec, settings)),
        },
    }
