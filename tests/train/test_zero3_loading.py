"""Under ZeRO-3 a worker loads the previous stage's llava-hf model already partitioned
(`deepspeed.zero.Init` through transformers), and the gathered weights are the saved ones."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Run in a child process: it initialises a (one-rank, gloo) process group for DeepSpeed.
SCRIPT = """
import os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
from safetensors.torch import load_file
from jobs import train_worker
from jobs.train_config import TrainConfig
from llava_platform.config import load_config
path = sys.argv[1]
cfg = load_config(TrainConfig, "jobs/configs/tiny_stage2.yaml", [f"model.init_from={path}", "distributed.zero_stage=3",
                  "optim.global_batch=2", "optim.micro_batch=1"])
train_worker._register_zero3(cfg, world_size=1)
model = train_worker._load_model(cfg).model
params = list(model.named_parameters())
assert all(hasattr(p, "ds_id") and p.numel() == 0 for _, p in params), "not partitioned at load"
saved = load_file(os.path.join(path, "model.safetensors"))
with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
    state = model.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in saved if k in state)
print("OK", len(params))
"""


def test_zero3_loads_the_previous_stage_partitioned(tiny_llava_dir, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_llava_dir), str(port)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout[-2000:] + done.stderr[-4000:]
