"""Typed configuration of a training stage: the schema behind jobs/configs/*.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from llava_platform.config import StrictModel


class ModelSection(StrictModel):
    vision: str = Field(description="CLIP-family vision checkpoint: local dir or hub id")
    language_model: str = Field(description="causal LM checkpoint: local dir or hub id")
    projector: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    vision_feature_layer: int = -2
    feature_select: Literal["patch", "cls_patch"] = "patch"
    init_from: str | None = Field(None, description="previous stage's llava-hf output (path or URI)")
    gradient_checkpointing: bool = False


class DataSection(StrictModel):
    records: str | None = Field(None, description="LLaVA JSON/JSONL file (quick path)")
    image_root: str | None = None
    processed: str | None = Field(None, description="processed Parquet shards (URI) from jobs.preprocess")
    template: Literal["plain", "vicuna_v1", "chatml"] = "vicuna_v1"
    max_length: int = Field(2048, gt=0)
    image_mode: Literal["pad", "resize"] = "pad"
    group_by_modality_length: bool = True
    packing: bool = False
    max_reject_fraction: float = Field(0.05, ge=0, le=1)
    # DataLoader processes per training worker that read rows, decode images and collate ahead of
    # the step (0: in the training process itself); each keeps `prefetch_batches` micro-batches ready.
    loader_workers: int = Field(2, ge=0)
    prefetch_batches: int = Field(2, ge=1)
    sample_trace: str | None = Field(None, description="local folder: each rank appends its per-step sample "
                                                       "ids (rank-N.jsonl), for debugging and resume checks")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.records is None) == (self.processed is None):
            raise ValueError("set exactly one of data.records or data.processed")
        return self


class OptimSection(StrictModel):
    lr: float = Field(gt=0)
    projector_lr: float | None = Field(None, gt=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="overrides epochs when set")
    global_batch: int = Field(gt=0)
    micro_batch: int = Field(gt=0)
    grad_clip: float = Field(1.0, gt=0)


class DistributedSection(StrictModel):
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 (+tf32) on GPU, fp32 on CPU
    max_failures: int = Field(0, ge=-1)


class CheckpointSection(StrictModel):
    storage: str = Field(description="local path or s3:// URI for Ray Train checkpoints")
    every_n_steps: int = Field(50, gt=0)
    keep: int = Field(2, gt=0)
    resume_from: str | None = Field(None, description="checkpoint path/URI to resume from")


class TrackingSection(StrictModel):
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI
    experiment: str = "llava"
    run_name: str | None = None
    parent_run_id: str | None = None


class TrainConfig(StrictModel):
    stage: Literal[1, 2]
    name: str = Field("llava", description="run name; Ray Train storage folder")
    seed: int = 0
    model: ModelSection
    data: DataSection
    optim: OptimSection
    distributed: DistributedSection = DistributedSection()
    checkpoint: CheckpointSection
    tracking: TrackingSection = TrackingSection()
    output: str = Field(description="where the llava-hf model directory is exported (path or URI)")
    stop_after_steps: int | None = Field(None, gt=0, description="end early after this step (interrupt drills)")


def _absolute(value: str | None, *, must_exist: bool = False) -> str | None:
    """Local paths become absolute (Ray workers run in another directory); URIs (s3://, runs:/,
    models:/) and hub ids pass through. With `must_exist`, only an existing path counts as local."""
    if value is None or "://" in value or value.startswith(("runs:/", "models:/")):
        return value
    path = Path(value).expanduser()
    if must_exist and not path.exists():
        return value  # a hub id such as lmsys/vicuna-7b-v1.5
    return str(path.resolve())


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    data = cfg.model_dump()
    m, d = data["model"], data["data"]
    m["vision"] = _absolute(m["vision"], must_exist=True)
    m["language_model"] = _absolute(m["language_model"], must_exist=True)
    m["init_from"] = _absolute(m["init_from"])
    for key in ("records", "image_root", "processed", "sample_trace"):
        d[key] = _absolute(d[key])
    data["checkpoint"]["storage"] = _absolute(data["checkpoint"]["storage"])
    data["checkpoint"]["resume_from"] = _absolute(data["checkpoint"]["resume_from"])
    data["output"] = _absolute(data["output"])
    return TrainConfig.model_validate(data)
