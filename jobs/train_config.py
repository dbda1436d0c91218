"""Typed configuration of a training stage: the schema behind jobs/configs/*.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from llava.data.templates import TemplateName
from llava_platform.config import StrictModel


class ModelSection(StrictModel):
    vision: str | None = Field(None, description="CLIP-family vision checkpoint: local dir or hub id")
    language_model: str | None = Field(None, description="causal LM checkpoint: local dir or hub id")
    projector: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    vision_feature_layer: int = -2
    feature_select: Literal["patch", "cls_patch"] = "patch"
    init_from: str | None = Field(None, description="a llava-hf checkpoint to start from (previous stage's "
                                                    "output, a registered model): path, hub id, models:/, "
                                                    "runs:/ or s3://")
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _something_to_start_from(self):
        if not self.init_from and not (self.vision and self.language_model):
            raise ValueError("set model.init_from (a llava-hf checkpoint), or model.vision and "
                             "model.language_model to assemble a new model")
        return self


class DataSection(StrictModel):
    records: str | None = Field(None, description="LLaVA JSON/JSONL file (quick path)")
    image_root: str | None = None
    processed: str | None = Field(None, description="processed Parquet shards (URI) from jobs.preprocess")
    template: TemplateName = "vicuna_v1"  # a name of llava.data.templates.TEMPLATES
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
    lr: float = Field(gt=0, description="learning rate of every trained part without its own method.<part>.lr")
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="overrides epochs when set")
    global_batch: int = Field(gt=0)
    micro_batch: int = Field(gt=0)
    grad_clip: float = Field(1.0, gt=0)


class PartMethod(StrictModel):
    mode: Literal["frozen", "full", "lora"] = "frozen"
    lr: float | None = Field(None, gt=0, description="this part's learning rate (default optim.lr)")

    @model_validator(mode="after")
    def _no_rate_when_frozen(self):
        if self.mode == "frozen" and self.lr is not None:
            raise ValueError("lr is set but the part is frozen")
        return self


class LoraSection(StrictModel):
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="leaf names of the linear layers that get adapters in the LoRA parts")
    modules_to_save: list[str] = Field([], description="extra modules trained in full and saved with the adapter")


class MethodSection(StrictModel):
    """How each part trains, separate from the stage: `frozen`, `full` or `lora`, each at its own
    learning rate; `lora` settings apply to every LoRA part. `quantization: 4bit` is QLoRA: the
    language model's frozen base weights are held in NF4 (bitsandbytes)."""

    vision: PartMethod = PartMethod()
    projector: PartMethod = PartMethod(mode="full")
    language_model: PartMethod = PartMethod()
    lora: LoraSection = LoraSection()
    quantization: Literal["none", "4bit"] = "none"

    @classmethod
    def for_stage(cls, stage: int) -> MethodSection:
        """LLaVA's two stages: stage 1 trains the projector, stage 2 the projector and the LM."""
        return cls(language_model=PartMethod(mode="full" if stage == 2 else "frozen"))

    def uses_lora(self) -> bool:
        return "lora" in (self.vision.mode, self.projector.mode, self.language_model.mode)

    @model_validator(mode="after")
    def _consistent(self):
        if all(p.mode == "frozen" for p in (self.vision, self.projector, self.language_model)):
            raise ValueError("every part is frozen: nothing would train")
        if self.quantization == "4bit" and self.language_model.mode != "lora":
            raise ValueError("quantization=4bit (QLoRA) quantizes the frozen language model under its "
                             f"adapters: set language_model.mode=lora (got {self.language_model.mode!r})")
        return self


class DistributedSection(StrictModel):
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 (+tf32) on GPU, fp32 on CPU
    # Worker-group restarts from the latest checkpoint after a worker error (a killed or OOM'd
    # process, a lost connection); -1 retries forever. Node preemptions are retried by Ray Train
    # on their own budget, and tracking outages no longer raise, so one retry covers the transient
    # rest while a deterministic bug still fails after its second attempt.
    max_failures: int = Field(1, ge=-1)


class CheckpointSection(StrictModel):
    """Each training run keeps its Ray Train checkpoints in `storage/<name>-<MLflow run id>`, so a
    rerun of the same config trains from scratch; it resumes only when asked to."""

    storage: str = Field(description="local path or s3:// URI for Ray Train checkpoints")
    every_n_steps: int = Field(50, gt=0)
    keep: int = Field(2, gt=0)
    resume_from: str | None = Field(None, description="checkpoint path/URI to start from (a new MLflow run)")
    resume_run: str | None = Field(None, description="MLflow run id of an earlier training run to continue: "
                                                     "same run, from its latest checkpoint")

    @model_validator(mode="after")
    def _one_resume(self):
        if self.resume_from and self.resume_run:
            raise ValueError("set at most one of checkpoint.resume_from or checkpoint.resume_run")
        return self


class TrackingSection(StrictModel):
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI
    experiment: str = "llava"
    run_name: str | None = None
    parent_run_id: str | None = None
    flush_interval_s: float = Field(10.0, gt=0, description="how often buffered step metrics are written")


class TrainConfig(StrictModel):
    stage: Literal[1, 2]
    name: str = Field("llava", description="run name; prefix of the run's Ray Train storage folder")
    seed: int = 0
    model: ModelSection
    method: MethodSection = Field(None, description="per-part training modes; default: the stage's")  # type: ignore[assignment]
    data: DataSection
    optim: OptimSection
    distributed: DistributedSection = DistributedSection()
    checkpoint: CheckpointSection
    tracking: TrackingSection = TrackingSection()
    output: str = Field(description="where the llava-hf model directory is exported (path or URI)")
    adapter_output: str | None = Field(None, description="LoRA runs: where the adapter alone is exported "
                                                         "(PEFT layout); default <output>-adapter")
    stop_after_steps: int | None = Field(None, gt=0, description="end early after this step (interrupt drills)")

    @model_validator(mode="before")
    @classmethod
    def _method_of_the_stage(cls, data):
        if isinstance(data, dict) and data.get("method") is None and data.get("stage") in (1, 2):
            data = {**data, "method": MethodSection.for_stage(data["stage"]).model_dump()}
        return data

    @model_validator(mode="after")
    def _method_fits(self):
        if self.method.uses_lora() and not self.model.init_from:
            raise ValueError("method: a LoRA part needs a saved base to attach the adapter to: set "
                             "model.init_from (a llava-hf checkpoint: path, hub id, models:/, runs:/ or s3://)")
        if self.method.quantization == "4bit":
            if not self.distributed.use_gpu and not _bitsandbytes_runs_on_cpu():
                raise ValueError("method.quantization=4bit (QLoRA) needs CUDA: set distributed.use_gpu=true "
                                 "on a GPU cluster, or use quantization=none (plain LoRA) on CPU")
            if self.distributed.zero_stage == 3:
                raise ValueError("method.quantization=4bit does not partition with ZeRO-3 here: use "
                                 "distributed.zero_stage 0-2 (the 4-bit base is small enough to replicate)")
        return self

    def adapter_destination(self) -> str:
        return self.adapter_output or self.output.rstrip("/") + "-adapter"

    def part_lrs(self) -> dict[str, float]:
        """The learning rate of each part (those that do not train keep optim.lr, unused)."""
        return {part: getattr(self.method, part).lr or self.optim.lr for part in ("vision", "projector", "language_model")}


def _bitsandbytes_runs_on_cpu() -> bool:
    """bitsandbytes 0.50 quantizes and runs 4-bit layers on CPU too (measured with 0.50.2; older
    releases need CUDA)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(x) for x in version("bitsandbytes").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (0, 50)


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
    m["init_from"] = _absolute(m["init_from"], must_exist=True)
    for key in ("records", "image_root", "processed", "sample_trace"):
        d[key] = _absolute(d[key])
    data["checkpoint"]["storage"] = _absolute(data["checkpoint"]["storage"])
    data["checkpoint"]["resume_from"] = _absolute(data["checkpoint"]["resume_from"])
    data["output"] = _absolute(data["output"])
    uri = data["tracking"]["tracking_uri"]
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        data["tracking"]["tracking_uri"] = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    data["adapter_output"] = _absolute(data["adapter_output"])
    return TrainConfig.model_validate(data)
