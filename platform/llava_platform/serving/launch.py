"""Start and stop the serving application on the local Ray instance (embedded default, tests, `llavactl run`)."""

from __future__ import annotations

import time
from typing import Any

import httpx

from llava_platform.serving.config import parse_serve_config


class ServeStartError(RuntimeError):
    """The application did not become ready in time."""


def wait_ready(base_url: str, timeout_s: float = 180.0, api_key: str | None = None) -> dict[str, Any]:
    """Poll /readyz until the model replica answers."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(f"{base_url}/readyz", timeout=5)
            if resp.status_code == 200:
                return resp.json()
            last = f"HTTP {resp.status_code}: {resp.text[:200]}"
        except httpx.HTTPError as err:
            last = type(err).__name__
        time.sleep(0.5)
    raise ServeStartError(f"serving at {base_url} not ready after {timeout_s:.0f}s ({last})")


def start_app(args: dict[str, Any], *, host: str = "127.0.0.1", port: int = 8000, timeout_s: float = 180.0) -> str:
    """Deploy `build_app(args)` on the already-initialised Ray; return the base URL once ready."""
    from ray import serve
    from ray.serve.context import _get_global_client

    from llava_platform.serving.app import build_app

    cfg = parse_serve_config(args)
    serve.start(http_options={"host": host, "port": port})
    # Serve is one per cluster: if it was already running, its proxy keeps its own host/port.
    http = _get_global_client().http_config
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::") else http.host
    serve.run(build_app(args), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    base_url = f"http://{host}:{http.port}{cfg.route_prefix.rstrip('/')}"
    wait_ready(base_url, timeout_s)
    return base_url


def start_local(model_uri: str, *, host: str = "127.0.0.1", port: int = 8000, **overrides: Any) -> str:
    """What `llavactl run --serve` calls: serve `model_uri` with the embedded defaults (no auth,
    loopback only), on the Ray instance the caller initialised. Returns the base URL."""
    return start_app({"model_uri": str(model_uri), **overrides}, host=host, port=port)


def shutdown_local() -> None:
    from ray import serve

    serve.shutdown()
