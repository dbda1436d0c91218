"""Serving config, the application builder as Serve config files / RayService use it, auth keys and
the CLI's safety checks; none of these need a running cluster."""

from __future__ import annotations

import argparse

import pytest
import yaml

from llava_platform.config import ConfigError
from llava_platform.serving.auth import KeySourceError, check_bearer, load_api_key
from llava_platform.serving.config import Auth, parse_serve_config
from llava_platform.serving.protocol import APIError


def test_import_path_from_a_serve_config_file_builds_the_app():
    from ray.serve._private.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    text = """
    applications:
      - name: llava
        route_prefix: /
        import_path: llava_platform.serving.app:build_app
        args:
          model_uri: models:/llava@champion
          auth: {api_key_env: LLAVA_API_KEY}
          model:
            max_batch_size: 4
            max_ongoing_requests: 8
            max_queued_requests: 16
            resources: {num_cpus: 4, num_gpus: 1}
            autoscaling: {min_replicas: 1, max_replicas: 3, target_ongoing_requests: 4}
    """
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    spec = schema.applications[0]
    app = import_attr(spec.import_path)(spec.args)
    from ray.serve import Application

    assert isinstance(app, Application)
    server = app._bound_deployment  # one deployment: API and model in the same replica
    assert server.init_args[0]["model_uri"] == "models:/llava@champion"
    assert server.ray_actor_options["num_gpus"] == 1 and server.ray_actor_options["num_cpus"] == 4
    assert (server.max_ongoing_requests, server.max_queued_requests) == (8, 16)
    assert server._deployment_config.autoscaling_config.max_replicas == 3
    assert server.backpressure_config.status_code == 503 and server.backpressure_config.retry_after_s >= 1


@pytest.mark.parametrize("args, key", [
    ({}, "model_uri"),
    ({"model_uri": "x", "model": {"max_batch_size": 0}}, "model.max_batch_size"),
    ({"model_uri": "x", "model": {"max_batch_size": 32, "max_ongoing_requests": 8}}, "model"),
    ({"model_uri": "x", "limits": {"max_imagez": 3}}, "limits.max_imagez"),
    ({"model_uri": "x", "model": {"autoscaling": {"min_replicas": 3, "max_replicas": 1}}}, "model.autoscaling"),
])
def test_bad_serve_args_name_the_key(args, key):
    from llava_platform.serving.app import build_app

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_app(args)


def test_embedded_default_has_auth_off_and_loopback_safe_limits():
    cfg = parse_serve_config({"model_uri": "/m"})
    assert not cfg.auth.enabled and not cfg.allow_remote_images
    assert cfg.model.max_queued_requests > 0  # bounded queue, never unbounded


def test_api_key_from_file_or_env_and_constant_time_check(tmp_path, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    key = load_api_key(Auth(api_key_file=str(key_file)))
    check_bearer(key, "Bearer s3cret")
    for bad in (None, "", "Bearer wrong", "Basic s3cret", "s3cret"):
        with pytest.raises(APIError) as err:
            check_bearer(key, bad)
        assert err.value.status == 401 and "s3cret" not in err.value.message
    monkeypatch.setenv("LLAVA_KEY_T", "from-env")
    assert load_api_key(Auth(api_key_env="LLAVA_KEY_T")) == b"from-env"
    assert load_api_key(Auth()) is None
    check_bearer(None, None)  # auth off


def test_auth_on_with_missing_key_refuses_to_start(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAVA_KEY_MISSING", raising=False)
    with pytest.raises(KeySourceError, match="empty"):
        load_api_key(Auth(api_key_env="LLAVA_KEY_MISSING"))
    with pytest.raises(KeySourceError, match="api key file"):
        load_api_key(Auth(api_key_file=str(tmp_path / "nope")))


def _run(argv: list[str]) -> int:
    from llava_platform.commands import serve

    parser = argparse.ArgumentParser(prog="llavactl")
    serve.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_serve_refuses_public_host_without_auth(capsys):
    assert _run(["serve", "--model", "/m", "--host", "0.0.0.0"]) == 2
    assert "without auth" in capsys.readouterr().err


def test_serve_reports_config_errors(tmp_path, capsys):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("model:\n  max_batch_size: -1\n")
    assert _run(["serve", "--model", "/m", "--config", str(cfg)]) == 2
    assert "model.max_batch_size" in capsys.readouterr().err


def test_reload_reports_unreachable_endpoint(capsys):
    assert _run(["serve", "reload", "--address", "http://127.0.0.1:9", "--timeout", "2"]) == 1
    assert "cannot reach" in capsys.readouterr().err
