"""One real Ray Serve application per test module, on 127.0.0.1, serving the tiny llava-hf model."""

from __future__ import annotations

import base64
import io
import socket
from pathlib import Path

import pytest
from PIL import Image

API_KEY = "test-key-" + "0123456789abcdef"


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
def serve_app(ray_local, tiny_llava_dir, tmp_path_factory):
    """Base URL + API key of a running app with auth on (key from a file, as from a k8s Secret)."""
    from llava_platform.serving.launch import shutdown_local, start_app

    key_file: Path = tmp_path_factory.mktemp("secret") / "api-key"
    key_file.write_text(API_KEY + "\n")
    args = {
        "model_uri": str(tiny_llava_dir),
        "auth": {"api_key_file": str(key_file)},
        "limits": {"max_tokens": 256, "max_images": 2, "max_image_pixels": 4_000_000,
                   "max_request_bytes": 2_000_000},
        "model": {"max_batch_size": 8, "batch_wait_timeout_s": 0.02, "max_ongoing_requests": 16,
                  "max_queued_requests": 24, "resources": {"num_cpus": 1}},
        "retry_after_s": 2,
    }
    url = start_app(args, host="127.0.0.1", port=free_port(), timeout_s=240)
    yield {"url": url, "key": API_KEY, "model_dir": Path(tiny_llava_dir)}
    shutdown_local()
