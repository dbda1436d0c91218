"""resolve_model_dir on every accepted form, against real stores; resolved dirs load with plain transformers."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from llava_platform import registry as reg
from llava_platform.model_uri import COMPLETE_MARKER, ModelURIError, resolve_model_dir


def _loads(model_dir: Path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    assert model.config.model_type == "llava"
    assert processor.tokenizer is not None


def _same_files(a: Path, b: Path) -> None:
    names_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)
    names_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)
    assert names_a == names_b
    for name in names_a:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_local_path_and_bad_references(tiny_llava_dir, tmp_path):
    assert resolve_model_dir(str(tiny_llava_dir)) == Path(tiny_llava_dir)
    assert resolve_model_dir(Path(tiny_llava_dir).as_uri()) == Path(tiny_llava_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelURIError, match="no config.json"):
        resolve_model_dir(tmp_path / "empty")
    with pytest.raises(ModelURIError, match="not a directory"):
        resolve_model_dir(tmp_path / "missing")
    with pytest.raises(ModelURIError, match="unsupported"):
        resolve_model_dir("gs://bucket/model")
    with pytest.raises(ModelURIError, match="models:/<name>"):
        resolve_model_dir("models:/llava/latest", cache_dir=tmp_path)


def test_runs_and_models_uris_on_sqlite(mlflow_sqlite, tiny_llava_dir, tmp_path):
    client = mlflow_sqlite.client()
    run_id = mlflow_sqlite.log_model_dir(Path(tiny_llava_dir))
    cache = tmp_path / "cache"
    first = resolve_model_dir(f"runs:/{run_id}/model", cache, client=client)
    assert first.is_relative_to(cache)
    _same_files(first, Path(tiny_llava_dir))
    _loads(first)
    # a second resolution is a cache hit: the same directory, not a fresh download
    (first / "sentinel").write_text("kept")
    assert resolve_model_dir(f"runs:/{run_id}/model", cache, client=client) == first
    assert (first / "sentinel").exists()

    name = f"llava-{uuid.uuid4().hex[:6]}"
    version = reg.register_version(name, run_id, client=client)
    reg.promote(name, version, force=True, reason="resolution test: no evaluation needed", client=client)
    for uri in (f"models:/{name}@champion", f"models:/{name}/{version}"):
        resolved = resolve_model_dir(uri, cache, client=client)
        _same_files(resolved, Path(tiny_llava_dir))
        # a local artifact store is used in place rather than copied into the cache
        assert not resolved.is_relative_to(cache) and resolved.is_relative_to(mlflow_sqlite.root)
    with pytest.raises(ModelURIError, match="nope"):
        resolve_model_dir(f"models:/{name}@nope", cache, client=client)


def test_models_uri_through_http_server_with_s3(mlflow_server, tiny_llava_dir, tmp_path):
    client = mlflow_server.client()
    run_id = mlflow_server.log_model_dir(Path(tiny_llava_dir))
    name = f"llava-{uuid.uuid4().hex[:6]}"
    version = reg.register_version(name, run_id, client=client)
    assert client.get_model_version(name, version).source.startswith("mlflow-artifacts:")
    cache = tmp_path / "cache"
    resolved = resolve_model_dir(f"models:/{name}@candidate", cache, tracking_uri=mlflow_server.tracking_uri)
    _same_files(resolved, Path(tiny_llava_dir))
    _loads(resolved)
    again = resolve_model_dir(f"models:/{name}/{version}", cache, tracking_uri=mlflow_server.tracking_uri)
    assert again == resolved


def test_s3_prefix_is_cached_by_content(s3_server, tiny_llava_dir, tmp_path):
    from llava_platform import storage

    bucket = f"models-{uuid.uuid4().hex[:8]}"
    storage.default().s3_client().create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/llava/v1"
    storage.upload_dir(tiny_llava_dir, uri)
    cache = tmp_path / "cache"
    first = resolve_model_dir(uri, cache)
    _same_files(first, Path(tiny_llava_dir))
    _loads(first)
    assert resolve_model_dir(uri + "/", cache) == first
    # rewriting an object under the prefix changes the content key: a new download
    config = json.loads((Path(tiny_llava_dir) / "config.json").read_text())
    config["llava_test_marker"] = 1
    storage.write_text(f"{uri}/config.json", json.dumps(config))
    second = resolve_model_dir(uri, cache)
    assert second != first
    assert json.loads((second / "config.json").read_text())["llava_test_marker"] == 1
    with pytest.raises(ModelURIError, match="no objects"):
        resolve_model_dir(f"s3://{bucket}/nothing-here", cache)
