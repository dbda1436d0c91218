"""Serving throughput and latency vs a sequential plain-transformers baseline, on the tiny model.

    .venv/bin/python benchmarks/serve_load.py [--requests 128] [--max-tokens 64] [--concurrency 1 8 32]

Builds the tiny llava-hf model into a temp dir, measures the baseline (one `model.generate` call per
request, one after the other, in this process), then starts the real Ray Serve app on 127.0.0.1
and drives it over HTTP at each concurrency level. Every request carries an image and asks for
the same greedy `max_tokens`, so both sides do the same work. Serving requests stream (with
`stream_options.include_usage`), so each one also gives its time to first token: when the first
text delta arrived. Prints a table and a final `RESULT key=value ...` line with the throughput
ratios against the baseline and the latency and time-to-first-token percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image


def build_model(out: Path) -> Path:
    from llava.model.builder import build_llava, save_llava
    from llava.model.tiny import build_tiny_checkpoints

    vision_dir, lm_dir = build_tiny_checkpoints(out / "base")
    model, processor = build_llava(vision_dir, lm_dir, template="vicuna_v1")
    return save_llava(model, processor, out / "llava")


def make_images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (64 + (i % 5) * 8, 48), ((37 * i) % 256, 90, 200)) for i in range(n)]


def question(i: int) -> str:
    return f"Question {i}: what shapes and colours are in the picture?"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def load_plain(model_dir: Path, threads: int):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(threads)
    return LlavaForConditionalGeneration.from_pretrained(model_dir).eval(), AutoProcessor.from_pretrained(model_dir)


def baseline(plain, images: list[Image.Image], max_tokens: int) -> dict[str, float]:
    """Plain transformers: render, process, generate, decode; one request at a time."""
    import torch

    from llava.data.images import prepare_image

    model, processor = plain
    latencies, tokens = [], 0
    started = time.perf_counter()
    for i, img in enumerate(images):
        t0 = time.perf_counter()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question(i)}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[prepare_image(img, processor.image_processor)], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:]
        processor.tokenizer.decode(new, skip_special_tokens=True)
        tokens += int(new.shape[0])
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - started
    return {"rps": len(images) / wall, "tok_s": tokens / wall, "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99), "n": len(images)}


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def drive(url: str, images: list[Image.Image], concurrency: int, max_tokens: int) -> dict[str, float]:
    # Bodies are serialised up front so the load generator (which shares the 2 cores) spends its CPU
    # on HTTP only; each is still a distinct request with its own image and question.
    bodies = [json.dumps({"model": "llava", "max_tokens": max_tokens, "temperature": 0, "stream": True,
                          "stream_options": {"include_usage": True}, "messages": [{
        "role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}},
                                    {"type": "text", "text": question(i)}]}]}).encode()
        for i, img in enumerate(images)]
    headers = {"content-type": "application/json"}
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    first_tokens: list[float] = []
    tokens = errors = 0
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency + 2)) as client:
        async def one(body: bytes) -> None:
            nonlocal tokens, errors
            async with sem:
                t0 = time.perf_counter()
                first = None
                async with client.stream("POST", f"{url}/v1/chat/completions", content=body, headers=headers) as resp:
                    if resp.status_code != 200:
                        errors += 1
                        await resp.aread()
                        return
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                            first = time.perf_counter() - t0
                        if chunk.get("usage"):
                            tokens += chunk["usage"]["completion_tokens"]
                latencies.append(time.perf_counter() - t0)
                first_tokens.append(first if first is not None else latencies[-1])

        started = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        wall = time.perf_counter() - started
    ok = latencies or [float("nan")]
    return {"rps": len(bodies) / wall, "tok_s": tokens / wall, "p50": percentile(ok, 50),
            "p99": percentile(ok, 99), "ttft_p50": percentile(first_tokens or ok, 50),
            "ttft_p99": percentile(first_tokens or ok, 99), "n": len(bodies), "errors": errors}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(model_dir: Path, args: argparse.Namespace) -> list[tuple[int, dict, dict]]:
    """Per concurrency level: a baseline run right before the serving run, so that load from other
    processes on a shared machine hits both sides of each ratio alike."""
    import ray

    from llava_platform.serving.launch import shutdown_local, start_app

    plain = load_plain(model_dir, args.threads)
    baseline(plain, make_images(8), args.max_tokens)  # warm-up
    top = max(args.concurrency)
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    # The shipped defaults (ServeConfig) unless a knob is given on the command line; the only
    # overrides are the access log (one line per request, noise for a load test) and torch threads
    # (the same number as the baseline uses).
    model_cfg: dict = {"torch_threads": args.threads, "resources": {"num_cpus": args.threads}}
    if args.eager:
        model_cfg["compile_decode"] = False
    if args.admit_wait_s is not None:
        model_cfg["admit_wait_s"] = args.admit_wait_s
    if args.max_batch_size is not None:
        model_cfg["max_batch_size"] = args.max_batch_size
        model_cfg["max_ongoing_requests"] = max(top, args.max_batch_size)
        model_cfg["max_queued_requests"] = 4 * top
    url = start_app({"model_uri": str(model_dir), "access_log": False, "model": model_cfg},
                    host="127.0.0.1", port=free_port())
    rows = []
    try:
        asyncio.run(drive(url, make_images(16), 8, args.max_tokens))  # warm-up
        for _ in range(args.rounds):
            for c in args.concurrency:
                base = baseline(plain, make_images(args.baseline_requests), args.max_tokens)
                rows.append((c, base, asyncio.run(drive(url, make_images(args.requests), c, args.max_tokens))))
    finally:
        shutdown_local()
        ray.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=128, help="requests per serving level")
    parser.add_argument("--baseline-requests", type=int, default=32, help="requests per baseline run")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-batch-size", type=int, default=None, help="default: the shipped config")
    parser.add_argument("--eager", action="store_true", help="model.compile_decode=false (default: compiled)")
    parser.add_argument("--admit-wait-s", type=float, default=None, help="default: the shipped config")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, baseline and model replica alike")
    parser.add_argument("--rounds", type=int, default=2, help="alternating baseline/serving rounds per level")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(build_model(Path(tmp)), args)

    print(f"\nhost: {platform.machine()} {os.cpu_count()} CPUs, torch threads {args.threads}, "
          f"max_tokens={args.max_tokens}, one image per request, greedy")
    print(f"{'setup':<26}{'req/s':>9}{'tok/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'x base':>8}{'errors':>8}"
          f"{'ttft50':>9}{'ttft99':>9}")
    for c, base, r in rows:
        print(f"{'baseline (before c=' + str(c) + ')':<26}{base['rps']:>9.2f}{base['tok_s']:>9.1f}"
              f"{base['p50'] * 1e3:>9.1f}{base['p99'] * 1e3:>9.1f}{1.0:>8.2f}{0:>8}")
        print(f"{'serve c=' + str(c):<26}{r['rps']:>9.2f}{r['tok_s']:>9.1f}{r['p50'] * 1e3:>9.1f}"
              f"{r['p99'] * 1e3:>9.1f}{r['rps'] / base['rps']:>8.2f}{r['errors']:>8}"
              f"{r['ttft_p50'] * 1e3:>9.1f}{r['ttft_p99'] * 1e3:>9.1f}")
    # Per level: the median over rounds of (serving throughput / the baseline measured just before it).
    result = []
    for c in args.concurrency:
        mine = [(b, r) for cc, b, r in rows if cc == c]
        result += [f"c{c}_baseline_rps={statistics.median(b['rps'] for b, _ in mine):.2f}",
                   f"c{c}_rps={statistics.median(r['rps'] for _, r in mine):.2f}",
                   f"c{c}_p50_ms={statistics.median(r['p50'] for _, r in mine) * 1e3:.1f}",
                   f"c{c}_p99_ms={statistics.median(r['p99'] for _, r in mine) * 1e3:.1f}",
                   f"c{c}_ttft_p50_ms={statistics.median(r['ttft_p50'] for _, r in mine) * 1e3:.1f}",
                   f"c{c}_ttft_p99_ms={statistics.median(r['ttft_p99'] for _, r in mine) * 1e3:.1f}",
                   f"c{c}_speedup={statistics.median(r['rps'] / b['rps'] for b, r in mine):.2f}",
                   f"c{c}_errors={sum(r['errors'] for _, r in mine)}"]
    print("RESULT " + " ".join(result))


if __name__ == "__main__":
    main()
