"""Peak host memory per training worker at start under ZeRO-3 vs ZeRO-0, on a ~0.5B random LM.

    .venv/bin/python benchmarks/zero3_host_memory.py [--hidden 1280 --layers 24] [--steps 1]

Builds a random-weight Llama of about 0.5B parameters (fp32, the tiny pipeline's tokenizer),
assembles it with the tiny CLIP tower into a llava-hf directory (what stage 1 exports), then runs
the real `python -m jobs.train` on the stage-2 preset from it (`model.init_from`, LM frozen so
that optimizer state does not dominate) with 2 Ray Train workers (DeepSpeed on CPU) for `--steps`
steps, once with `distributed.zero_stage=0` and once with `3`. Under ZeRO-3 the worker registers
DeepSpeed's config with transformers before loading (`jobs.train_worker._register_zero3`), so the
model is loaded under `deepspeed.zero.Init` and each worker holds its partition instead of the
full weights. The figure is the lead worker's `worker_peak_rss_mib` after the last step.
Last line: `RESULT params_m=... rss_mib_zero0=... rss_mib_zero3=... saving_mib=...`
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_lm(out: Path, tokenizer_dir: Path, hidden: int, layers: int) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=int(hidden * 2.7) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def run(work: Path, zero: int, steps: int, llava_dir: Path, data) -> float:
    from mlflow.tracking import MlflowClient

    tracking = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "DS_ACCELERATOR": "cpu", "RAY_DISABLE_USAGE_STATS": "1"}
    subprocess.run([sys.executable, "-m", "jobs.train", "--config", "jobs/configs/tiny_stage2.yaml",
                    f"model.vision={llava_dir}", f"model.language_model={llava_dir}", f"model.init_from={llava_dir}",
                    "method.language_model.mode=frozen", f"data.records={data.stage2}",
                    f"data.image_root={data.image_root}", f"optim.max_steps={steps}", "optim.global_batch=2",
                    "optim.micro_batch=1", f"distributed.zero_stage={zero}", f"checkpoint.storage={work / 'ckpt'}",
                    "checkpoint.every_n_steps=1000", f"output={work / f'out{zero}'}", "tracking.experiment=zero3",
                    f"tracking.run_name=zero{zero}", "data.loader_workers=0"],
                   check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = MlflowClient(tracking)
    found = client.search_runs([client.get_experiment_by_name("zero3").experiment_id],
                               filter_string=f"attributes.run_name = 'zero{zero}'")
    return found[0].data.metrics["worker_peak_rss_mib"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1280)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    from llava.data.synthetic import write_shapes_dataset
    from llava.model.tiny import build_tiny_checkpoints

    with tempfile.TemporaryDirectory(prefix="llava-zero3-", dir=args.workdir) as tmp:
        work = Path(tmp)
        vision, tiny_lm = build_tiny_checkpoints(work / "base", pretrain_steps=0)
        params = build_lm(work / "lm", tiny_lm, args.hidden, args.layers)
        print(f"random LM: {params / 1e6:.0f}M parameters", flush=True)
        data = write_shapes_dataset(work / "data", 8, seed=0, image_size=64, n_eval=1)
        from llava.model.builder import build_llava, save_llava

        model, processor = build_llava(vision, work / "lm", template="vicuna_v1")
        llava_dir = save_llava(model, processor, work / "llava")
        del model
        rss = {zero: run(work, zero, args.steps, llava_dir, data) for zero in (0, 3)}
        for zero, mib in rss.items():
            print(f"ZeRO-{zero}: lead worker peak RSS {mib:.0f} MiB", flush=True)
    print(f"RESULT params_m={params / 1e6:.0f} rss_mib_zero0={rss[0]:.0f} rss_mib_zero3={rss[3]:.0f} "
          f"saving_mib={rss[0] - rss[3]:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
