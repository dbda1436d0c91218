"""`llavactl chat --image FILE "question"`: a small client for the served endpoint."""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("chat", help="ask the served model a question about an image")
    p.add_argument("question")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the endpoint")
    p.add_argument("--model", help="served model name (default: the one the endpoint serves, from /v1/models)")
    p.add_argument("--api-key-env", default="LLAVA_API_KEY", help="env var holding the API key (if auth is on)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.set_defaults(func=chat_main)


def image_data_url(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as img:
        fmt = (img.format or "PNG").lower()
    return f"data:image/{fmt};base64," + base64.b64encode(path.read_bytes()).decode()


def _print_stream(resp) -> None:
    for line in resp.iter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            raise RuntimeError(event["error"]["message"])
        for choice in event.get("choices", []):
            print(choice["delta"].get("content") or "", end="", flush=True)
    print()


def _served_model(url: str, headers: dict[str, str]) -> str:
    """The endpoint's own model name, so the client needs no name to match the server's setting."""
    import httpx

    try:
        resp = httpx.get(f"{url.rstrip('/')}/v1/models", headers=headers, timeout=30)
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return "llava"  # the serving default; the chat request then reports what is wrong


def chat_main(args: argparse.Namespace) -> int:
    import httpx

    content: list[dict] = []
    for image in args.image:
        try:
            content.append({"type": "image_url", "image_url": {"url": image_data_url(Path(image))}})
        except OSError as err:
            print(f"llavactl chat: cannot read image {image}: {err}", file=sys.stderr)
            return 2
    content.append({"type": "text", "text": args.question})
    key = os.environ.get(args.api_key_env or "", "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": args.model or _served_model(args.url, headers), "messages": [{"role": "user", "content": content}],
            "max_tokens": args.max_tokens, "temperature": args.temperature, "stream": args.stream}
    url = f"{args.url.rstrip('/')}/v1/chat/completions"
    try:
        with httpx.stream("POST", url, json=body, headers=headers, timeout=300) as resp:
            if resp.status_code != 200:
                resp.read()
                try:
                    message = resp.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = resp.text[:300]
                print(f"llavactl chat: HTTP {resp.status_code}: {message}", file=sys.stderr)
                return 1
            if args.stream:
                _print_stream(resp)
            else:
                resp.read()
                print(resp.json()["choices"][0]["message"]["content"])
    except (httpx.HTTPError, RuntimeError) as err:
        print(f"llavactl chat: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0
