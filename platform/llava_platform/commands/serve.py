"""`llavactl serve`: run the OpenAI-compatible endpoint; `llavactl serve reload`: switch it to the
current champion (or another model) without dropping requests."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (Ray Serve)")
    p.add_argument("--model", help="models:/NAME@ALIAS, runs:/..., s3://... or a local llava-hf directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--config", help="YAML file with serving settings (llava_platform.serving.config.ServeConfig)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.max_batch_size=16 (repeatable)")
    p.add_argument("--ray-address", help="existing Ray cluster to deploy on (default: start a local one)")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="permit a non-loopback --host without API-key auth")
    p.set_defaults(func=serve_main)
    sub = p.add_subparsers(dest="serve_command")
    r = sub.add_parser("reload", help="re-resolve the served model URI (e.g. the champion alias) and hot-swap")
    r.add_argument("--address", default="http://127.0.0.1:8000", help="base URL of the running endpoint")
    r.add_argument("--model", help="switch to this model URI instead of re-resolving the current one")
    r.add_argument("--force", action="store_true", help="reload even if the model content did not change")
    r.add_argument("--admin-key-env", default="LLAVA_ADMIN_KEY",
                   help="env var holding the admin key (reload is off on servers without one)")
    r.add_argument("--timeout", type=float, default=600.0)
    r.set_defaults(func=reload_main)


def _load_serve_config(args: argparse.Namespace):
    from llava_platform.config import load_config
    from llava_platform.serving.config import ServeConfig

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model_uri={args.model}")
    return load_config(ServeConfig, args.config, overrides)


def serve_main(args: argparse.Namespace) -> int:
    from llava_platform.config import ConfigError

    try:
        cfg = _load_serve_config(args)
    except ConfigError as err:
        print(f"llavactl serve: {err}", file=sys.stderr)
        return 2
    if args.host not in LOOPBACK and not cfg.auth.enabled and not args.allow_unauthenticated:
        print(f"llavactl serve: refusing to listen on {args.host} without auth; set auth.api_key_env or "
              "auth.api_key_file (or pass --allow-unauthenticated)", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    from llava_platform.serving.chat_page import PAGE_PATH
    from llava_platform.serving.launch import ServeStartError, start_app

    if not ray.is_initialized():
        ray.init(address=args.ray_address, include_dashboard=False) if args.ray_address else ray.init()
    try:
        url = start_app(cfg.model_dump(mode="json"), host=args.host, port=args.port)
    except ServeStartError as err:
        print(f"llavactl serve: {err}", file=sys.stderr)
        return 1
    print(f"serving {cfg.model_uri} as {cfg.served_model_name!r} at {url}/v1 (Ctrl-C to stop)", flush=True)
    print(f"chat page: {url}{PAGE_PATH}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        serve.shutdown()
    return 0


def reload_main(args: argparse.Namespace) -> int:
    import httpx

    headers = {}
    key = os.environ.get(args.admin_key_env or "", "")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    body: dict = {"force": bool(args.force)}
    if args.model:
        body["model_uri"] = args.model
    try:
        resp = httpx.post(f"{args.address.rstrip('/')}/admin/reload", json=body, headers=headers,
                          timeout=args.timeout)
    except httpx.HTTPError as err:
        print(f"llavactl serve reload: cannot reach {args.address}: {type(err).__name__}", file=sys.stderr)
        return 1
    if resp.status_code != 200:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text[:300]
        print(f"llavactl serve reload: HTTP {resp.status_code}: {message}", file=sys.stderr)
        return 1
    out = resp.json()
    if out.get("changed"):
        print(f"switched {out['previous']} -> {out['version']} ({out['model_uri']})")
    else:
        print(f"unchanged: still serving {out['version']} ({out['model_uri']})")
    print(json.dumps(out), file=sys.stderr)
    return 0
