"""Checks a command or job runs on the driver before it starts Ray, and how a failure is reported.

A missing data file found by a Ray Train worker costs minutes and arrives under a page of
traceback; the same check on the driver costs milliseconds. Each `require_*` function raises
`InputError` with a message that starts with what is wrong (`data.records: /x/y.json does not
exist`). `guarded` turns any failure of a command into one line on stderr, cause first, with the
traceback only when asked for (`llavactl --verbose` or LLAVA_VERBOSE=1, which jobs started by
`llavactl` inherit).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

VERBOSE_ENV = "LLAVA_VERBOSE"
# The remote forms a model or checkpoint may take; anything else is a local path or a hub id.
REMOTE_PREFIXES = ("s3://", "runs:/", "models:/", "pipeline:", "http://", "https://")


class InputError(ValueError):
    """An input of a command (file, directory, URI, store) that is missing or unusable."""


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def looks_like_path(value: str) -> bool:
    """A hub id is `org/name`; a local path starts with `.`, `/` or `~`, or has more than one `/`."""
    return value.startswith((".", "/", "~")) or value.count("/") > 1 or os.sep != "/" and os.sep in value


def require_path(uri: str | None, key: str) -> None:
    """`uri` (local path or s3://) exists: a file, a directory, or a prefix holding objects."""
    from llava_platform import storage

    if uri is None:
        return
    try:
        found = storage.exists(uri)
    except storage.StorageError as err:
        raise InputError(f"{key}: {err}") from None
    if not found:
        raise InputError(f"{key}: {uri} does not exist")


def require_model_dir(uri: str | None, key: str, *, tracking_uri: str | None = None) -> None:
    """A model reference that can be loaded: a local llava-hf/HF directory (config.json), an S3 prefix
    holding one, or a registry/run URI that resolves. Hub ids (`org/name`) pass: they are
    downloaded by `from_pretrained` and cannot be checked offline."""
    from llava_platform import storage

    if not uri:
        return
    if uri.startswith("models:/"):
        require_registry_model(uri, key, tracking_uri=tracking_uri)
        return
    if uri.startswith(REMOTE_PREFIXES):
        if storage.is_s3(uri):
            require_path(uri, key)
            # a llava-hf directory (config.json) or an MLflow Model holding one (MLmodel)
            if not any(storage.exists(storage.join(uri, f)) for f in ("config.json", "MLmodel")):
                raise InputError(f"{key}: {uri} is not a model directory (no config.json)")
        return
    if not looks_like_path(uri) and not Path(uri).exists():
        return  # a hub id such as lmsys/vicuna-7b-v1.5
    path = Path(uri).expanduser()
    if not path.is_dir():
        raise InputError(f"{key}: model directory {uri} does not exist")
    if not (path / "config.json").is_file() and not (path / "MLmodel").is_file():
        raise InputError(f"{key}: {uri} is not a model directory (no config.json)")


def require_registry_model(uri: str, key: str, *, tracking_uri: str | None = None) -> None:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` names a version of the registry in use."""
    from llava_platform.model_uri import ModelURIError, resolve_registry_version
    from llava_platform.registry import get_client

    if uri.startswith("models:/m-"):
        return  # an MLflow LoggedModel id, resolved by model_uri
    try:
        resolve_registry_version(get_client(tracking_uri), uri)
    except ModelURIError as err:
        raise InputError(f"{key}: {err}") from None


def require_tracking_store(uri: str) -> None:
    """The MLflow store answers: a sqlite file's directory exists; a server replies within seconds."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise InputError(f"tracking store {uri}: directory {folder} does not exist")
        return
    if uri.startswith(("http://", "https://")):
        import httpx

        try:
            httpx.get(f"{uri.rstrip('/')}/health", timeout=5).raise_for_status()
        except httpx.HTTPError as err:
            raise InputError(f"tracking store {uri} does not answer: {type(err).__name__}: {err}") from None


def require_gpu_reachable(use_gpu: bool, key: str) -> None:
    """`use_gpu` needs a GPU here, or a Ray cluster to join (whose nodes may have them)."""
    if not use_gpu or os.environ.get("RAY_ADDRESS"):
        return
    import torch

    if not torch.cuda.is_available():
        raise InputError(f"{key}=true but this machine has no GPU and RAY_ADDRESS names no cluster; submit the "
                         "job to a GPU cluster (`ray job submit`, `llavactl submit`) or use a CPU config "
                         "(jobs/configs/tiny_*.yaml)")


def one_line(err: BaseException) -> str:
    """An unexpected error on one line, cause first: its type and its message's first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def guarded(prog: str, body: Callable[[], int], input_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a command's body; a failure prints `prog: cause` (traceback only when verbose) and returns
    2 for bad input (InputError, FileNotFoundError, `input_errors`: messages written to be read,
    printed whole) or 1 for anything else (its first line, and how to see the rest)."""
    try:
        return body()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:
        bad_input = isinstance(err, (InputError, FileNotFoundError, *input_errors))
        if verbose():
            traceback.print_exc()
        print(f"{prog}: {str(err).strip() if bad_input else one_line(err)}", file=sys.stderr, flush=True)
        if not verbose() and not bad_input:
            print(f"{prog}: (for the traceback rerun with `llavactl --verbose` or {VERBOSE_ENV}=1)", file=sys.stderr)
        return 2 if bad_input else 1
