"""Full stage-2 training vs LoRA on CPU: trainable parameters, peak memory and step time.

    .venv/bin/python benchmarks/lora_vs_full.py [--models tiny,0.5b] [--steps 4] [--threads 2]

Two models: the tiny llava-hf model of `make run` and a random-weight llava-hf model whose
language model is a ~0.5B Llama (no download: the weights' values do not change the cost). For
each, two methods on the same batches (one image + text, fixed length), plain torch AdamW:

- full: stage 2 as the tiny presets run it (projector + LM in full, vision tower frozen);
- lora: the tiny_lora.yaml method (adapters on every linear layer of the LM, projector in full).

Each (model, method) runs in its own subprocess so that peak memory (ru_maxrss, which includes
the model's weights) is that run's alone; step time (wall, and CPU time of the process, which a
busy shared machine disturbs less) is the median over the steps after the first.
The last line is `RESULT key=value ...`.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ~0.5B parameters: 20 layers of width 1280 (SwiGLU 3456), 32k vocabulary.
LM_05B = {"hidden_size": 1280, "intermediate_size": 3456, "num_hidden_layers": 20, "num_attention_heads": 20,
          "num_key_value_heads": 20, "vocab_size": 32000}
METHODS = {"full": {"projector": "full", "language_model": "full"},
           "lora": {"projector": "full", "language_model": "lora"}}


def build_model(kind: str, work: Path):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    if kind == "tiny":
        from llava.model.builder import build_llava
        from llava.model.tiny import build_tiny_checkpoints

        vision, lm = build_tiny_checkpoints(work / "tiny")
        model, _ = build_llava(vision, lm, template="vicuna_v1")
        return model
    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                              image_size=224, patch_size=14)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**LM_05B), image_token_index=31999,
                         image_seq_length=(224 // 14) ** 2, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(config)


def batch_for(model, seq_len: int):
    import torch

    cfg = model.config
    image_size = cfg.vision_config.image_size
    n_image = cfg.image_seq_length
    ids = torch.randint(10, cfg.text_config.vocab_size - 100, (1, seq_len))
    ids[0, 1:1 + n_image] = cfg.image_token_index
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "pixel_values": torch.randn(1, 3, image_size, image_size)}


def run_one(kind: str, method: str, steps: int, seq_len: int, threads: int, work: Path) -> dict:
    import torch

    from llava.model.freezing import PartModes, apply_freezing, total_parameters
    from llava.model.lora import LoraSettings, apply_lora
    from llava.train.optim import build_optimizer

    torch.set_num_threads(threads)
    model = build_model(kind, work)
    modes = PartModes(**METHODS[method])
    if method == "lora":
        model, counts = apply_lora(model, modes, LoraSettings(r=16, alpha=32, dropout=0.05))
    else:
        counts = apply_freezing(model, modes)
    built_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    batch = batch_for(model, seq_len)
    opt = build_optimizer(model, {"vision": 2e-5, "projector": 2e-5, "language_model": 2e-4})
    model.train()
    times, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        model(**batch, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"model": kind, "method": method, "trainable": counts["total"], "total": total_parameters(model),
            "peak_rss_mib": peak / 1024, "training_rss_mib": (peak - built_rss) / 1024,
            "step_s": statistics.median(times[1:] or times), "step_cpu_s": statistics.median(cpu[1:] or cpu)}


def check_memory(kind: str) -> None:
    """Full training of the 0.5B model holds weights, gradients and two AdamW moments in fp32 (16
    bytes a parameter, ~8 GiB): on a shared machine, refuse rather than push others into the OOM killer."""
    if kind != "0.5b":
        return
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    available = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable"))
    if available < 11 * 1024**2:
        raise SystemExit(f"only {available / 1024**2:.1f} GiB available; the 0.5b runs need about 11 GiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,0.5b")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # "model:method", run in this process
    args = parser.parse_args()
    work = Path("/tmp/llava-bench-lora")
    if args.one:
        kind, method = args.one.split(":")
        print(json.dumps(run_one(kind, method, args.steps, args.seq_len, args.threads, work)))
        return 0
    results = []
    for kind in args.models.split(","):
        for method in METHODS:
            check_memory(kind)
            out = subprocess.run([sys.executable, __file__, "--one", f"{kind}:{method}", "--steps", str(args.steps),
                                  "--seq-len", str(args.seq_len), "--threads", str(args.threads)],
                                 capture_output=True, text=True, cwd=ROOT, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(row)
            print(f"{kind:5s} {method:4s} trainable {row['trainable']:>12,} of {row['total']:>12,} "
                  f"({100 * row['trainable'] / row['total']:.2f}%)  peak RSS {row['peak_rss_mib']:8.0f} MiB "
                  f"(training +{row['training_rss_mib']:.0f})  step {row['step_s']:.2f} s "
                  f"({row['step_cpu_s']:.2f} s CPU)", flush=True)
    by = {(r["model"], r["method"]): r for r in results}
    fields = []
    for kind in args.models.split(","):
        full, lora = by[(kind, "full")], by[(kind, "lora")]
        tag = kind.replace(".", "")
        fields += [f"{tag}_trainable_full={full['trainable']}", f"{tag}_trainable_lora={lora['trainable']}",
                   f"{tag}_peak_mib_full={full['peak_rss_mib']:.0f}", f"{tag}_peak_mib_lora={lora['peak_rss_mib']:.0f}",
                   f"{tag}_step_s_full={full['step_s']:.3f}", f"{tag}_step_s_lora={lora['step_s']:.3f}",
                   f"{tag}_step_cpu_s_full={full['step_cpu_s']:.3f}", f"{tag}_step_cpu_s_lora={lora['step_cpu_s']:.3f}"]
    print("RESULT " + " ".join(fields))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
