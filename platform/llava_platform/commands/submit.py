"""`llavactl submit`: run a `jobs/*` entrypoint on an existing Ray cluster via the Ray Jobs API.

    llavactl submit train --address http://HEAD:8265 --config jobs/configs/tiny_stage1.yaml optim.max_steps=10
    llavactl submit jobs.evaluate --address http://HEAD:8265 --no-follow

The working dir (default: the repository holding `jobs/`) is uploaded as the job's runtime env. With
token authentication on, the token comes from an environment variable (`--token-env`, default
RAY_AUTH_TOKEN when set). The exit code is the job's: 0 succeeded, 1 failed, 2 stopped; 3 when the
submission itself was refused.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SUBMIT_ERROR = 3


def _add_options(p: argparse.ArgumentParser, defaults: bool) -> None:
    def d(value):
        return value if defaults else argparse.SUPPRESS

    p.add_argument("--address", default=d(os.environ.get("RAY_API_SERVER_ADDRESS")),
                   help="Ray dashboard / Jobs API URL, e.g. http://HEAD:8265 (default RAY_API_SERVER_ADDRESS)")
    p.add_argument("--config", default=d(None), help="config YAML path relative to the working dir")
    p.add_argument("--working-dir", type=Path, default=d(None),
                   help="directory uploaded as the job's code (default: the repository root)")
    p.add_argument("--env", action="append", default=d([]), metavar="KEY=VALUE",
                   help="environment variable for the job (repeatable); not for secrets")
    p.add_argument("--token-env", default=d(None),
                   help="environment variable holding the Ray auth token (default RAY_AUTH_TOKEN if set)")
    p.add_argument("--submission-id", default=d(None),
                   help="idempotency key: Ray refuses a second job with the same id")
    p.add_argument("--num-cpus", type=float, default=d(None), help="CPUs reserved for the entrypoint")
    p.add_argument("--num-gpus", type=float, default=d(None), help="GPUs reserved for the entrypoint")
    p.add_argument("--no-follow", action="store_true", default=d(False), help="print the job id and return")
    p.add_argument("--poll-seconds", type=float, default=d(1.0), help=argparse.SUPPRESS)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("submit", help="submit a jobs/* entrypoint to a Ray cluster and follow it",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_options(p, defaults=True)
    p.add_argument("job", help="job module: train, jobs.train or jobs/train.py")
    # Everything after JOB (options and key=value overrides, in any order) is parsed again in main():
    # argparse alone cannot take positionals after options in a sub-command.
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="[options] key=value ...")
    p.set_defaults(func=main)


def _merge_rest(args: argparse.Namespace) -> argparse.Namespace:
    inner = argparse.ArgumentParser(prog="llavactl submit JOB", add_help=False)
    _add_options(inner, defaults=False)
    inner.add_argument("overrides", nargs="*")
    later = inner.parse_intermixed_args(args.rest)
    for key, value in vars(later).items():
        setattr(args, key, (args.env + value) if key == "env" else value)
    if not hasattr(later, "overrides"):
        args.overrides = []
    return args


def _env_pairs(items: list[str]) -> dict[str, str]:
    from llava_platform.ray_jobs import SubmitError

    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SubmitError(f"--env {item!r} is not of the form KEY=VALUE")
        env[key] = value
    return env


def main(args: argparse.Namespace) -> int:
    from llava_platform import ray_jobs

    args = _merge_rest(args)
    try:
        if not args.address:
            raise ray_jobs.SubmitError("--address is required (or set RAY_API_SERVER_ADDRESS)")
        token_env = args.token_env or ("RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else None)
        token = ray_jobs.read_token(token_env)
        working_dir = (args.working_dir or ray_jobs.find_repo_root()).resolve()
        request = ray_jobs.JobRequest(
            job=args.job, config=args.config, overrides=list(args.overrides), env_vars=_env_pairs(args.env),
            working_dir=working_dir, submission_id=args.submission_id,
            entrypoint_num_cpus=args.num_cpus, entrypoint_num_gpus=args.num_gpus)
        entrypoint = request.entrypoint()  # validates job, config and overrides before any network call
        client = ray_jobs.connect(args.address, token)
        job_id = ray_jobs.submit(client, request)
    except ray_jobs.SubmitError as err:
        print(f"llavactl submit: {err}", file=sys.stderr)
        return SUBMIT_ERROR
    except Exception as err:  # the Jobs API answered with an error (auth, duplicate id, bad runtime env)
        print(f"llavactl submit: the Ray Jobs API refused the job: {err}", file=sys.stderr)
        return SUBMIT_ERROR
    print(f"[llavactl] submitted {job_id}: {entrypoint}", file=sys.stderr)
    print(job_id)
    if args.no_follow:
        return 0
    final = ray_jobs.follow(client, job_id, poll_s=args.poll_seconds)
    return ray_jobs.EXIT_CODES[final]
