"""Submitting `jobs/*` entrypoints to a running Ray cluster through the Ray Jobs API, and following them.

The job's code travels as the runtime env's working dir (the repository, minus virtualenvs, run
directories and caches); the cluster's image provides the installed dependencies. Authentication is
Ray's token auth: the token is read from an environment variable and sent as a bearer header, never
taken on the command line where it would land in shell history and process listings.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

# Never uploaded: environments, run outputs, caches, VCS metadata, tool binaries.
WORKING_DIR_EXCLUDES = [
    ".venv", ".llava", ".git", ".tools", ".pytest_cache", ".ruff_cache", "**/__pycache__",
    "*.egg-info", "build", "dist", "benchmarks/out", "*.safetensors", "*.bin", "*.pt",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 2}


class SubmitError(RuntimeError):
    """A submission that cannot be made as asked (bad job name, missing token, unreachable cluster)."""


@dataclass
class JobRequest:
    job: str
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    env_vars: dict[str, str] = field(default_factory=dict)
    working_dir: Path = Path(".")
    submission_id: str | None = None
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None

    def module(self) -> str:
        """`train`, `jobs.train` and `jobs/train.py` all mean the module `jobs.train`."""
        name = self.job.removesuffix(".py").replace("/", ".")
        name = name if name.startswith("jobs.") else f"jobs.{name}"
        path = self.working_dir / (name.replace(".", "/") + ".py")
        if not path.is_file():
            known = sorted(p.stem for p in (self.working_dir / "jobs").glob("*.py") if p.stem != "__init__")
            raise SubmitError(f"no job module {name} ({path} missing); jobs here: {', '.join(known) or 'none'}")
        return name

    def entrypoint(self) -> str:
        argv = ["python", "-m", self.module()]
        if self.config:
            if not (self.working_dir / self.config).is_file():
                raise SubmitError(f"config {self.config} not found under {self.working_dir}")
            argv += ["--config", self.config]
        for item in self.overrides:
            if "=" not in item or item.startswith("="):
                raise SubmitError(f"override {item!r} is not of the form key=value")
        return shlex.join(argv + list(self.overrides))

    def runtime_env(self) -> dict:
        env: dict = {"working_dir": str(self.working_dir), "excludes": list(WORKING_DIR_EXCLUDES)}
        if self.env_vars:
            env["env_vars"] = dict(self.env_vars)
        return env


def find_repo_root(start: Path | None = None) -> Path:
    """The nearest directory at or above `start` holding a `jobs/` package."""
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "jobs" / "__init__.py").is_file():
            return candidate
    raise SubmitError(f"no jobs/ package at or above {here}; pass --working-dir")


def connect(address: str, token: str | None) -> JobSubmissionClient:
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as err:  # ray raises ConnectionError/RuntimeError with the HTTP detail
        raise SubmitError(f"cannot reach the Ray Jobs API at {address}: {err}") from None


def submit(client: JobSubmissionClient, request: JobRequest) -> str:
    kwargs = {}
    if request.entrypoint_num_cpus is not None:
        kwargs["entrypoint_num_cpus"] = request.entrypoint_num_cpus
    if request.entrypoint_num_gpus is not None:
        kwargs["entrypoint_num_gpus"] = request.entrypoint_num_gpus
    return client.submit_job(entrypoint=request.entrypoint(), runtime_env=request.runtime_env(),
                             submission_id=request.submission_id, metadata={"submitted_by": "llavactl"},
                             **kwargs)


def follow(client: JobSubmissionClient, job_id: str, out: TextIO | None = None, poll_s: float = 1.0,
           timeout_s: float | None = None) -> str:
    """Print new log lines and status changes until the job ends; returns the final status name."""
    out = out or sys.stdout
    printed = 0
    last_status = None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            out.write(logs[printed:])
            out.flush()
            printed = len(logs)
        if status != last_status:
            print(f"[llavactl] job {job_id}: {status}", file=sys.stderr)
            last_status = status
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise SubmitError(f"job {job_id} still {status} after {timeout_s}s (it keeps running)")
        time.sleep(poll_s)


def read_token(env_name: str | None) -> str | None:
    if not env_name:
        return None
    token = os.environ.get(env_name)
    if not token:
        raise SubmitError(f"--token-env {env_name}: the variable is not set or empty")
    return token
