"""Two replicas behind one endpoint: a reload sent to one of them reaches both, even when the
follower's first load fails; traffic never fails meanwhile (real Ray Serve)."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest

from tests.serving.conftest import ADMIN_KEY, free_port


@pytest.fixture(scope="module")
def two_replicas(ray_local, tiny_llava_dir, tmp_path_factory):
    from ray import serve

    from llava_platform.serving.launch import start_app

    admin_key = tmp_path_factory.mktemp("secret") / "admin-key"
    admin_key.write_text(ADMIN_KEY)
    args = {
        "model_uri": str(tiny_llava_dir),
        # Beside the package's serve_app (one Serve proxy per cluster): its own name and prefix.
        "app_name": "two-replicas",
        "route_prefix": "/two",
        "auth": {"admin_key_file": str(admin_key), "reload_any_uri": True},
        "model_cache_dir": str(tmp_path_factory.mktemp("model-cache")),
        "model": {"num_replicas": 2, "compile_decode": False, "health_check_period_s": 2.0,
                  "reload_backoff_s": 0.5, "reload_retries": 6, "resources": {"num_cpus": 0.5}},
    }
    url = start_app(args, host="127.0.0.1", port=free_port(), timeout_s=240)
    yield url
    serve.delete("two-replicas")


def _served(url: str, n: int) -> list[tuple[str, str]]:
    """(version, model root) reported by n requests, spread over the replicas by the proxy."""
    out = []
    for _ in range(n):
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
        out.append((model["version"], model["root"]))
    return out


def _traffic(url: str, stop: threading.Event, statuses: list[int]) -> None:
    body = {"model": "llava", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            statuses.append(client.post(f"{url}/v1/chat/completions", json=body).status_code)


def _wait_lagging(url: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        resp = httpx.get(f"{url}/readyz", timeout=10)
        if resp.status_code == 503 and resp.json().get("status") == "lagging":
            return resp.json()
        time.sleep(0.1)
    raise AssertionError("no replica reported lagging behind the reload")


def test_reload_reaches_every_replica_even_when_the_follower_first_fails(two_replicas, tiny_llava_dir, tmp_path):
    url = two_replicas
    (before, _), = set(_served(url, 10))
    new_dir = tmp_path / "champion-v2"
    shutil.copytree(tiny_llava_dir, new_dir)
    stop, statuses = threading.Event(), []
    traffic = threading.Thread(target=_traffic, args=(url, stop, statuses))
    traffic.start()
    try:
        resp = httpx.post(f"{url}/admin/reload", json={"model_uri": str(new_dir)}, timeout=120,
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert resp.status_code == 200 and resp.json()["changed"], resp.text
        assert "model_dir" not in resp.json()  # no server-side paths in answers
        new_version = resp.json()["version"]
        assert new_version != before
        # The receiving replica has loaded; the follower picks the reload up on a health check
        # (every 2 s) and finds the model's config missing: its load fails, it reports lagging.
        (new_dir / "config.json").rename(new_dir / "config.json.away")
        lagging = _wait_lagging(url, 30)
        assert lagging["behind"]["model_uri"] == str(new_dir) and lagging["behind"]["error"]
        assert lagging["version"] == before
        (new_dir / "config.json.away").rename(new_dir / "config.json")  # the volume caught up
        deadline = time.monotonic() + 90
        while True:
            served = _served(url, 20)
            if set(served) == {(new_version, str(new_dir))}:
                break  # 20 requests in a row, over both replicas, all on the new model
            assert time.monotonic() < deadline, f"replicas still serve {sorted(set(served))}"
            time.sleep(0.5)
        for _ in range(20):
            assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    finally:
        stop.set()
        traffic.join()
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert f'llava_model_info{{model_uri="{new_dir}",version="{new_version}"}} 1.0' in metrics
