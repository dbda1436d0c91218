"""Two replicas behind one endpoint: a reload sent to one of them reaches both (real Ray Serve)."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

from tests.serving.conftest import ADMIN_KEY, free_port


@pytest.fixture(scope="module")
def two_replicas(ray_local, tiny_llava_dir, tmp_path_factory):
    from llava_platform.serving.launch import shutdown_local, start_app

    admin_key = tmp_path_factory.mktemp("secret") / "admin-key"
    admin_key.write_text(ADMIN_KEY)
    args = {
        "model_uri": str(tiny_llava_dir),
        "auth": {"admin_key_file": str(admin_key), "reload_any_uri": True},
        "model_cache_dir": str(tmp_path_factory.mktemp("model-cache")),
        "model": {"num_replicas": 2, "compile_decode": False, "health_check_period_s": 1.0,
                  "resources": {"num_cpus": 0.5}},
    }
    url = start_app(args, host="127.0.0.1", port=free_port(), timeout_s=240)
    yield url
    shutdown_local()


def _served(url: str, n: int) -> list[tuple[str, str]]:
    """(version, model root) reported by n requests, spread over the replicas by the proxy."""
    out = []
    for _ in range(n):
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
        out.append((model["version"], model["root"]))
    return out


def test_reload_reaches_every_replica(two_replicas, tiny_llava_dir, tmp_path):
    url = two_replicas
    (before, _), = set(_served(url, 10))
    new_dir = tmp_path / "champion-v2"
    shutil.copytree(tiny_llava_dir, new_dir)
    resp = httpx.post(f"{url}/admin/reload", json={"model_uri": str(new_dir)}, timeout=120,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert resp.status_code == 200 and resp.json()["changed"], resp.text
    new_version = resp.json()["version"]
    assert new_version != before
    deadline = time.monotonic() + 90
    while True:
        served = _served(url, 20)
        if set(served) == {(new_version, str(new_dir))}:
            break  # 20 requests in a row, over both replicas, all on the new model
        assert time.monotonic() < deadline, f"replicas still serve {sorted(set(served))}"
        time.sleep(0.5)
