"""Train one LLaVA stage on Ray Train + DeepSpeed.

    python -m jobs.train --config jobs/configs/tiny_stage1.yaml key=value ...
    ray job submit -- python -m jobs.train --config jobs/configs/llava15_7b_stage2.yaml

The driver creates the stage's MLflow run (nested under a pipeline run when one is given), logs the
config and the DeepSpeed config, and runs `jobs.train_worker.train_loop` on every worker.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from jobs.processed_data import ProcessedDataError, read_manifest
from jobs.train_config import TrainConfig, with_absolute_paths
from llava.model.metadata import MetadataError, check_dataset_fields
from llava_platform import preflight, storage, tracking
from llava_platform.config import ConfigError, job_arguments, load_config

# MLflow run tag holding the run's Ray Train checkpoint folder (what `checkpoint.resume_run` reopens)
CHECKPOINT_TAG = "llava.checkpoint_location"


@dataclass
class TrainResult:
    run_id: str | None
    output: str
    checkpoint: str | None
    metrics: dict


def _ray_init() -> None:
    import ray

    from jobs.train_worker import worker_env

    if not ray.is_initialized():
        # RAY_ADDRESS (set by `ray job submit` and by `llavactl run`) joins an existing cluster; the
        # job's runtime env carries what workers need (DeepSpeed picks its accelerator at import).
        # Under `ray job submit` (every KubeRay RayJob) Ray refuses a driver runtime env that repeats
        # a variable of the job's own runtime env, which reaches the workers anyway: pass the others.
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
        env = {k: v for k, v in worker_env().items() if k not in (job.get("env_vars") or {})}
        ray.init(address=os.environ.get("RAY_ADDRESS"), runtime_env={"env_vars": env})


def _log_config_artifacts(run_id: str, cfg: TrainConfig, world_size: int) -> None:
    from mlflow.tracking import MlflowClient

    from llava.train.deepspeed_config import BatchPlan, deepspeed_config

    precision = cfg.distributed.precision if cfg.distributed.precision != "auto" else (
        "bf16" if cfg.distributed.use_gpu else "fp32")
    ds = deepspeed_config(BatchPlan(cfg.optim.global_batch, cfg.optim.micro_batch, world_size),
                          zero_stage=cfg.distributed.zero_stage, precision=precision, grad_clip=cfg.optim.grad_clip)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "train_config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        Path(tmp, "deepspeed_config.json").write_text(json.dumps(ds, indent=2))
        MlflowClient().log_artifacts(run_id, tmp, "config")


def _run_config(cfg: TrainConfig, location: str):
    """Ray Train's run config for the checkpoint folder `location` (`<storage>/<storage name>`).
    Ray restores the checkpoint snapshot it finds there: after a worker-group restart within this
    run, and when `checkpoint.resume_run` reopens an earlier run; a new run's folder is empty."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    from jobs.train_worker import worker_env

    parent, _, name = location.rstrip("/").rpartition("/")
    fs, path = (None, parent)
    if storage.is_s3(parent):
        fs, path = storage.pyarrow_filesystem(parent)
    else:
        path = str(storage.local_path(path).resolve())
    return RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=fs,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
        failure_config=FailureConfig(max_failures=cfg.distributed.max_failures),
        # The job may join a cluster started elsewhere: workers get the variables they need here.
        worker_runtime_env={"env_vars": worker_env()},
    )


def check_training_data(cfg: TrainConfig) -> int:
    """On the driver, before Ray starts: the data exists and fills at least one global batch.
    Returns the number of samples (processed: written by pre-processing; records: before rejects,
    which the workers count again after encoding)."""
    from llava.data.records import parse_records
    from llava.train.dataset import check_fits_global_batch

    if cfg.data.processed:
        try:
            manifest = read_manifest(cfg.data.processed)
            # the shards hold token ids rendered with the manifest's template and image mode
            check_dataset_fields(manifest.get("dataset") or {}, template=cfg.data.template,
                                 image_mode=cfg.data.image_mode, source=cfg.data.processed)
        except (ProcessedDataError, MetadataError) as err:
            raise ConfigError(f"data.processed: {err}") from None
        count = manifest["counts"]["written"]
    else:
        if not storage.exists(cfg.data.records):
            raise ConfigError(f"data.records: {cfg.data.records} does not exist")
        count = len(parse_records(storage.read_text(cfg.data.records), cfg.data.records))
    try:
        check_fits_global_batch(count, cfg.optim.global_batch)
    except ValueError as err:
        raise ConfigError(f"optim.global_batch: {err}") from None
    return count


def _start_run(cfg: TrainConfig) -> tuple[str, str]:
    """A new MLflow run for this training and its own checkpoint folder, named after the run: a
    rerun of the same config never picks up an earlier run's checkpoints. Returns (run id, folder)."""
    run_name = cfg.tracking.run_name or f"{cfg.name}-stage{cfg.stage}"
    run_id = tracking.start_job_run(cfg.tracking.experiment, run_name, f"stage{cfg.stage}", cfg.tracking.parent_run_id)
    location = storage.join(cfg.checkpoint.storage, f"{cfg.name}-{run_id}")
    tracking.set_tag(run_id, CHECKPOINT_TAG, location)
    tracking.log_params(run_id, cfg.model_dump(mode="json"))
    _log_config_artifacts(run_id, cfg, cfg.distributed.num_workers)
    return run_id, location


def _reopen_run(run_id: str) -> tuple[str, str]:
    """`checkpoint.resume_run`: the earlier run continues (same MLflow run, same checkpoint folder,
    so Ray Train restores its latest checkpoint). Its params stay as first logged."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ConfigError(f"checkpoint.resume_run: no MLflow run {run_id!r} ({err.message})") from None
    location = run.data.tags.get(CHECKPOINT_TAG)
    if not location:
        raise ConfigError(f"checkpoint.resume_run: run {run_id} has no {CHECKPOINT_TAG} tag; it was not started by "
                          "jobs.train (use checkpoint.resume_from=<checkpoint dir> instead)")
    if not storage.exists(storage.join(location, "checkpoint_manager_snapshot.json")):
        raise ConfigError(f"checkpoint.resume_run: run {run_id} has no checkpoint under {location} to resume from")
    client.update_run(run_id, status="RUNNING")
    return run_id, location


def run_training(cfg: TrainConfig) -> TrainResult:
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.train_worker import train_loop

    cfg = with_absolute_paths(cfg)
    check_train_inputs(cfg, tracking.configure(cfg.tracking.tracking_uri))
    check_training_data(cfg)
    if cfg.checkpoint.resume_run:
        run_id, location = _reopen_run(cfg.checkpoint.resume_run)
    else:
        run_id, location = _start_run(cfg)
    print(f"[train] MLflow run {run_id}; checkpoints in {location}", flush=True)
    try:  # from here on a failure, before or during training, leaves the run FAILED, not RUNNING
        _ray_init()
        scaling = ScalingConfig(
            num_workers=cfg.distributed.num_workers,
            use_gpu=cfg.distributed.use_gpu,
            resources_per_worker={"CPU": cfg.distributed.cpus_per_worker,
                                  **({"GPU": 1} if cfg.distributed.use_gpu else {})},
        )
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "run_id": run_id,
                               "tracking_uri": tracking.configure()},
            scaling_config=scaling,
            run_config=_run_config(cfg, location),
        )
        result = trainer.fit()
    except BaseException:
        tracking.finish_run(run_id, "FAILED")
        raise
    tracking.finish_run(run_id)
    ckpt = result.checkpoint.path if result.checkpoint else None
    return TrainResult(run_id, cfg.output, ckpt, dict(result.metrics or {}))


def check_train_inputs(cfg: TrainConfig, tracking_uri: str) -> None:
    """On the driver, in seconds, before any run or Ray: what the workers would otherwise find
    missing minutes later (GPU, tracking store, model directories, images, checkpoint to resume)."""
    preflight.require_gpu_reachable(cfg.distributed.use_gpu, "distributed.use_gpu")
    preflight.require_tracking_store(tracking_uri)
    if not cfg.model.init_from:  # with init_from, the vision tower and LM come from that model
        preflight.require_model_dir(cfg.model.vision, "model.vision")
        preflight.require_model_dir(cfg.model.language_model, "model.language_model")
    preflight.require_model_dir(cfg.model.init_from, "model.init_from", tracking_uri=tracking_uri)
    preflight.require_path(cfg.data.image_root, "data.image_root")
    preflight.require_path(cfg.checkpoint.resume_from, "checkpoint.resume_from")


def main(argv: list[str] | None = None) -> int:
    config, overrides = job_arguments(argv, prog="python -m jobs.train", description=__doc__.splitlines()[0],
                                      example="optim.lr=1e-4", schema=TrainConfig)
    return preflight.guarded("python -m jobs.train", lambda: _train_main(config, overrides),
                             input_errors=(ConfigError,))


def _train_main(config: str | None, overrides: list[str]) -> int:
    result = run_training(load_config(TrainConfig, config, overrides))
    print(json.dumps({"run_id": result.run_id, "output": result.output, "checkpoint": result.checkpoint,
                      "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
