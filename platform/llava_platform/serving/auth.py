"""Bearer-token auth for the serving API, and the guard of `/admin/reload`.

Keys come from an env var or a file (a mounted Kubernetes Secret), are compared in constant time,
and are never logged or echoed back. Inference keys and the admin key are separate: the reload
endpoint is off unless an admin key is configured, refuses the inference key, and accepts only
`models:/` URIs of the registered model being served unless the config widens it, so a caller of
the API can never swap the production model past the promotion gate. Every reload is logged with
who asked (a fingerprint of the admin key and the client address) and what changed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from pathlib import Path
from typing import Any

from llava_platform.serving.config import Auth
from llava_platform.serving.protocol import APIError

log = logging.getLogger("llava.serving.admin")


class KeySourceError(RuntimeError):
    """Auth is configured but its key cannot be read: refuse to start rather than serve unprotected."""


def _read_key(file: str | None, env: str | None, kind: str) -> bytes:
    key = ""
    if file:
        try:
            key = Path(file).read_text().strip()
        except OSError as err:
            raise KeySourceError(f"{kind} key file {file}: {err.strerror}") from None
    elif env:
        key = os.environ.get(env, "").strip()
    if not key:
        raise KeySourceError(f"auth is enabled but the {kind} key from {file or '$' + str(env)} is empty")
    return key.encode()


def load_api_key(auth: Auth) -> bytes | None:
    if not auth.enabled:
        return None
    return _read_key(auth.api_key_file, auth.api_key_env, "api")


def load_admin_key(auth: Auth) -> bytes | None:
    """The admin key, or None when reload is off; refuses one equal to the inference key."""
    if not auth.admin_enabled:
        return None
    admin = _read_key(auth.admin_key_file, auth.admin_key_env, "admin")
    api = load_api_key(auth)
    if api is not None and hmac.compare_digest(admin, api):
        raise KeySourceError("the admin key must differ from the inference API key")
    return admin


def _bearer_matches(expected: bytes, header: str | None) -> bool:
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected)


def check_bearer(expected: bytes | None, header: str | None) -> None:
    """Raise a 401 APIError unless `header` is `Bearer <expected>` (no-op when auth is off)."""
    if expected is None:
        return
    if not _bearer_matches(expected, header):
        raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                       type="authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def registered_model_name(uri: str) -> str | None:
    """`models:/NAME@alias` or `models:/NAME/3` -> NAME; None for any other kind of URI."""
    if not uri.startswith("models:/"):
        return None
    rest = uri[len("models:/"):]
    return rest.split("@", 1)[0].split("/", 1)[0] or None


class ReloadGuard:
    """Who may reload, to what; and the audit line of each reload."""

    def __init__(self, auth: Auth, served_uri: str):
        self.admin_key = load_admin_key(auth)
        self.any_uri = auth.reload_any_uri
        self.served_model = registered_model_name(served_uri)

    def caller(self, header: str | None, client: str | None) -> str:
        """Authorize a reload request; returns who asked (admin key fingerprint @ client address)."""
        if self.admin_key is None:
            raise APIError(403, "model reload is disabled: no admin key is configured "
                                "(auth.admin_key_env / auth.admin_key_file)",
                           type="permission_error", code="reload_disabled")
        if not _bearer_matches(self.admin_key, header):
            log.warning("reload refused: missing or wrong admin key from %s", client or "?")
            raise APIError(401, "reload needs the admin key ('Authorization: Bearer <admin key>')",
                           type="authentication_error", code="invalid_admin_key",
                           headers={"WWW-Authenticate": "Bearer"})
        return f"admin:{hashlib.sha256(self.admin_key).hexdigest()[:8]}@{client or '?'}"

    def check_uri(self, uri: str | None) -> None:
        """Only the served registered model's `models:/` URIs, unless widened (no URI: re-resolve)."""
        if uri is None or self.any_uri:
            return
        name = registered_model_name(uri)
        if self.served_model is None or name != self.served_model:
            allowed = f"models:/{self.served_model}@<alias> or models:/{self.served_model}/<version>" \
                if self.served_model else "none (the served model is not a registered model)"
            raise APIError(403, f"reload to {uri!r} refused: allowed URIs are {allowed} "
                                "(auth.reload_any_uri widens this)", param="model_uri",
                           type="permission_error", code="model_uri_not_allowed")

    @staticmethod
    def record(who: str, before: dict[str, Any], result: dict[str, Any]) -> None:
        # WARNING so the audit line reaches the replica log without any logging configuration.
        log.warning("reload by %s: %s v%s -> %s v%s (changed=%s)", who, before.get("model_uri"),
                    before.get("version"), result.get("model_uri"), result.get("version"), result.get("changed"))
