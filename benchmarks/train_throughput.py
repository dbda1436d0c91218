"""Training throughput: this project's loop (packing off and on) against Hugging Face `Trainer`, and
stage-2 MFU on a GPU.

    .venv/bin/python benchmarks/train_throughput.py [--steps 24] [--warmup 4] [--workers 1] [--skip-gpu]

CPU section (always): the tiny model (tiny CLIP + tiny Llama pre-trained briefly on the synthetic
shapes text) trains stage 2 on the same synthetic shapes records three ways, with the same global
batch, micro-batch, learning rate, schedule and torch thread count:
  - `trainer`: `transformers.Trainer`, single process, padded batches (`collate_padded`);
  - `loop`:    the real `jobs.train.run_training` on a local Ray (Ray Train + DeepSpeed), packing off;
  - `packed`:  the same with `data.packing=true`.
Per-step figures of the project's loop are read back from its MLflow run (samples_per_s,
tokens_per_s, padding_fraction, logged by rank 0; a step's time runs from the end of the previous
step, so data loading, metric logging and checkpoints count); Trainer's come from a callback that
times successive optimizer steps (the same span) and counts the tokens its collator produced. The first `--warmup` steps of every run are left out. samples/s and tokens/s
are totals over the measured steps divided by their total time; tokens are sample tokens (padding
excluded); useful-token fraction = 1 - mean padding fraction of the micro-batches.

GPU section (CUDA only, else skipped with a message): MFU of one stage-2 training step on a
CLIP ViT-L/14-336 config + a 1.3B Llama config (random weights, real shapes), bf16, flash-attention
when installed. Model FLOPs per step are defined in `stage2_model_flops`.

The last line is `RESULT key=value ...`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `jobs` is a top-level package of the checkout

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Same OpenMP waiting for both sides (the Makefile and the jobs use passive waiting; spinning threads
# collapse on a busy 2-core box). Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

H100_BF16_DENSE_PEAK = 989e12  # FLOP/s, H100 SXM, dense (no sparsity)
STAGE2_CONFIG = ROOT / "jobs" / "configs" / "tiny_stage2.yaml"


@dataclass
class Throughput:
    """Measured steps of one configuration (several runs concatenate)."""

    name: str
    samples: list[float]
    tokens: list[float]
    seconds: list[float]
    pads: list[float]  # padding fraction of every micro-batch (rank 0 for the project's loop)

    @property
    def samples_per_s(self) -> float:
        return sum(self.samples) / sum(self.seconds)

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens) / sum(self.seconds)

    @property
    def useful_fraction(self) -> float:
        return 1.0 - sum(self.pads) / len(self.pads)

    @property
    def steps(self) -> int:
        return len(self.seconds)

    def __add__(self, other: Throughput) -> Throughput:
        return Throughput(self.name, self.samples + other.samples, self.tokens + other.tokens,
                          self.seconds + other.seconds, self.pads + other.pads)


# --------------------------------------------------------------------------------------------- data


def prepare(work: Path, n_images: int, pretrain_steps: int):
    """Synthetic shapes data and tiny base checkpoints whose LM saw the shapes text."""
    from llava.data.synthetic import write_shapes_dataset
    from llava.model.tiny import build_tiny_checkpoints

    data = write_shapes_dataset(work / "shapes", n_images, seed=0, image_size=64)
    corpus = [t["value"].replace("<image>", "").strip()
              for r in json.loads(data.stage2.read_text()) for t in r["conversations"]]
    vision, lm = build_tiny_checkpoints(work / "base", corpus=corpus, pretrain_steps=pretrain_steps)
    return data, vision, lm


def stage2_config(work: Path, data, vision: Path, lm: Path, args, *, packing: bool, tag: str):
    from jobs.train_config import TrainConfig
    from llava_platform.config import load_config

    # A fresh name per run: Ray Train would otherwise restore an earlier run of the same name.
    name = ("packed" if packing else "loop") + tag
    return load_config(TrainConfig, STAGE2_CONFIG, [
        f"model.vision={vision}", f"model.language_model={lm}", "model.init_from=null",
        f"data.records={data.stage2}", f"data.image_root={data.image_root}", f"data.packing={str(packing).lower()}",
        f"optim.max_steps={args.steps}", f"optim.global_batch={args.global_batch}",
        f"optim.micro_batch={args.micro_batch}", f"distributed.num_workers={args.workers}",
        f"distributed.cpus_per_worker={args.threads // args.workers}",
        f"checkpoint.storage={work / 'ckpt'}", f"checkpoint.every_n_steps={10 * args.steps}",
        f"output={work / ('out-' + name)}", f"name=bench-{name}",
        f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}", "tracking.experiment=train-throughput",
    ])


# ------------------------------------------------------------------------------- this project's loop


def project_loop(work: Path, data, vision: Path, lm: Path, args, *, packing: bool, tag: str) -> Throughput:
    from mlflow.tracking import MlflowClient

    from jobs.train import run_training

    cfg = stage2_config(work, data, vision, lm, args, packing=packing, tag=tag)
    result = run_training(cfg)
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(result.run_id, key)}

    sps, tps, pads = history("samples_per_s"), history("tokens_per_s"), history("padding_fraction")
    steady = [s for s in sorted(sps) if s > args.warmup]
    if not steady:
        raise RuntimeError(f"no steps after the {args.warmup} warm-up steps in run {result.run_id}")
    # Each step ran one global batch; its time is samples / (samples/s), its tokens (tokens/s) x time.
    seconds = [args.global_batch / sps[s] for s in steady]
    tokens = [tps[s] * t for s, t in zip(steady, seconds)]
    return Throughput("packed" if packing else "loop", [args.global_batch] * len(steady), tokens, seconds,
                      [pads[s] for s in steady])


# ------------------------------------------------------------------------------ Hugging Face Trainer


def hf_trainer(work: Path, data, vision: Path, lm: Path, args, *, tag: str) -> Throughput:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from llava.data.collate import collate_padded, padding_fraction
    from llava.data.records import load_records
    from llava.model.builder import build_llava
    from llava.model.freezing import PartModes, apply_freezing
    from llava.train.dataset import encode_records

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, processor = build_llava(vision, lm, template="vicuna_v1")
    apply_freezing(model, PartModes.for_stage(2))
    samples, rejected = encode_records(load_records(data.stage2), processor, "vicuna_v1", max_length=512,
                                       image_root=data.image_root)
    if rejected:
        raise RuntimeError(f"{len(rejected)} records rejected, first: {rejected[0].reason}")
    pad_id = processor.tokenizer.pad_token_id
    counts: list[tuple[int, float]] = []  # (tokens, padding fraction) per micro-batch, in order

    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            return samples[i].decoded()

    def collate(batch):
        out = collate_padded(batch, pad_id, processor.image_processor)
        counts.append((int(out["attention_mask"].sum()), padding_fraction(out)))
        return out

    ends: list[float] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

    accumulation = args.global_batch // args.micro_batch
    targs = TrainingArguments(
        output_dir=str(work / f"hf-trainer{tag}"), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=accumulation, max_steps=args.steps, learning_rate=1e-3, weight_decay=0.0,
        lr_scheduler_type="cosine", warmup_steps=0.03, max_grad_norm=1.0, optim="adamw_torch",
        save_strategy="no", report_to="none", logging_strategy="no", disable_tqdm=True, use_cpu=True,
        dataloader_num_workers=0, dataloader_drop_last=True, remove_unused_columns=False, seed=0,
    )
    Trainer(model=model, args=targs, train_dataset=Samples(), data_collator=collate, callbacks=[StepTimer()]).train()
    step_seconds = [b - a for a, b in zip(ends, ends[1:])]
    per_step = [counts[i * accumulation : (i + 1) * accumulation] for i in range(len(step_seconds))]
    keep = range(args.warmup, len(step_seconds))
    return Throughput("trainer", [args.global_batch] * len(keep), [sum(t for t, _ in per_step[i]) for i in keep],
                      [step_seconds[i] for i in keep], [p for i in keep for _, p in per_step[i]])


# ----------------------------------------------------------------------------------------- GPU MFU


def stage2_model_flops(model, *, batch: int, seq_len: int, image_tokens: int) -> dict[str, float]:
    """Model FLOPs of one stage-2 training step (forward + backward), counted as matmul FLOPs
    (2 per multiply-add); embedding lookups, norms, activations and softmax are not counted, and
    neither is recomputation (gradient checkpointing) - the usual MFU convention.

    - language model (trained): 6 x N_lm per token, N_lm = every weight matrix of the decoder layers +
      lm_head (input embeddings excluded, a lookup); plus causal self-attention, QK^T and AV, counted
      for the lower triangle only: forward 2 x S^2 x d per layer per sequence, x3 with the backward.
    - projector (trained): 6 x N_proj per image token (its input gradient is never needed since the
      tower is frozen, ~1/3 of its backward; N_proj is ~0.5% of N_lm, so this is left in).
    - vision tower (frozen, forward only): 2 x N_vit per patch token (CLS included), N_vit = patch
      embedding + weight matrices of the layers up to `vision_feature_layer` (layers after it do not
      feed the model), plus bidirectional attention forward 4 x P^2 x d_v per layer per image.
    """
    cfg = model.config
    text, vis = cfg.text_config, cfg.vision_config
    inner = model.model

    def matmul_params(module) -> int:
        return sum(p.numel() for p in module.parameters() if p.ndim >= 2)

    n_lm = matmul_params(inner.language_model.layers) + model.lm_head.weight.numel()
    n_proj = matmul_params(inner.multi_modal_projector)
    layers = vis.num_hidden_layers
    used = cfg.vision_feature_layer % (layers + 1) if cfg.vision_feature_layer < 0 else cfg.vision_feature_layer
    vm = getattr(inner.vision_tower, "vision_model", inner.vision_tower)  # older transformers wrap it
    n_vit = vm.embeddings.patch_embedding.weight.numel() + matmul_params(vm.encoder.layers[:used])
    patches = (vis.image_size // vis.patch_size) ** 2 + 1
    lm_tokens = batch * seq_len
    flops = {
        "lm": 6 * n_lm * lm_tokens + 3 * 2 * seq_len**2 * text.hidden_size * text.num_hidden_layers * batch,
        "projector": 6 * n_proj * image_tokens * batch,
        "vision": 2 * n_vit * patches * batch + 4 * patches**2 * vis.hidden_size * used * batch,
    }
    flops["total"] = sum(flops.values())
    flops.update(n_lm=n_lm, n_proj=n_proj, n_vit=n_vit)
    return flops


def stage2_gpu_model(attn: str, *, vision_layers: int = 24, text_layers: int = 24, hidden: int = 2048,
                     image_size: int = 336, vocab: int = 32064):
    """CLIP ViT-L/14-336 + a 1.3B Llama (d 2048, 24 layers, MLP 5504), random weights, bf16."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                              num_attention_heads=16, image_size=image_size, patch_size=14, projection_dim=768,
                              hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                       num_hidden_layers=text_layers, num_attention_heads=max(1, hidden // 128),
                       max_position_embeddings=4096)
    image_tokens = (image_size // 14) ** 2
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab - 1,
                      image_seq_length=image_tokens, projector_hidden_act="gelu", vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn, dtype=torch.bfloat16)
    return model, image_tokens


def measure_mfu(device: str, *, batch: int, seq_len: int, steps: int, warmup: int, attn: str,
                grad_ckpt: bool, peak: float, **model_kw) -> dict[str, float]:
    """Time stage-2 steps (vision frozen; projector + LM trained with AdamW) on random data."""
    import torch

    from llava.model.freezing import PartModes, apply_freezing

    model, image_tokens = stage2_gpu_model(attn, **model_kw)
    model.to(device)
    apply_freezing(model, PartModes.for_stage(2))
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0, fused=device.startswith("cuda"))
    vocab, img = model.config.text_config.vocab_size, model.config.image_token_index
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab - 2, (batch, seq_len), generator=gen)
    ids[:, 0] = 1
    ids[:, 1 : 1 + image_tokens] = img
    labels = ids.clone()
    labels[:, : 1 + image_tokens] = -100
    size = model.config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=gen)
    inputs = {"input_ids": ids.to(device), "labels": labels.to(device),
              "pixel_values": pixels.to(device, torch.bfloat16), "use_cache": False}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        model(**inputs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    flops = stage2_model_flops(model, batch=batch, seq_len=seq_len, image_tokens=image_tokens)
    step = sum(times) / len(times)
    return {"step_s": step, "tokens_per_s": batch * seq_len / step, "mfu": flops["total"] / step / peak,
            "tflops": flops["total"] / step / 1e12, **flops}


def gpu_section(args) -> dict[str, float] | None:
    import torch

    if not torch.cuda.is_available():
        print("\nGPU section skipped: no CUDA device on this machine "
              "(run this script on a GPU machine for the stage-2 MFU figure).")
        return None
    attn = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    r = measure_mfu("cuda", batch=args.gpu_batch, seq_len=2048, steps=args.gpu_steps, warmup=3, attn=attn,
                    grad_ckpt=args.gpu_grad_ckpt, peak=H100_BF16_DENSE_PEAK)
    print(f"\nGPU stage 2 on {torch.cuda.get_device_name()}: LM {r['n_lm'] / 1e9:.2f}B matmul params, "
          f"CLIP ViT-L/14-336 (frozen), {args.gpu_batch} x 2048 tokens, bf16, {attn}, "
          f"gradient checkpointing {'on' if args.gpu_grad_ckpt else 'off'}")
    print(f"  step {r['step_s'] * 1e3:.0f} ms, {r['tokens_per_s']:,.0f} tokens/s, {r['tflops']:.0f} TFLOP/s model, "
          f"MFU {100 * r['mfu']:.1f}% of {H100_BF16_DENSE_PEAK / 1e12:.0f} TFLOP/s (flops/step: lm "
          f"{r['lm']:.3g}, vision {r['vision']:.3g}, projector {r['projector']:.3g})")
    return r


# ------------------------------------------------------------------------------------------- main


def print_table(rows: list[Throughput], base: Throughput) -> None:
    print(f"\n{'run':<10}{'samples/s':>12}{'tokens/s':>12}{'useful tok':>12}{'vs trainer':>12}{'steps':>7}")
    for r in rows:
        print(f"{r.name:<10}{r.samples_per_s:>12.2f}{r.tokens_per_s:>12.0f}{100 * r.useful_fraction:>11.1f}%"
              f"{r.samples_per_s / base.samples_per_s:>11.2f}x{r.steps:>7}")


def cpu_section(args, work: Path) -> list[Throughput]:
    import ray

    data, vision, lm = prepare(work, args.images, args.pretrain_steps)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=args.verbose,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "PYTHONPATH": path,
                                       "OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"]}})
    runs = {
        "trainer": lambda tag: hf_trainer(work, data, vision, lm, args, tag=tag),
        "loop": lambda tag: project_loop(work, data, vision, lm, args, packing=False, tag=tag),
        "packed": lambda tag: project_loop(work, data, vision, lm, args, packing=True, tag=tag),
    }
    got: dict[str, Throughput] = {}
    try:
        # Other load on a shared machine drifts over minutes: alternate the order (ABC, CBA, ...)
        # so that no configuration always runs first or last.
        for r in range(args.repeats):
            for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
                t = runs[name](f"-r{r}")
                print(f"[{name} run {r}] {t.samples_per_s:.2f} samples/s, load {os.getloadavg()[0]:.1f}", flush=True)
                got[name] = got[name] + t if name in got else t
    finally:
        ray.shutdown()
    return [got[name] for name in runs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=4, help="leading steps left out of the figures")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration, in alternating order")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers of the project's loop")
    p.add_argument("--threads", type=int, default=2, help="torch threads in total (split over the workers)")
    p.add_argument("--images", type=int, default=96, help="synthetic images (4 stage-2 records each)")
    p.add_argument("--pretrain-steps", type=int, default=100)
    p.add_argument("--workdir", type=Path, default=None, help="keep data/runs here (default: a temp dir)")
    p.add_argument("--skip-cpu", action="store_true")
    p.add_argument("--skip-gpu", action="store_true")
    p.add_argument("--gpu-batch", type=int, default=8)
    p.add_argument("--gpu-steps", type=int, default=10)
    p.add_argument("--gpu-grad-ckpt", action="store_true")
    p.add_argument("--verbose", action="store_true", help="show the Ray workers' output")
    args = p.parse_args(argv)
    if args.threads % args.workers:
        p.error("--threads must be a multiple of --workers")
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")

    print(f"host: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    result: dict[str, str] = {}
    if not args.skip_cpu:
        with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
            work = args.workdir or Path(tmp)
            rows = cpu_section(args, work)
        trainer, loop, packed = rows
        print(f"\nCPU stage 2, tiny model: global batch {args.global_batch}, micro-batch {args.micro_batch}, "
              f"{args.threads} torch threads, loop on {args.workers} Ray worker(s); steps {args.warmup + 1}-"
              f"{args.steps} of {args.repeats} run(s) each measured")
        print_table(rows, trainer)
        print(f"load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
        for r in rows:
            result[f"{r.name}_samples_per_s"] = f"{r.samples_per_s:.3f}"
            result[f"{r.name}_tokens_per_s"] = f"{r.tokens_per_s:.1f}"
            result[f"{r.name}_useful_fraction"] = f"{r.useful_fraction:.4f}"
        result["loop_vs_trainer"] = f"{loop.samples_per_s / trainer.samples_per_s:.3f}"
        result["packed_vs_trainer"] = f"{packed.samples_per_s / trainer.samples_per_s:.3f}"
        result["packed_vs_loop"] = f"{packed.samples_per_s / loop.samples_per_s:.3f}"
    gpu = None if args.skip_gpu else gpu_section(args)
    result["gpu_mfu"] = f"{gpu['mfu']:.4f}" if gpu else "skipped"
    if gpu:
        result["gpu_tokens_per_s"] = f"{gpu['tokens_per_s']:.0f}"
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
