"""One real Ray Serve application per test module, on 127.0.0.1, serving the tiny llava-hf model.

Module scope, not package scope: with one app for the whole package, the shared app stopped
answering (connection refused) after the two-replica module's app ran beside it (load average ~60;
not investigated further)."""

from __future__ import annotations

import base64
import io
import socket
import uuid
from pathlib import Path

import pytest
from PIL import Image

API_KEY = "test-key-" + "0123456789abcdef"
ADMIN_KEY = "test-admin-" + "fedcba9876543210"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(text: str, colour=(220, 40, 40), size=(48, 32)) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(Image.new("RGB", size, colour))}},
        {"type": "text", "text": text},
    ]}]


@pytest.fixture(scope="module")
def serve_app(ray_local, tiny_llava_dir, mlflow_sqlite, tmp_path_factory):
    """A running app with auth on (key from a file, as from a k8s Secret), serving the champion of a
    registered model that has two versions (both the tiny model, logged by two runs)."""
    from llava_platform.registry import register_version
    from llava_platform.serving.launch import shutdown_local, start_app

    client = mlflow_sqlite.client()
    name = f"llava-serve-{uuid.uuid4().hex[:6]}"
    versions = [register_version(name, mlflow_sqlite.log_model_dir(Path(tiny_llava_dir)), client=client,
                                 candidate_alias=None) for _ in range(2)]
    client.set_registered_model_alias(name, "champion", versions[0])
    key_file: Path = tmp_path_factory.mktemp("secret") / "api-key"
    key_file.write_text(API_KEY + "\n")
    admin_file = key_file.with_name("admin-key")
    admin_file.write_text(ADMIN_KEY + "\n")
    args = {
        "model_uri": f"models:/{name}@champion",
        "mlflow_tracking_uri": mlflow_sqlite.tracking_uri,
        "model_cache_dir": str(tmp_path_factory.mktemp("model-cache")),
        # The reload tests switch to local copies of the model: reload_any_uri widens the URI policy.
        "auth": {"api_key_file": str(key_file), "admin_key_file": str(admin_file), "reload_any_uri": True},
        "limits": {"max_tokens": 256, "max_images": 2, "max_image_pixels": 4_000_000,
                   "max_request_bytes": 2_000_000},
        "model": {"max_batch_size": 8, "compile_decode": False, "max_ongoing_requests": 16,
                  "max_queued_requests": 24, "resources": {"num_cpus": 1}},
        "retry_after_s": 2,
    }
    url = start_app(args, host="127.0.0.1", port=free_port(), timeout_s=240)
    yield {"url": url, "key": API_KEY, "admin_key": ADMIN_KEY, "model_dir": Path(tiny_llava_dir), "registry": client, "name": name,
           "versions": versions}
    shutdown_local()
