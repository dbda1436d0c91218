"""`llavactl serve`: run the OpenAI-compatible endpoint; `llavactl serve reload`: switch it to the
current champion (or another model) without dropping requests."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from llava_platform.commands.overrides import add_override_arguments, collect_overrides

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _serve_options(p: argparse.ArgumentParser, defaults: bool) -> None:
    def d(value):
        return value if defaults else argparse.SUPPRESS

    p.add_argument("--model", default=d(None),
                   help="models:/NAME@ALIAS, runs:/..., s3://... or a local llava-hf directory")
    p.add_argument("--host", default=d("127.0.0.1"))
    p.add_argument("--port", type=int, default=d(8000))
    p.add_argument("--config", default=d(None),
                   help="YAML file with serving settings (llava_platform.serving.config.ServeConfig)")
    p.add_argument("--ray-address", default=d(None), help="existing Ray cluster to deploy on (default: start a local one)")
    p.add_argument("--allow-unauthenticated", action="store_true", default=d(False),
                   help="permit a non-loopback --host without API-key auth")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API (Ray Serve)",
        description="Serve a model until Ctrl-C or SIGTERM (then Serve and the Ray it started stop). "
                    "Overrides: key=value after the options, e.g. model.max_batch_size=16. "
                    "`llavactl serve reload --help`: switch a running endpoint to the current champion.")
    _serve_options(p, defaults=True)
    add_override_arguments(p, "model.max_batch_size=16", positional=False)
    # `reload ...` or key=value overrides: argparse cannot combine an optional sub-command with
    # positionals, so what follows the options is parsed again in serve_main (as `llavactl submit` does).
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="key=value ... | reload [options]")
    p.set_defaults(func=serve_main)


def _reload_parser() -> argparse.ArgumentParser:
    r = argparse.ArgumentParser(prog="llavactl serve reload",
                                description="re-resolve the served model URI (e.g. the champion alias) and hot-swap")
    r.add_argument("--address", default="http://127.0.0.1:8000", help="base URL of the running endpoint")
    r.add_argument("--model", help="switch to this model URI instead of re-resolving the current one")
    r.add_argument("--force", action="store_true", help="reload even if the model content did not change")
    r.add_argument("--admin-key-env", default="LLAVA_ADMIN_KEY",
                   help="env var holding the admin key (reload is off on servers without one)")
    r.add_argument("--timeout", type=float, default=600.0)
    return r


def _merge_rest(args: argparse.Namespace) -> argparse.Namespace:
    inner = argparse.ArgumentParser(prog="llavactl serve", add_help=False)
    _serve_options(inner, defaults=False)
    add_override_arguments(inner, "model.max_batch_size=16")
    later = inner.parse_intermixed_args(args.rest)
    for key, value in vars(later).items():
        setattr(args, key, (args.deprecated_set + value) if key == "deprecated_set" else value)
    return args


def _load_serve_config(args: argparse.Namespace):
    from llava_platform.config import load_config
    from llava_platform.serving.config import ServeConfig

    overrides = collect_overrides(args, "llavactl serve")
    if args.model:
        overrides.append(f"model_uri={args.model}")
    return load_config(ServeConfig, args.config, overrides)


def _check_model(cfg):
    """Before Ray starts: the model exists (a registry alias that is not there would otherwise end a
    page of Serve deployment errors). Registry and run URIs are resolved in the store in use, which
    the replicas are then told about (they do not share this process's MLflow settings)."""
    from llava_platform import preflight, tracking

    if not cfg.model_uri.startswith(("models:/", "runs:/")):
        preflight.require_model_dir(cfg.model_uri, "--model")
        return cfg
    uri = tracking.configure(cfg.mlflow_tracking_uri)
    preflight.require_tracking_store(uri)
    preflight.require_model_dir(cfg.model_uri, "--model", tracking_uri=uri)
    return cfg.model_copy(update={"mlflow_tracking_uri": uri})


def serve_main(args: argparse.Namespace) -> int:
    from llava_platform.config import ConfigError
    from llava_platform.preflight import InputError

    if args.rest[:1] == ["reload"]:
        return reload_main(_reload_parser().parse_args(args.rest[1:]))
    args = _merge_rest(args)
    try:
        cfg = _load_serve_config(args)
    except ConfigError as err:
        print(f"llavactl serve: {err}", file=sys.stderr)
        return 2
    if args.host not in LOOPBACK and not cfg.auth.enabled and not args.allow_unauthenticated:
        print(f"llavactl serve: refusing to listen on {args.host} without auth; set auth.api_key_env or "
              "auth.api_key_file (or pass --allow-unauthenticated)", file=sys.stderr)
        return 2
    try:
        cfg = _check_model(cfg)
    except InputError as err:
        print(f"llavactl serve: {err}", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    from llava_platform.serving.chat_page import PAGE_PATH
    from llava_platform.serving.launch import ServeStartError, start_app

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=args.ray_address, include_dashboard=False) if args.ray_address else ray.init()
    # SIGTERM (systemd, Kubernetes, `kill`) stops like Ctrl-C: Serve and the Ray started here go too.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        url = start_app(cfg.model_dump(mode="json"), host=args.host, port=args.port)
    except (ServeStartError, KeyboardInterrupt) as err:
        print(f"llavactl serve: {err or 'interrupted'}", file=sys.stderr)
        _stop(serve, ray, started_ray)
        return 1
    print(f"serving {cfg.model_uri} as {cfg.served_model_name!r} at {url}/v1 (Ctrl-C to stop)", flush=True)
    print(f"chat page: {url}{PAGE_PATH}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        _stop(serve, ray, started_ray)
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _stop(serve, ray, started_ray: bool) -> None:
    """Serve's proxy and replicas, then the local Ray (raylet, GCS, agents) if this process started it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM during the shutdown kills at once
    try:
        serve.shutdown()
    finally:
        if started_ray:
            ray.shutdown()


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
