"""Closed by default: reload needs a separate admin key and only accepts the served model's
registry URIs; the inference key never reloads. (Over HTTP: tests/serving/test_openai_api.py.)"""

from __future__ import annotations

import logging

import pytest

from llava_platform.serving.auth import KeySourceError, ReloadGuard, load_admin_key, registered_model_name
from llava_platform.serving.config import Auth
from llava_platform.serving.protocol import APIError


def _keys(tmp_path, api: str, admin: str) -> Auth:
    (tmp_path / "api").write_text(api + "\n")
    (tmp_path / "admin").write_text(admin + "\n")
    return Auth(api_key_file=str(tmp_path / "api"), admin_key_file=str(tmp_path / "admin"))


def _refused(call, status: int, code: str) -> APIError:
    with pytest.raises(APIError) as err:
        call()
    assert (err.value.status, err.value.body()["error"]["code"]) == (status, code)
    return err.value


def test_reload_is_off_without_an_admin_key(tmp_path):
    (tmp_path / "api").write_text("inference-key")
    guard = ReloadGuard(Auth(api_key_file=str(tmp_path / "api")), "models:/llava@champion")
    # Even the inference key cannot reload a server that has no admin key.
    _refused(lambda: guard.caller("Bearer inference-key", "10.0.0.5"), 403, "reload_disabled")


def test_admin_key_must_differ_from_the_inference_key(tmp_path):
    with pytest.raises(KeySourceError, match="must differ"):
        load_admin_key(_keys(tmp_path, "same-key", "same-key"))
    with pytest.raises(KeySourceError, match="empty"):
        load_admin_key(Auth(admin_key_env="LLAVA_ADMIN_KEY_UNSET_IN_TESTS"))


def test_only_the_admin_key_reloads_and_the_caller_is_logged(tmp_path, caplog):
    guard = ReloadGuard(_keys(tmp_path, "inference-key", "admin-key"), "models:/llava@champion")
    for header in (None, "", "Bearer inference-key", "Bearer admin-key-but-longer", "Basic admin-key"):
        err = _refused(lambda h=header: guard.caller(h, "10.0.0.5"), 401, "invalid_admin_key")
        assert "admin-key" not in err.message  # never echoed
    who = guard.caller("Bearer admin-key", "10.0.0.5")
    assert who.startswith("admin:") and who.endswith("@10.0.0.5") and "admin-key" not in who
    with caplog.at_level(logging.INFO, logger="llava.serving.admin"):
        guard.record(who, {"model_uri": "models:/llava@champion", "version": "a1"},
                     {"model_uri": "models:/llava/7", "version": "b2", "changed": True})
    line = caplog.records[-1].getMessage()
    assert who in line and "models:/llava@champion va1 -> models:/llava/7 vb2" in line and "changed=True" in line


@pytest.mark.parametrize("uri", ["models:/llava@challenger", "models:/llava/7", None])
def test_served_registered_model_uris_pass(tmp_path, uri):
    ReloadGuard(_keys(tmp_path, "k1", "k2"), "models:/llava@champion").check_uri(uri)


@pytest.mark.parametrize("uri", ["/tmp/model", "s3://bucket/model", "runs:/abc/model", "models:/other@champion",
                                 "models:/llava-evil@champion", "file:///tmp/model"])
def test_other_uris_are_refused_unless_widened(tmp_path, uri):
    auth = _keys(tmp_path, "k1", "k2")
    guard = ReloadGuard(auth, "models:/llava@champion")
    err = _refused(lambda: guard.check_uri(uri), 403, "model_uri_not_allowed")
    assert "models:/llava@<alias>" in err.message
    ReloadGuard(auth.model_copy(update={"reload_any_uri": True}), "models:/llava@champion").check_uri(uri)


def test_a_server_of_a_local_path_accepts_no_reload_uri_by_default(tmp_path):
    guard = ReloadGuard(_keys(tmp_path, "k1", "k2"), "/models/llava-tiny")
    _refused(lambda: guard.check_uri("/models/other"), 403, "model_uri_not_allowed")
    guard.check_uri(None)  # re-resolving what it serves is always allowed


def test_registered_model_name():
    assert registered_model_name("models:/llava-13b@champion") == "llava-13b"
    assert registered_model_name("models:/llava/3") == "llava"
    assert registered_model_name("runs:/x/model") is None
