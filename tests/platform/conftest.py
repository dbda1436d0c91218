"""`make run` once per session, as a user runs it: `llavactl run --workdir .llava` in a fresh
checkout-like directory (the repository's `jobs/`, `charts/`, `operators/` linked in, nothing else),
on the tiny preset shortened to fit CI. The end-to-end test and the README walk both read it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The tiny preset, shortened: fewer images and steps keep the suite inside CI's budget.
RUN_OVERRIDES = ["n_images=64", "lm_pretrain_steps=60", "clip_pretrain_steps=20", 'stage1_overrides=["optim.max_steps=12"]',
                 'stage2_overrides=["optim.max_steps=16"]']


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user_env() -> dict[str, str]:
    """A newcomer's shell: no tracking URI, no Ray cluster, no S3 endpoint or credentials."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS", "LLAVA_"))}
    return {**env, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "RAY_DISABLE_USAGE_STATS": "1"}


@dataclass
class MadeRun:
    checkout: Path  # where the commands run, as the repository root after `make run`
    workdir: Path  # checkout/.llava
    output: str  # what `llavactl run` printed
    returncode: int


@pytest.fixture(scope="session")
def made_run(tmp_path_factory) -> MadeRun:
    checkout = tmp_path_factory.mktemp("checkout")
    for name in ("jobs", "charts", "operators"):
        (checkout / name).symlink_to(REPO / name, target_is_directory=True)
    workdir = checkout / ".llava"
    proc = subprocess.run([sys.executable, "-m", "llava_platform.cli", "run", "--workdir", ".llava",
                           "--port", str(free_port()), *RUN_OVERRIDES],
                          cwd=checkout, env=user_env(), capture_output=True, text=True, timeout=1200)
    return MadeRun(checkout, workdir, proc.stdout + proc.stderr, proc.returncode)
