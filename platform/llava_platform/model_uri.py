"""Turn any model reference the platform accepts into a local llava-hf directory.

Accepted forms:
- a local directory (or `file://` URI);
- `runs:/<run_id>/<artifact path>`: the run's logged MLflow Model of that name, else its artifacts;
- `models:/<name>@<alias>` or `models:/<name>/<version>`: a registry version (alias resolved first);
- `models:/m-<id>`: an MLflow 3 LoggedModel;
- `s3://bucket/prefix`: objects under a prefix of any S3-compatible store (endpoint and
  credentials as `llava_platform.storage` finds them).

What is found there is either an MLflow Model (an `MLmodel` file, the llava-hf directory at
`artifacts/llava_hf/`, as `llava_platform.logged_model` logs every model now) or a bare llava-hf
directory (how versions were registered before; still resolved). Either way the result is the
llava-hf directory itself.

Remote models are downloaded once into a cache keyed by what identifies their content (run id +
path, registry version's run + source, S3 keys with ETags), so resolving the same thing again does
not download again. A download goes to a temporary directory that is renamed into place only when
complete, so an interrupted download is never mistaken for a cached model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    from mlflow import MlflowClient

# MLflow 3 LoggedModel ids: `models:/m-<hex>` names a logged model, not a registered one.
LOGGED_MODEL_PREFIX = "m-"
# Marker written last into a cache entry; entries without it are incomplete and ignored.
COMPLETE_MARKER = ".llava-complete.json"


class ModelURIError(ValueError):
    """A model reference that cannot be resolved (bad form, missing model, not a model directory)."""


def default_cache_dir() -> Path:
    explicit = os.environ.get("LLAVA_MODEL_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llava" / "models"


def resolve_model_dir(
    uri: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    *,
    tracking_uri: str | None = None,
    client: MlflowClient | None = None,
) -> Path:
    """A local directory holding the llava-hf model `uri` refers to (see module docstring)."""
    text = os.fspath(uri)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if text.startswith("file://"):
        text = urlparse(text).path
    if "://" not in text and not text.startswith(("runs:/", "models:/")):
        return _check_model_dir(Path(text).expanduser(), text)
    if text.startswith("runs:/"):
        run_id, path = split_runs_uri(text)
        mlflow_client = _mlflow_client(client, tracking_uri)
        model_id = _run_logged_model_id(mlflow_client, run_id, path)
        if model_id is not None:
            return _resolve_logged_model(mlflow_client, model_id, cache, text, tracking_uri)
        return _resolve_run_artifacts(mlflow_client, run_id, path, cache, text)
    if text.startswith("models:/") and _is_logged_model_id(model_id := text[len("models:/"):].strip("/")):
        return _resolve_logged_model(_mlflow_client(client, tracking_uri), model_id, cache, text, tracking_uri)
    if text.startswith("models:/"):
        return _resolve_registry(_mlflow_client(client, tracking_uri), text, cache, tracking_uri)
    if text.startswith("s3://"):
        return _resolve_s3(text, cache)
    raise ModelURIError(f"unsupported model URI {text!r}: use a path, runs:/, models:/ or s3://")


def _mlflow_client(client: MlflowClient | None, tracking_uri: str | None) -> MlflowClient:
    if client is not None:
        return client
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


# Where an MLflow Model logged by llava_platform.logged_model keeps the llava-hf files.
MLFLOW_LLAVA_HF_SUBDIR = "artifacts/llava_hf"


def _check_model_dir(path: Path, uri: str) -> Path:
    """The llava-hf directory at `path`: `path` itself, or inside it when `path` is an MLflow Model."""
    if not path.is_dir():
        raise ModelURIError(f"model {uri!r}: {path} is not a directory")
    if (path / "MLmodel").is_file():
        inner = path / MLFLOW_LLAVA_HF_SUBDIR
        if not (inner / "config.json").is_file():
            raise ModelURIError(f"model {uri!r}: {path} is an MLflow Model without a llava-hf directory "
                                f"at {MLFLOW_LLAVA_HF_SUBDIR}/ (not logged by llava_platform)")
        return inner
    if not (path / "config.json").is_file():
        raise ModelURIError(f"model {uri!r}: {path} has no config.json (not a llava-hf model directory)")
    return path


def split_runs_uri(uri: str) -> tuple[str, str]:
    rest = uri[len("runs:/"):].lstrip("/")
    run_id, _, path = rest.partition("/")
    if not run_id:
        raise ModelURIError(f"model URI {uri!r}: expected runs:/<run_id>/<path>")
    return run_id, path.strip("/")


def _cached(cache: Path, key: str, uri: str, fetch: Callable[[Path], Path]) -> Path:
    """Return cache/<key> if complete; otherwise fetch into a temp dir and move it into place.

    `fetch(tmp)` downloads into `tmp` and returns the directory inside it that holds the model.
    """
    target = cache / key
    if (target / COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    try:
        model_dir = _check_model_dir(fetch(tmp), uri)
        (model_dir / COMPLETE_MARKER).write_text(json.dumps({"uri": uri}))
        if target.exists():  # a stale incomplete entry, or a concurrent resolver finished first
            if (target / COMPLETE_MARKER).is_file():
                return target
            shutil.rmtree(target)
        os.replace(model_dir, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def _resolve_run_artifacts(client: MlflowClient, run_id: str, path: str, cache: Path, uri: str) -> Path:
    key = f"runs/{_safe(run_id)}/{_safe(path or '_root')}"

    def fetch(tmp: Path) -> Path:
        from mlflow.exceptions import MlflowException

        try:
            local = client.download_artifacts(run_id, path, str(tmp))
        except MlflowException as exc:
            raise ModelURIError(f"model {uri!r}: cannot download run artifacts: {exc.message}") from None
        return Path(local)

    return _cached(cache, key, uri, fetch)


def _parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, _, alias = rest.partition("@")
        if not name or not alias or "/" in alias:
            raise ModelURIError(f"model URI {uri!r}: expected models:/<name>@<alias>")
        return name, None, alias
    name, _, version = rest.rpartition("/")
    if not name or not version.isdigit():
        raise ModelURIError(f"model URI {uri!r}: expected models:/<name>/<version> or models:/<name>@<alias>")
    return name, version, None


def resolve_registry_version(client: MlflowClient, uri: str):
    """The ModelVersion a models:/ URI names (alias resolved now)."""
    from mlflow.exceptions import MlflowException

    name, version, alias = _parse_models_uri(uri)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as exc:
        raise ModelURIError(f"model URI {uri!r}: {exc.message}") from None


def _is_logged_model_id(rest: str) -> bool:
    return rest.startswith(LOGGED_MODEL_PREFIX) and not any(ch in rest for ch in "/@")


def version_logged_model_id(mv) -> str | None:
    """The LoggedModel a registry version was made from (its source `models:/m-<id>`), if any. The
    open-source stores keep the link only in the source; `mv.model_id` is filled by some others."""
    if getattr(mv, "model_id", None):
        return mv.model_id
    source = mv.source or ""
    rest = source[len("models:/"):].strip("/") if source.startswith("models:/") else ""
    return rest if _is_logged_model_id(rest) else None


def _run_logged_model_id(client: MlflowClient, run_id: str, path: str) -> str | None:
    """The id of the run's READY LoggedModel named `path` (runs:/<id>/model since MLflow 3), if any."""
    from mlflow.exceptions import MlflowException

    if not path or "/" in path:
        return None
    try:
        experiment_id = client.get_run(run_id).info.experiment_id
        found = client.search_logged_models(
            experiment_ids=[experiment_id], filter_string=f"name = '{path}' AND source_run_id = '{run_id}'",
            order_by=[{"field_name": "creation_time", "ascending": False}])
    except MlflowException:
        return None  # no such run here: the artifact download names the problem
    ready = [m for m in found if str(m.status).endswith("READY")]
    return ready[0].model_id if ready else None


def _resolve_logged_model(client: MlflowClient, model_id: str, cache: Path, uri: str,
                          tracking_uri: str | None) -> Path:
    """A LoggedModel's llava-hf directory: in place on a local artifact store, else downloaded once
    (a LoggedModel's artifacts never change, so its id is the cache key)."""
    from mlflow.exceptions import MlflowException

    try:
        location = client.get_logged_model(model_id).artifact_location
    except MlflowException as exc:
        raise ModelURIError(f"model {uri!r}: {exc.message}") from None
    local = Path(urlparse(location).path) if location.startswith("file://") else Path(location)
    if "://" not in location.replace("file://", "", 1) and local.is_dir():
        return _check_model_dir(local, uri)

    def fetch(tmp: Path) -> Path:
        import mlflow.artifacts

        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_id}", dst_path=str(tmp),
                                                        tracking_uri=tracking_uri))

    return _cached(cache, f"logged/{_safe(model_id)}", uri, fetch)


def _resolve_registry(client: MlflowClient, uri: str, cache: Path, tracking_uri: str | None) -> Path:
    mv = resolve_registry_version(client, uri)
    source = mv.source
    model_id = version_logged_model_id(mv)
    if model_id is not None:
        return _resolve_logged_model(client, model_id, cache, uri, tracking_uri)
    # The key names the immutable version and its source, not the alias: moving an alias to a new
    # version resolves to a new entry, while resolving the same version again is a cache hit.
    digest = hashlib.sha256(f"{mv.run_id}|{source}".encode()).hexdigest()[:12]
    key = f"models/{_safe(mv.name)}/v{mv.version}-{digest}"
    local = Path(urlparse(source).path) if source.startswith("file://") else Path(source)
    if "://" not in source.replace("file://", "", 1) and not source.startswith(("runs:/", "models:/")) \
            and local.is_dir():
        return _check_model_dir(local, uri)  # local artifact store: use it in place, no copy

    def fetch(tmp: Path) -> Path:
        run_path = _path_inside_run(client, mv.run_id, source)
        if run_path is not None:
            return Path(client.download_artifacts(mv.run_id, run_path, str(tmp)))
        if source.startswith("s3://"):
            return _download_s3(source, tmp)
        import mlflow.artifacts

        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp),
                                                        tracking_uri=tracking_uri))

    return _cached(cache, key, uri, fetch)


def _path_inside_run(client: MlflowClient, run_id: str | None, source: str) -> str | None:
    """The artifact path of `source` relative to its run's artifact root, when it lies inside it."""
    if source.startswith("runs:/"):
        return split_runs_uri(source)[1]
    if not run_id:
        return None
    root = client.get_run(run_id).info.artifact_uri.rstrip("/")
    if source.rstrip("/") == root:
        return ""
    if source.startswith(root + "/"):
        return source[len(root) + 1:].strip("/")
    return None


# --------------------------------------------------------------------------- S3


def _s3_client():
    from llava_platform import storage

    return storage.default().s3_client()


def _split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise ModelURIError(f"model URI {uri!r}: expected s3://bucket/prefix")
    return parsed.netloc, parsed.path.strip("/")


def _list_s3(client, bucket: str, prefix: str) -> list[dict]:
    objects: list[dict] = []
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
        objects.extend(page.get("Contents", []))
    return objects


def _download_s3(uri: str, dest: Path) -> Path:
    from llava_platform import storage

    out = dest / "model"
    if storage.download_dir(uri, out) == 0:
        raise ModelURIError(f"model {uri!r}: no objects under that prefix")
    return out


def _resolve_s3(uri: str, cache: Path) -> Path:
    client = _s3_client()
    bucket, prefix = _split_s3(uri)
    objects = _list_s3(client, bucket, prefix)
    if not objects:
        raise ModelURIError(f"model {uri!r}: no objects under that prefix")
    # Content key: the listing's keys, sizes and ETags, so a rewritten prefix is downloaded afresh.
    listing = sorted((o["Key"], o.get("Size", 0), o.get("ETag", "")) for o in objects)
    digest = hashlib.sha256(json.dumps([bucket, prefix, listing]).encode()).hexdigest()[:16]
    key = f"s3/{_safe(bucket)}/{digest}"
    return _cached(cache, key, uri, lambda tmp: _download_s3(uri, tmp))
