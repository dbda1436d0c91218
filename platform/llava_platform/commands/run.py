"""`llavactl run`: the whole pipeline on the embedded default, then one chat with the champion.

Local Ray (what the machine has), MLflow tracking in `sqlite:///DIR/mlflow.db` with artifacts under
DIR, data and checkpoints under DIR. The pipeline itself runs as a Ray job (`python -m
jobs.pipeline`) attached to the local cluster, exactly as `ray job submit` would run it on a real
one; this process then serves `models:/<name>@champion` with Ray Serve and sends it one request.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run the whole pipeline on the embedded default and chat with the result")
    p.add_argument("--workdir", default=".llava", help="where data, checkpoints and MLflow live (default .llava)")
    p.add_argument("--serve", action="store_true", help="keep the endpoint up until Ctrl-C")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the endpoint (127.0.0.1)")
    p.add_argument("--config", default=None, help="pipeline config (default jobs/configs/pipeline_tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="pipeline key=value overrides, e.g. n_images=500")
    p.set_defaults(func=run_main)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_ray(env: dict[str, str]) -> str:
    import ray

    # With the dashboard comes Ray's State API, which Ray Train's placement-group cleaner polls every
    # second of training: without it, each poll logged a "Failed to query Ray Train Controller actor
    # state" warning. A free loopback port: another Ray on the machine may hold the default one.
    ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=_free_port(),
             runtime_env={"env_vars": env}, log_to_driver=False)
    return ray.get_runtime_context().gcs_address


def _run_pipeline(args: argparse.Namespace, workdir: Path, env: dict[str, str], address: str) -> dict:
    cmd = [sys.executable, "-m", "jobs.pipeline", f"workdir={workdir}", *args.overrides]
    if args.config:
        cmd[3:3] = ["--config", args.config]
    print(f"[run] pipeline job: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, env={**os.environ, **env, "RAY_ADDRESS": address}, check=False)
    summary_file = workdir / "pipeline_summary.json"
    if proc.returncode not in (0, 3) or not summary_file.exists():
        raise SystemExit(f"[run] pipeline job failed (exit {proc.returncode}); see the output above")
    return json.loads(summary_file.read_text())


def _first_eval_image(workdir: Path) -> Path:
    images = sorted((workdir / "data" / "images").glob("shapes_eval_*.png"))
    if not images:
        raise SystemExit(f"[run] no held-out image under {workdir / 'data' / 'images'}")
    return images[0]


def _true_count(workdir: Path, image: Path) -> int | None:
    """How many shapes the held-out image really holds (its record in eval/captions.jsonl)."""
    captions = workdir / "data" / "eval" / "captions.jsonl"
    for line in captions.read_text().splitlines() if captions.exists() else []:
        record = json.loads(line)
        if Path(record["image"]).name == image.name:
            return len(record["instances"])
    return None


def answer_verdict(answer: str, true_count: int | None) -> str:
    """'right' when the numbers the answer states ("3", "three") are exactly the true count."""
    if true_count is None:
        return "unchecked: the image has no record"
    from llava.eval.shapes import normalise_answer

    stated = {w for w in normalise_answer(answer).split() if w.isdigit()}
    verdict = "right" if stated == {str(true_count)} else "wrong"
    return f"{verdict}: the image holds {true_count} shape{'s' if true_count != 1 else ''}"


def _chat_once(base_url: str, image: Path) -> str:
    import httpx

    from llava_platform.commands.chat import image_data_url

    model = httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"][0]["id"]
    body = {"model": model, "max_tokens": 32, "temperature": 0.0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_data_url(image)}},
        {"type": "text", "text": "How many shapes are in the image?"}]}]}
    resp = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)
    resp.raise_for_status()
    return resp.json()["choices"][0]["message"]["content"]


def run_main(args: argparse.Namespace) -> int:
    from llava_platform import tracking

    started = time.time()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking.embedded_tracking_uri(workdir)
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           # progress bars of weight loading and saving arrive through Ray as one line per redraw, and
           # transformers' load reports (a table of the tiny CLIP's unused text-tower keys per worker
           # and stage) and resize notes are warnings about expected states: errors only
           "HF_HUB_DISABLE_PROGRESS_BARS": os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
           "TRANSFORMERS_VERBOSITY": os.environ.get("TRANSFORMERS_VERBOSITY", "error")}
    os.environ.update(env)
    address = _start_ray(env)
    print(f"[run] local Ray at {address}; MLflow at {tracking_uri}", flush=True)
    try:
        summary = _run_pipeline(args, workdir, env, address)
        if not summary["promoted"]:
            print(f"[run] {summary['model_name']} v{summary['version']} did not pass the promotion gate, so there "
                  "is no new champion to serve; see `llavactl models show`.")
            return 3
        from llava_platform.serving.chat_page import PAGE_PATH
        from llava_platform.serving.launch import shutdown_local, start_local

        model_uri = f"models:/{summary['model_name']}@champion"
        print(f"[run] serving {model_uri} with Ray Serve", flush=True)
        # One chat request follows: compiling the decode step would cost more than it saves.
        base_url = start_local(model_uri, port=args.port, model={"compile_decode": False})
        image = _first_eval_image(workdir)
        question = "How many shapes are in the image?"
        answer = _chat_once(base_url, image)
        print(f"[run] asked about {image.name}: {question!r}")
        print(f"[run] answer: {answer!r} ({answer_verdict(answer, _true_count(workdir, image))})")
        print(f"[run] endpoint: {base_url}/v1/chat/completions (OpenAI-compatible)")
        print(f"[run] chat page: {base_url}{PAGE_PATH}")
        print(f"[run] MLflow UI: mlflow ui --backend-store-uri {tracking_uri} --port 5000")
        print(f"[run] finished in {time.time() - started:.0f}s", flush=True)
        if args.serve:
            print("[run] serving until Ctrl-C", flush=True)
            while True:
                time.sleep(3600)
        shutdown_local()
    finally:
        import ray

        ray.shutdown()
    return 0
