"""Remote `image_url`s: fetched from a real local HTTP server when allowed; byte cap, HTTP errors,
redirects and non-images are 4xx; hosts on non-public addresses are refused unless allowed."""

from __future__ import annotations

import io
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from llava_platform.serving.config import Limits
from llava_platform.serving.images import RemotePolicy, check_public_host, load_image
from llava_platform.serving.protocol import APIError


def _png(size=(40, 30), colour=(10, 120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _noise_png() -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (200, 200), os.urandom(200 * 200 * 3)).save(buf, "PNG")  # incompressible: ~120 kB
    return buf.getvalue()


ROUTES: dict[str, tuple[int, dict[str, str], bytes]] = {
    "/ok.png": (200, {"Content-Type": "image/png"}, _png()),
    "/huge.png": (200, {"Content-Type": "image/png"}, _noise_png()),
    "/text": (200, {"Content-Type": "text/plain"}, b"not an image at all"),
    "/moved": (302, {"Location": "/ok.png"}, b""),
}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        status, headers, body = ROUTES.get(self.path, (404, {}, b"missing"))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture(scope="module")
def image_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


LIMITS = Limits(max_image_bytes=20_000)
LOCAL = RemotePolicy(allowed=True, timeout_s=5, private_hosts=True)  # the test server is on loopback


def test_fetches_an_image_when_allowed(image_server):
    image = load_image(f"{image_server}/ok.png", "p", LIMITS, LOCAL)
    assert image.size == (40, 30)


@pytest.mark.parametrize("path, status, code", [
    ("/missing.png", 400, "image_fetch_failed"),
    ("/moved", 400, "image_fetch_failed"),  # redirects are not followed: they could lead anywhere
    ("/huge.png", 413, "image_too_large"),  # over max_image_bytes: cut off while streaming
    ("/text", 400, "invalid_image"),
])
def test_remote_failures_are_4xx(image_server, path, status, code):
    with pytest.raises(APIError) as err:
        load_image(f"{image_server}{path}", "messages.0.content.0.image_url", LIMITS, LOCAL)
    assert (err.value.status, err.value.code) == (status, code)
    assert err.value.param == "messages.0.content.0.image_url"


def test_unreachable_host_is_a_4xx():
    with pytest.raises(APIError) as err:
        load_image("http://127.0.0.1:1/x.png", "p", LIMITS, LOCAL)
    assert (err.value.status, err.value.code) == (400, "image_fetch_failed")


def test_non_public_hosts_are_refused_by_default(image_server):
    policy = RemotePolicy(allowed=True, timeout_s=5)
    for url in (f"{image_server}/ok.png", "http://localhost/x.png", "http://169.254.169.254/latest/meta-data",
                "http://10.1.2.3/x.png", "http://[::1]/x.png"):
        with pytest.raises(APIError) as err:
            load_image(url, "p", LIMITS, policy)
        assert err.value.code == "image_host_forbidden", url
    check_public_host("http://8.8.8.8/x.png", "p")  # a public address passes the check


def test_remote_images_are_off_unless_enabled(image_server):
    with pytest.raises(APIError) as err:
        load_image(f"{image_server}/ok.png", "p", LIMITS, RemotePolicy())
    assert err.value.code == "remote_images_disabled"
