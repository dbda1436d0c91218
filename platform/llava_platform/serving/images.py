"""Turn the `image_url` parts of a request into PIL images, rejecting anything unsafe or unusable.

`data:` URLs are always accepted; `http(s)` URLs only when the config allows remote images (an
open fetcher would let any client make the server reach into its own network), and even then not
from hosts on non-public addresses unless that is allowed too. Every failure is an `APIError`
with a 4xx status naming the part that failed.

The pixel limit applies to the size the image will have in memory, not to its file: a 12000x1
PNG is a few bytes, but padding it to a square (LLaVA-1.5 pre-processing) or resizing its short
side up to the vision tower's input makes a 12000x12000 image. So the check reads the header only
(PIL decodes nothing on open) and refuses an image whose longest side squared exceeds the limit,
before a single pixel is decompressed.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from PIL import Image

from llava.data.images import ImageError, open_image
from llava_platform.serving.config import Limits
from llava_platform.serving.protocol import APIError, ChatCompletionRequest

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


def count_images(req: ChatCompletionRequest) -> int:
    return sum(
        1 for m in req.messages if isinstance(m.content, list) for p in m.content if p.type == "image_url"
    )


def decode_data_url(url: str, param: str, limits: Limits) -> bytes:
    match = _DATA_URL.match(url)
    if not match or not match.group("b64"):
        raise APIError(400, f"{param}: only base64 data URLs (data:image/...;base64,...) are supported",
                       param=param, code="invalid_image_url")
    payload = url[match.end():]
    # base64 grows data by 4/3; refuse before decoding so a huge string costs nothing.
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise APIError(413, f"{param}: image exceeds {limits.max_image_bytes} bytes", param=param,
                       code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: image data is not valid base64", param=param, code="invalid_base64") from None


@dataclass(frozen=True)
class RemotePolicy:
    """Whether and how `http(s)` image URLs are fetched."""

    allowed: bool = False
    timeout_s: float = 10.0
    private_hosts: bool = False


def check_public_host(url: str, param: str) -> None:
    """Refuse a URL whose host resolves to a non-public address (loopback, private, link-local...).

    The check resolves the name itself; a host that answers differently to the fetch a moment
    later (DNS rebinding) is not covered, which is why remote images stay off by default.
    """
    host = urlsplit(url).hostname
    if not host:
        raise APIError(400, f"{param}: image URL has no host", param=param, code="invalid_image_url")
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise APIError(400, f"{param}: cannot resolve the image host {host!r}", param=param,
                       code="image_fetch_failed") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise APIError(400, f"{param}: image host {host!r} is not on a public network", param=param,
                           code="image_host_forbidden")


def fetch_remote(url: str, param: str, limits: Limits, policy: RemotePolicy) -> bytes:
    """Download with a hard byte cap (streamed, so a large body is cut off, not buffered)."""
    if not policy.private_hosts:
        check_public_host(url, param)
    timeout_s = policy.timeout_s
    try:
        with httpx.stream("GET", url, timeout=timeout_s, follow_redirects=False) as resp:
            if resp.status_code != 200:
                raise APIError(400, f"{param}: fetching the image returned HTTP {resp.status_code}",
                               param=param, code="image_fetch_failed")
            data = bytearray()
            for chunk in resp.iter_bytes():
                data.extend(chunk)
                if len(data) > limits.max_image_bytes:
                    raise APIError(413, f"{param}: image exceeds {limits.max_image_bytes} bytes", param=param,
                                   code="image_too_large")
            return bytes(data)
    except httpx.HTTPError as err:
        raise APIError(400, f"{param}: could not fetch the image: {type(err).__name__}", param=param,
                       code="image_fetch_failed") from None


def load_image(url: str, param: str, limits: Limits, remote: RemotePolicy) -> Image.Image:
    if url.startswith("data:"):
        raw = decode_data_url(url, param, limits)
    elif url.startswith(("http://", "https://")):
        if not remote.allowed:
            raise APIError(400, f"{param}: remote image URLs are disabled on this server; send a data: URL",
                           param=param, code="remote_images_disabled")
        raw = fetch_remote(url, param, limits, remote)
    else:
        raise APIError(400, f"{param}: unsupported image URL scheme", param=param, code="invalid_image_url")
    check_padded_size(raw, param, limits)
    try:
        return open_image(raw, max_pixels=limits.max_image_pixels)
    except ImageError as err:
        reason = str(err)
        if reason.startswith("too_large"):
            raise APIError(400, f"{param}: image too large ({reason.split(':', 1)[1].strip()})", param=param,
                           code="image_too_large") from None
        raise APIError(400, f"{param}: bytes are not a readable image", param=param, code="invalid_image") from None
    except Image.DecompressionBombError:
        raise APIError(400, f"{param}: image too large (decompression bomb)", param=param,
                       code="image_too_large") from None


def check_padded_size(raw: bytes, param: str, limits: Limits) -> None:
    """Refuse, from the header alone, an image whose padded square exceeds the pixel limit."""
    try:
        with Image.open(io.BytesIO(raw)) as probe:  # lazy: reads the header, decodes no pixels
            width, height = probe.size
    except Image.DecompressionBombError:
        raise APIError(400, f"{param}: image too large (decompression bomb)", param=param,
                       code="image_too_large") from None
    except (OSError, ValueError, SyntaxError):
        raise APIError(400, f"{param}: bytes are not a readable image", param=param, code="invalid_image") from None
    side = max(width, height)
    if side * side > limits.max_image_pixels:
        raise APIError(400, f"{param}: image too large ({width}x{height} pads to a {side}x{side} square, over "
                            f"{limits.max_image_pixels} pixels)", param=param, code="image_too_large")


def to_generation_messages(req: ChatCompletionRequest, limits: Limits,
                           remote: RemotePolicy = RemotePolicy()) -> list[dict[str, Any]]:
    """OpenAI messages -> the `generate_batch` form, images decoded to PIL."""
    n_images = count_images(req)
    if n_images > limits.max_images:
        raise APIError(400, f"request has {n_images} images; at most {limits.max_images} are allowed",
                       param="messages", code="too_many_images")
    if len(req.messages) > limits.max_messages:
        raise APIError(400, f"request has {len(req.messages)} messages; at most {limits.max_messages}",
                       param="messages", code="too_many_messages")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(req.messages):
        if not isinstance(msg.content, list):
            out.append({"role": msg.role, "content": msg.content or ""})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(msg.content):
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
            else:
                param = f"messages.{i}.content.{j}.image_url"
                image = load_image(part.image_url.url, param, limits, remote)
                parts.append({"type": "image", "image": image})
        out.append({"role": msg.role, "content": parts})
    return out
