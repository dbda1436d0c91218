"""The per-worker training loop run by Ray Train: DeepSpeed engine, exact-resume checkpoints,
per-step metrics to MLflow from rank 0, llava-hf export at the end.

One optimizer step consumes one global batch (micro_batch x accumulation x world size samples);
`step` counts optimizer steps and is the data position saved in every checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import resource
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import ray.train
import torch

from jobs.processed_data import open_processed
from jobs.train_config import TrainConfig
from llava.data.records import parse_records
from llava.data.templates import get_template
from llava.model.builder import build_llava, save_llava
from llava.model.freezing import PartModes, apply_freezing, describe_trainable, total_parameters
from llava.model.lora import LoraSettings, apply_lora, merged_from_adapter, quantization_config, save_adapter
from llava.model.metadata import ModelMetadata, describe_model, read_metadata
from llava.train.dataset import TrainSample, check_fits_global_batch
from llava.train.deepspeed_config import BatchPlan, deepspeed_config
from llava.train.grad_norm import global_grad_norm
from llava.train.loader import (
    CollateMicroBatch,
    EncodedRecords,
    RankSchedule,
    encode_records_index,
    micro_batch_loader,
)
from llava.train.optim import build_optimizer, build_scheduler
from llava.train.packing import (
    PackingError,
    attention_break_even,
    attention_implementation,
    check_packable,
    expected_bos,
)
from llava.train.state import Position, load_rank_state, save_rank_state
from llava_platform import storage, tracking
from llava_platform.logged_model import log_llava_model

DS_TAG = "ds"


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device
    run_id: str | None

    @property
    def lead(self) -> bool:
        return self.rank == 0


def _say(ctx: WorkerContext, msg: str) -> None:
    if ctx.lead:
        print(msg, flush=True)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: object
    base: str | None  # what `model.init_from` resolved to: a local llava-hf dir or a hub id


def _init_source(ref: str) -> str:
    """A local directory for a path or platform URI; a hub id (owner/name, not a local path) is
    passed to from_pretrained as is, which downloads it into the Hugging Face cache."""
    from llava_platform.model_uri import resolve_model_dir

    is_uri = "://" in ref or ref.startswith(("runs:/", "models:/"))
    if not is_uri and not os.path.exists(ref) and re.fullmatch(r"[\w.-]+/[\w.-]+", ref):
        return ref
    return str(resolve_model_dir(ref))


def _checkpoint_template(processor) -> str | None:
    """The platform template whose chat template the checkpoint's processor saved, if any."""
    from llava.data.templates import TEMPLATE_NAMES

    eos = processor.tokenizer.eos_token
    for name in TEMPLATE_NAMES:
        if get_template(name, eos_token=eos).chat_template == processor.chat_template:
            return name
    return None


def _check_template(processor, cfg: TrainConfig) -> None:
    """A fine-tune must keep the prompt format its checkpoint was trained with; only the
    alignment-stage `plain` template is meant to be replaced (by stage 2's conversation template)."""
    saved = _checkpoint_template(processor)
    if saved not in (None, "plain", cfg.data.template):
        raise ValueError(f"model.init_from {cfg.model.init_from} was trained with template {saved!r} but "
                         f"data.template is {cfg.data.template!r}: set data.template={saved}")


def _load_model(cfg: TrainConfig) -> LoadedModel:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if cfg.model.init_from:
        base = _init_source(cfg.model.init_from)
        kwargs = {}
        if cfg.method.quantization == "4bit":  # the config refused it where it cannot run
            kwargs["quantization_config"] = quantization_config(torch.bfloat16 if _precision(cfg) == "bf16"
                                                                else torch.float32)
        model = LlavaForConditionalGeneration.from_pretrained(base, **kwargs)
        if kwargs:
            from peft import prepare_model_for_kbit_training

            # Casts the small non-quantized weights to fp32 for stable training; checkpointing is
            # set up below with the rest of the methods.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        processor = AutoProcessor.from_pretrained(base)
        _check_template(processor, cfg)
        _check_init_metadata(base, cfg)
        return LoadedModel(model, processor, base)
    m = cfg.model
    model, processor = build_llava(m.vision, m.language_model, projector=m.projector,
                                   vision_feature_layer=m.vision_feature_layer, feature_select=m.feature_select,
                                   template=cfg.data.template)
    return LoadedModel(model, processor, None)


def _apply_method(model, cfg: TrainConfig):
    """Freeze, fully train or LoRA-wrap each part as `method` says; return the model to train
    (peft-wrapped when a part uses LoRA) and the trainable counts per part."""
    m = cfg.method
    modes = PartModes(vision=m.vision.mode, projector=m.projector.mode, language_model=m.language_model.mode)
    if not m.uses_lora():
        return model, apply_freezing(model, modes)
    targets = None if m.lora.target_modules == "all-linear" else tuple(m.lora.target_modules)
    return apply_lora(model, modes, LoraSettings(r=m.lora.r, alpha=m.lora.alpha, dropout=m.lora.dropout,
                                                 target_modules=targets,
                                                 modules_to_save=tuple(m.lora.modules_to_save)))


# transformers holds only a weak reference to the registered DeepSpeed config; this keeps it for
# the life of the worker process (one training per worker).
_ZERO3_CONFIG = None


def _register_zero3(cfg: TrainConfig, world_size: int) -> None:
    """ZeRO-3 from a llava-hf model (`model.init_from`, as the 7B stage-2 recipe starts): register
    DeepSpeed's config with transformers before loading, so `from_pretrained` runs under
    `deepspeed.zero.Init` and a worker materialises only its own partition of the weights instead
    of the full model (at 7B: 28 GB fp32 per worker, 8 workers per node). Assembling from a
    separate vision tower and LM (`build_llava`) plugs loaded parts into a meta-device shell, which
    zero.Init cannot partition; that path loads whole and DeepSpeed partitions at initialize."""
    global _ZERO3_CONFIG
    if cfg.distributed.zero_stage != 3 or not cfg.model.init_from:
        return
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    # zero.Init checks the batch plan against DeepSpeed's own view of the world size, which is 1
    # until DeepSpeed adopts the process group Ray Train created.
    deepspeed.init_distributed()

    plan = BatchPlan(cfg.optim.global_batch, cfg.optim.micro_batch, world_size)
    _ZERO3_CONFIG = HfDeepSpeedConfig(deepspeed_config(plan, zero_stage=3, precision=_precision(cfg),
                                                       grad_clip=cfg.optim.grad_clip))


def _data_source(cfg: TrainConfig, processor, ctx: WorkerContext):
    """The training set as this worker holds it: the sample index resident, samples read by
    position (`llava.train.loader`). Processed shards: the index from the manifest's folder, rows
    from its shard files; a records file: tokenized here, images opened per sample."""
    d = cfg.data
    if d.processed:
        return open_processed(d.processed)
    records = parse_records(storage.read_text(d.records), d.records)
    source, rejected = encode_records_index(records, processor, d.template, max_length=d.max_length,
                                            image_root=d.image_root, image_mode=d.image_mode)
    if rejected:
        _say(ctx, f"rejected {len(rejected)} of {len(records)} records: "
                  + "; ".join(f"{r.id}: {r.reason}" for r in rejected[:5]))
    if len(rejected) > d.max_reject_fraction * max(1, len(records)):
        raise ValueError(f"{len(rejected)} of {len(records)} records rejected, above data.max_reject_fraction "
                         f"{d.max_reject_fraction}; first: {rejected[0].id}: {rejected[0].reason}")
    return source


def _check_packable(data, max_length: int, bos_id: int | None) -> None:
    """Lengths are checked from the index; a records file's tokens are resident, so its samples are
    checked whole (processed rows are checked as their micro-batches are packed)."""
    too_long = int((data.index.lengths > max_length).sum())
    if too_long:
        raise PackingError(f"too_long: {too_long} of {len(data.index)} samples exceed max_length {max_length}")
    if isinstance(data, EncodedRecords):
        check_packable([TrainSample(data.ids[i], data.tokens[data.offsets[i]:data.offsets[i + 1]].tolist(),
                                    data.labels[data.offsets[i]:data.offsets[i + 1]].tolist())
                        for i in range(len(data.ids))],
                       max_length=max_length, bos_token_id=bos_id)


def _micro_batch_loader(cfg: TrainConfig, data, plan: BatchPlan, ctx: WorkerContext, start: int, total: int,
                        per_epoch: int, collate: CollateMicroBatch):
    """This rank's micro-batches from step `start` on, read and collated by DataLoader workers."""
    schedule = RankSchedule(data.index, seed=cfg.seed, group_by_modality_length=cfg.data.group_by_modality_length,
                            global_batch=plan.global_batch, micro_batch=plan.micro_batch, rank=ctx.rank,
                            world_size=ctx.world_size, start=start, total=total, per_epoch=per_epoch)
    return micro_batch_loader(data, schedule, collate, workers=cfg.data.loader_workers,
                              prefetch=cfg.data.prefetch_batches)


def _trace_samples(cfg: TrainConfig, ctx: WorkerContext, step: int, ids: list[str]) -> None:
    """`data.sample_trace`: append this rank's sample ids of `step` (what resume tests compare)."""
    if cfg.data.sample_trace:
        path = storage.local_path(cfg.data.sample_trace) / f"rank-{ctx.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as out:
            out.write(json.dumps({"step": step, "rank": ctx.rank, "world_size": ctx.world_size, "ids": ids}) + "\n")


def _precision(cfg: TrainConfig) -> str:
    if cfg.distributed.precision != "auto":
        return cfg.distributed.precision
    return "bf16" if torch.cuda.is_available() else "fp32"


def _total_steps(cfg: TrainConfig, n_samples: int) -> tuple[int, int]:
    per_epoch = max(1, math.ceil(n_samples / cfg.optim.global_batch))
    total = cfg.optim.max_steps or max(1, math.ceil(cfg.optim.epochs * per_epoch))
    return per_epoch, total


def _to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    out = {k: v.to(device) for k, v in batch.items()}
    if "pixel_values" in out:
        out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def _only_trained_weights(cfg: TrainConfig) -> bool:
    """LoRA checkpoints hold the adapters (and fully trained parts) with their optimizer state, not
    the frozen base, which `model.init_from` rebuilds on resume: megabytes instead of the whole
    model, and no 4-bit QLoRA tensors to round-trip."""
    return cfg.method.uses_lora()


def _save_checkpoint(engine, ctx: WorkerContext, position: Position, metrics: dict, cfg: TrainConfig) -> None:
    """Every rank writes its DeepSpeed shard and RNG/position into a fresh local folder; Ray Train
    persists the folders of all ranks as one checkpoint and registers it only once all reported, so
    a crash mid-save leaves the previous checkpoint as the latest."""
    with tempfile.TemporaryDirectory(prefix="llava-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG, exclude_frozen_parameters=_only_trained_weights(cfg))
        save_rank_state(tmp, ctx.rank, position)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _checkpoint_to_restore(cfg: TrainConfig):
    """Ray's own checkpoint after a worker-group restart wins; otherwise `checkpoint.resume_from`
    (a previous run's checkpoint: Ray Train V2 leaves explicit resumption to the loop)."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None or not cfg.checkpoint.resume_from:
        return ckpt
    uri = cfg.checkpoint.resume_from
    if storage.is_s3(uri):
        fs, path = storage.pyarrow_filesystem(uri)
        return ray.train.Checkpoint(path, filesystem=fs)
    return ray.train.Checkpoint(str(storage.local_path(uri)))


def _restore(engine, cfg: TrainConfig, ctx: WorkerContext) -> Position | None:
    ckpt = _checkpoint_to_restore(cfg)
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        engine.load_checkpoint(d, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True,
                               load_module_strict=not _only_trained_weights(cfg))
        return load_rank_state(d, ctx.rank)


def _publish(src: str, uri: str) -> None:
    if storage.is_s3(uri):
        storage.upload_dir(src, uri)
        return
    dst = storage.local_path(uri)
    staging = dst.with_name(dst.name + ".partial")
    storage.upload_dir(src, str(staging))
    if dst.exists():
        import shutil

        shutil.rmtree(dst)
    staging.rename(dst)  # the export appears whole or not at all


def _export_metadata(cfg: TrainConfig, processor) -> ModelMetadata:
    """This export's record: the stage's template and image mode; the base models carry over from
    the model it was initialised from (stage 2 names the same CLIP and LM as its stage 1)."""
    init = read_metadata(_init_source(cfg.model.init_from)) if cfg.model.init_from else None
    return describe_model(processor, template=cfg.data.template, image_mode=cfg.data.image_mode,
                          base_vision=init.base_vision if init else cfg.model.vision,
                          base_language_model=init.base_language_model if init else cfg.model.language_model,
                          stage=cfg.stage)


def _check_init_metadata(base: str, cfg: TrainConfig) -> None:
    """Images must be prepared as the initial model saw them: its projector was trained on that."""
    init = read_metadata(base) if os.path.isdir(base) else None
    if init is not None and init.image_mode != cfg.data.image_mode:
        raise ValueError(f"model.init_from {cfg.model.init_from} was trained with image_mode {init.image_mode!r} "
                         f"but data.image_mode is {cfg.data.image_mode!r}: set data.image_mode={init.image_mode}")


def _export(engine, processor, cfg: TrainConfig, ctx: WorkerContext, zero_stage: int) -> str | None:
    """Write the llava-hf directory (ZeRO-3: gather full weights first) and log it to MLflow. A
    LoRA run also writes its adapter alone (PEFT layout) and exports the adapter merged into the
    base, which plain transformers loads as any other llava-hf model."""
    import deepspeed

    model = engine.module
    meta = _export_metadata(cfg, processor)
    lora = cfg.method.uses_lora()
    params = [p for p in model.parameters() if p.requires_grad or not lora] if zero_stage == 3 else []
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero_stage == 3):
        if not ctx.lead:
            return None
        with tempfile.TemporaryDirectory(prefix="llava-export-") as tmp:
            if lora:
                if zero_stage == 3:
                    # The base is read back whole on this rank alone: not under zero.Init, whose
                    # partitioning would wait for the other ranks (they are not loading it).
                    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

                    unset_hf_deepspeed_config()
                base = _init_source(cfg.model.init_from)
                adapter = save_adapter(model, os.path.join(tmp, "adapter"), cfg.model.init_from)
                save_llava(merged_from_adapter(base, adapter), processor, os.path.join(tmp, "model"), meta)
                _publish(str(adapter), cfg.adapter_destination())
                _publish(os.path.join(tmp, "model"), cfg.output)
            else:
                save_llava(model, processor, os.path.join(tmp, "model"), meta)
                _publish(os.path.join(tmp, "model"), cfg.output)
            if ctx.run_id:
                from mlflow.tracking import MlflowClient

                client = MlflowClient()
                # An MLflow Model (pyfunc + the llava-hf files), the LoggedModel `model` of this run.
                log_llava_model(ctx.run_id, os.path.join(tmp, "model"), client=client, metadata=meta.to_dict())
                if lora:
                    client.log_artifacts(ctx.run_id, os.path.join(tmp, "adapter"), "adapter")
                    # What the registry copies into the version's lineage (registry.collect_lineage).
                    client.set_tag(ctx.run_id, "llava.base_model", cfg.model.init_from)
                    client.set_tag(ctx.run_id, "llava.adapter", f"runs:/{ctx.run_id}/adapter")
    return cfg.output


def _loop_grad_norm(engine) -> torch.Tensor | None:
    """The step's global gradient norm where DeepSpeed will not report one (ZeRO-0 in fp32: the client
    optimizer has no `_global_grad_norm`); call it after the last micro-batch's backward, before
    `engine.step()` clips and clears the gradients. Every rank then holds the whole all-reduced
    gradient, so no communication is needed."""
    if hasattr(engine.optimizer, "_global_grad_norm"):
        return None
    return global_grad_norm(engine.module.parameters())


def _step_metrics(losses: list[torch.Tensor], tokens: int, samples: int, pads: list[float], elapsed: float,
                  engine, scheduler, loop_grad_norm: torch.Tensor | None = None) -> dict[str, float]:
    """The step's metrics, averaged/summed over ranks. Losses stay tensors until here: one host
    read per step instead of one per micro-batch (each is a device sync on GPU). A loop-computed
    grad norm rides in the same reduction (equal on every rank, so its mean is itself)."""
    loss = torch.stack([x.detach().double() for x in losses]).mean()
    norm = loop_grad_norm.to(loss) if loop_grad_norm is not None else loss.new_tensor(0.0)
    totals = torch.stack([loss, loss.new_tensor(tokens), loss.new_tensor(samples), norm])
    world = 1
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
        world = torch.distributed.get_world_size()
    loss_sum, tokens_sum, samples_sum, norm_sum = totals.tolist()
    grad_norm = norm_sum / world if loop_grad_norm is not None else engine.get_global_grad_norm()
    return {
        "loss": loss_sum / world,
        "lr": scheduler.get_last_lr()[-1],
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "samples_per_s": samples_sum / elapsed,
        "tokens_per_s": tokens_sum / elapsed,
        "padding_fraction": sum(pads) / len(pads),
    }


def train_loop(config: dict) -> None:
    import deepspeed

    cfg = TrainConfig.model_validate(config["cfg"])
    rctx = ray.train.get_context()
    ctx = WorkerContext(rctx.get_world_rank(), rctx.get_world_size(), ray.train.torch.get_device(), config.get("run_id"))
    if config.get("tracking_uri"):
        tracking.configure(config["tracking_uri"])
    _seed_all(cfg.seed)
    _register_zero3(cfg, ctx.world_size)
    loaded = _load_model(cfg)
    processor = loaded.processor
    if cfg.model.gradient_checkpointing:
        loaded.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model, counts = _apply_method(loaded.model, cfg)
    counts["fraction"] = counts["total"] / total_parameters(model)
    _say(ctx, f"stage {cfg.stage}: {describe_trainable(counts, model)}")
    data = _data_source(cfg, processor, ctx)
    per_epoch, total = _total_steps(cfg, len(data.index))
    plan = BatchPlan(cfg.optim.global_batch, cfg.optim.micro_batch, ctx.world_size)
    check_fits_global_batch(len(data.index), plan.global_batch)
    precision = _precision(cfg)
    if precision == "bf16" and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ds_config = deepspeed_config(plan, zero_stage=cfg.distributed.zero_stage, precision=precision,
                                 grad_clip=cfg.optim.grad_clip)
    optimizer = build_optimizer(model, cfg.part_lrs())
    scheduler = build_scheduler(optimizer, total, cfg.optim.warmup_ratio)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    position = _restore(engine, cfg, ctx)
    start = position.step if position else 0
    if ctx.lead and ctx.run_id and start == 0:  # params are write-once: a restarted group must not re-log them
        tracking.log_params(ctx.run_id, {"trainable": counts, "total_steps": total, "samples": len(data.index),
                                         "accumulation": plan.accumulation, "world_size": ctx.world_size})
    _say(ctx, f"stage {cfg.stage}: {len(data.index)} samples, {total} steps of {plan.global_batch} "
              f"({plan.micro_batch} x {plan.accumulation} accumulation x {ctx.world_size} workers), "
              f"ZeRO-{cfg.distributed.zero_stage}, {precision}" + (f", resuming at step {start}" if start else ""))
    # Metrics (the loop's and the lead node's system metrics) go through one buffer whose writer
    # thread rides out an unreachable tracking store: MLflow never stops the training.
    metrics_out = None
    sampler = None
    if ctx.lead and ctx.run_id:
        metrics_out = tracking.MetricBuffer(ctx.run_id, interval_s=cfg.tracking.flush_interval_s)
        if start:
            metrics_out.add({"resumed_at_step": start}, step=start, timestamp_ms=int(time.time() * 1000))
        sampler = tracking.SystemMetricsSampler(metrics_out).start()
    try:
        _run_steps(cfg, engine, scheduler, processor, data, plan, ctx, start, per_epoch, total, precision,
                   metrics_out)
    finally:
        if sampler is not None:
            sampler.stop()  # takes a last sample: runs shorter than the interval still record one
        if metrics_out is not None:
            metrics_out.close()  # also when a step failed: the steps before it are recorded


def _run_steps(cfg: TrainConfig, engine, scheduler, processor, data, plan, ctx: WorkerContext, start: int,
               per_epoch: int, total: int, precision: str, metrics_out: tracking.MetricBuffer | None) -> None:
    model = engine.module
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    pad_id = processor.tokenizer.pad_token_id
    # data.packing: each micro-batch keeps its micro_batch samples (so the global batch and the loss
    # are unchanged) but packs them into as few rows of data.max_length as fit, no attention across
    # samples. Unsafe sample boundaries fail here, before any step, not hours into the run.
    bos_id, attn = expected_bos(processor.tokenizer), attention_implementation(model)
    break_even = attention_break_even(model)  # masked (non-flash) rows: padding vs quadratic attention
    if cfg.data.packing:
        _check_packable(data, cfg.data.max_length, bos_id)
        _say(ctx, f"stage {cfg.stage}: packing micro-batches into rows of {cfg.data.max_length} ({attn} attention)")
    collate = CollateMicroBatch(packing=cfg.data.packing, pad_id=pad_id, image_processor=processor.image_processor,
                                max_length=cfg.data.max_length, attn_implementation=attn, bos_token_id=bos_id,
                                mask_dtype=dtype, break_even_width=break_even)
    batches = iter(_micro_batch_loader(cfg, data, plan, ctx, start, total, per_epoch, collate))
    t_start = time.time()
    # A step's time runs from the end of the previous one: data selection, collation, logging and
    # checkpoints all count, as they do in any throughput seen from outside the loop.
    step_end = time.perf_counter()
    last = start
    for step in range(start, total):
        epoch, in_epoch = divmod(step, per_epoch)
        data_wait, step_ids = 0.0, []
        losses, pads, tokens, n = [], [], 0, 0
        loop_norm = None
        for _ in range(plan.accumulation):
            waited = time.perf_counter()
            micro, ids = next(batches)  # this rank's next micro-batch, read and collated ahead
            data_wait += time.perf_counter() - waited
            step_ids += ids
            pads.append(micro.padding_fraction)
            tokens += micro.real_tokens
            n += len(ids)
            # No KV cache in training: the forward would otherwise build one per layer for nothing.
            out = engine(**_to_device(micro.inputs, ctx.device, dtype), use_cache=False)
            engine.backward(out.loss)
            if engine.is_gradient_accumulation_boundary():
                loop_norm = _loop_grad_norm(engine)
            engine.step()
            losses.append(out.loss.detach())
        now = time.perf_counter()
        metrics = _step_metrics(losses, tokens, n, pads, now - step_end, engine, scheduler, loop_norm)
        metrics["data_wait_s"] = data_wait
        metrics["data_wait_fraction"] = data_wait / (now - step_end)
        # Host memory of this worker so far (Linux reports KiB): flat in the dataset size by design.
        metrics["worker_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        step_end = now
        last = step + 1
        _trace_samples(cfg, ctx, last, step_ids)
        if ctx.lead:
            if _shows_progress(last, start, total):
                eta = (time.time() - t_start) / (last - start) * (total - last)
                print(f"stage {cfg.stage} step {last}/{total} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                      f"grad_norm {metrics['grad_norm']:.3f} {metrics['samples_per_s']:.1f} samples/s "
                      f"ETA {eta:.0f}s", flush=True)
            if metrics_out is not None:
                metrics_out.add(metrics, step=last, timestamp_ms=int(time.time() * 1000))
        stopping = cfg.stop_after_steps is not None and last >= cfg.stop_after_steps
        if last % cfg.checkpoint.every_n_steps == 0 or last == total or stopping:
            if metrics_out is not None:
                metrics_out.flush()  # the steps a checkpoint covers are in MLflow before it registers
            _save_checkpoint(engine, ctx, Position(last, epoch, in_epoch + 1), {"step": last, **metrics}, cfg)
        if stopping:
            _say(ctx, f"stage {cfg.stage}: stopping after step {last} as configured (stop_after_steps)")
            return
    if last == total:
        if metrics_out is not None:
            # The export logs the model to MLflow: after an outage late in the run, wait (bounded) for
            # the store to take the buffered metrics again rather than fail the finished training.
            metrics_out.flush(metrics_out.final_wait_s)
        _export(engine, processor, cfg, ctx, cfg.distributed.zero_stage)
        _say(ctx, f"stage {cfg.stage}: exported llava-hf model to {cfg.output}")


PROGRESS_LINES = 20  # console lines per stage; MLflow records every step


def _shows_progress(step: int, start: int, total: int) -> bool:
    """Print the first step, the last, and every (total / PROGRESS_LINES)-th in between."""
    every = max(1, math.ceil(total / PROGRESS_LINES))
    return step == start + 1 or step == total or step % every == 0


def worker_env() -> dict[str, str]:
    """Environment the workers need: DeepSpeed's accelerator choice is made at import time. Ray
    Train's print patch logs every print of a worker and also echoes it when a library has wrapped
    sys.stdout, so each line reached the console twice; plain prints reach it once."""
    env = {k: os.environ[k] for k in ("DS_ACCELERATOR", "OMP_WAIT_POLICY", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL",
                                      "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                      "AWS_DEFAULT_REGION", "AWS_REGION", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY",
                                      # Ray Train's controller-side actors query the State API of this
                                      # cluster: with several on one machine, they must be told which
                                      "RAY_ADDRESS")
           if k in os.environ}
    # the MLflow client's settings too: server credentials, request timeouts and retries
    env.update({k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")})
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    return env

