"""Configuration of the serving application: the `args` of `build_app`, from a Serve config file,
a KubeRay RayService `serveConfigV2`, `llavactl serve --config`, or the embedded default."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from llava_platform.config import StrictModel, validate_config


class ActorResources(StrictModel):
    """Placement of one replica (`ray_actor_options`)."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory_bytes: int | None = Field(None, gt=0)
    accelerator_type: str | None = None

    def ray_actor_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_bytes is not None:
            opts["memory"] = self.memory_bytes
        if self.accelerator_type:
            opts["accelerator_type"] = self.accelerator_type
        return opts


class Autoscaling(StrictModel):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(8.0, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(120.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class ModelDeployment(StrictModel):
    """The serving deployment's replicas: each serves the HTTP API and holds the weights."""

    num_replicas: int = Field(1, ge=1)
    autoscaling: Autoscaling | None = None
    resources: ActorResources = ActorResources()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    torch_threads: int | None = Field(None, ge=1)
    # Continuous batching (llava.infer.engine): at most max_batch_size requests decode together;
    # a request joins the running batch at the next step and leaves as soon as it is finished.
    max_batch_size: int = Field(32, ge=1, le=256)
    # While rows are decoding, a lone arrival waits up to this long for others to share its prefill.
    admit_wait_s: float = Field(0.02, ge=0, le=1)
    # torch.compile the per-token decode step before taking traffic (as production LLM servers do
    # by default): about 1.6x the decode throughput of the tiny model on CPU; start-up takes longer
    # (25-50 s on 2 CPU cores for the tiny model) and the CPU backend needs a C++ compiler (without
    # one the replica decodes eagerly and logs why). Turn off for quick local runs.
    compile_decode: bool = True
    # Which engine of llava.infer.engines.ENGINES decodes: "auto" takes the first that serves the model.
    engine: str = Field("auto", min_length=1)
    # One prefill admits rows while their prompt tokens and images fit these budgets, so a burst of
    # image requests cannot run the device out of memory for everyone; a prompt longer than
    # prefill_tokens is refused with a 400.
    prefill_tokens: int = Field(16384, ge=1)
    prefill_images: int = Field(64, ge=1)
    # Reload memory policy: load_then_swap keeps serving the old model while the new one loads (two
    # models in memory for a moment); unload_first drains and frees the old one first (new requests
    # get 503 + Retry-After for the duration of the load).
    reload_policy: Literal["load_then_swap", "unload_first"] = "load_then_swap"
    # A replica following another replica's reload retries a failed load this many times, with a
    # back-off doubling from reload_backoff_s; until it succeeds /readyz says it is lagging.
    reload_retries: int = Field(3, ge=0, le=20)
    reload_backoff_s: float = Field(1.0, ge=0, le=300)
    # Back-pressure: at most max_ongoing_requests in a replica, max_queued_requests waiting at each
    # caller; beyond that the caller gets BackPressureError and the client a 503 + Retry-After.
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(64, ge=1)
    # Re-resolve model_uri (e.g. models:/llava@champion) this often and switch when it changed; 0 = off.
    watch_interval_s: float = Field(0.0, ge=0)
    health_check_period_s: float = Field(10.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(30.0, ge=0)

    @model_validator(mode="after")
    def _batch_fits(self) -> ModelDeployment:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("max_ongoing_requests must be >= max_batch_size, or the batch can never fill")
        return self


class Limits(StrictModel):
    max_request_bytes: int = Field(32 * 1024 * 1024, gt=0)
    max_images: int = Field(4, ge=0)
    max_image_bytes: int = Field(16 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(25_000_000, gt=0)  # decompression-bomb guard
    max_tokens: int = Field(1024, ge=1)  # the largest max_tokens a client may ask for
    default_max_tokens: int = Field(128, ge=1)
    max_stop_sequences: int = Field(4, ge=0)
    max_messages: int = Field(64, ge=1)
    max_n: int = Field(8, ge=1, le=128)  # answers per request (`n`); they share one prefill


class Auth(StrictModel):
    """Bearer-token auth. Inference keys guard the API when a key source is set; `/admin/reload`
    is off unless an admin key source is set, and the admin key must differ from the inference key
    (an inference caller must never be able to swap the served model). Keys are never logged."""

    api_key_env: str | None = None
    api_key_file: str | None = None
    admin_key_env: str | None = None
    admin_key_file: str | None = None
    # Reload accepts only models:/<served registered model>@alias or /version (the promotion gate
    # decides what the alias points at); true widens it to any URI the loader understands.
    reload_any_uri: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.api_key_env or self.api_key_file)

    @property
    def admin_enabled(self) -> bool:
        return bool(self.admin_key_env or self.admin_key_file)


class ServeConfig(StrictModel):
    model_uri: str = Field(min_length=1)
    served_model_name: str = Field("llava", min_length=1)
    app_name: str = "llava"
    route_prefix: str = "/"
    # None: images are prepared as the model's metadata record says it was trained (pad without a
    # record); a value overrides the record, as evaluation's generation.image_mode does.
    image_mode: Literal["pad", "resize"] | None = None
    allow_remote_images: bool = False
    remote_image_timeout_s: float = Field(10.0, gt=0)
    # With remote images on, hosts that resolve to loopback, private, link-local (the cloud metadata
    # service) or other non-public addresses are still refused unless this is set.
    remote_image_private_hosts: bool = False
    mlflow_tracking_uri: str | None = None
    model_cache_dir: str | None = None
    # Downloaded model versions kept in model_cache_dir (the served ones are never removed).
    model_cache_keep: int = Field(3, ge=1)
    retry_after_s: int = Field(1, ge=1)
    access_log: bool = True  # one log line per request per replica; off for load tests
    limits: Limits = Limits()
    auth: Auth = Auth()
    model: ModelDeployment = ModelDeployment()


def parse_serve_config(args: dict[str, Any] | ServeConfig) -> ServeConfig:
    if isinstance(args, ServeConfig):
        return args
    return validate_config(ServeConfig, dict(args or {}), source="serve args")
