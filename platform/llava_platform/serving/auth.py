"""Bearer-token auth for the serving API. The key comes from an env var or a file (a mounted
Kubernetes Secret), is compared in constant time, and is never logged or echoed back."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from llava_platform.serving.config import Auth
from llava_platform.serving.protocol import APIError


class KeySourceError(RuntimeError):
    """Auth is configured but its key cannot be read: refuse to start rather than serve unprotected."""


def load_api_key(auth: Auth) -> bytes | None:
    if not auth.enabled:
        return None
    key = ""
    if auth.api_key_file:
        try:
            key = Path(auth.api_key_file).read_text().strip()
        except OSError as err:
            raise KeySourceError(f"api key file {auth.api_key_file}: {err.strerror}") from None
    elif auth.api_key_env:
        key = os.environ.get(auth.api_key_env, "").strip()
    if not key:
        source = auth.api_key_file or f"${auth.api_key_env}"
        raise KeySourceError(f"auth is enabled but the API key from {source} is empty")
    return key.encode()


def check_bearer(expected: bytes | None, header: str | None) -> None:
    """Raise a 401 APIError unless `header` is `Bearer <expected>` (no-op when auth is off)."""
    if expected is None:
        return
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
        raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                       type="authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
