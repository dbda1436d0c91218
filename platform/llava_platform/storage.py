"""One way to address data, checkpoints and artifacts: a local path or `s3://bucket/prefix`.

Local paths (plain or `file://`) go through the filesystem; `s3://` through boto3 for objects and
`pyarrow.fs.S3FileSystem` for datasets (Ray Data). Credentials come from the standard AWS variables
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` /
`AWS_DEFAULT_REGION`, or any source boto3 knows); the endpoint for MinIO or another S3-compatible
store from `AWS_ENDPOINT_URL_S3`, then `AWS_ENDPOINT_URL`, or an explicit `endpoint_url`.

Writes are atomic: local files are written to a temporary sibling and renamed into place, S3
objects with a single PUT, so a reader never sees half an object.

Module-level functions use a `Storage` built from the environment at call time, so a changed
endpoint variable (tests, `llavactl` flags) takes effect without restarting anything.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

S3_SCHEME = "s3://"


class StorageError(RuntimeError):
    """A storage operation that failed; the message names the URI."""


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    if not is_s3(uri):
        raise StorageError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} has no bucket name")
    return bucket, key


def local_path(uri: str | os.PathLike) -> Path:
    text = str(uri)
    if text.startswith("file://"):
        text = urlparse(text).path
    return Path(text)


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or S3 URI with `/`."""
    text = str(uri)
    for part in parts:
        part = str(part).strip("/")
        if not part:
            continue
        text = f"{text.rstrip('/')}/{part}" if text else part
    return text


def endpoint_from_env() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def region_from_env() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


_CLIENTS: dict[tuple, Any] = {}
_CLIENTS_LOCK = threading.Lock()


@dataclass(frozen=True)
class Storage:
    """Storage operations against one S3 endpoint (None: AWS or the environment's endpoint)."""

    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def from_env(cls, endpoint_url: str | None = None) -> Storage:
        return cls(endpoint_url=endpoint_url or endpoint_from_env(), region=region_from_env())

    # -- clients ------------------------------------------------------------------------------
    def s3_client(self) -> Any:
        """A cached boto3 S3 client; the cache key includes the credentials so rotation is seen."""
        import boto3
        from botocore.config import Config

        key = (self.endpoint_url, self.region, os.environ.get("AWS_ACCESS_KEY_ID"),
               os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("AWS_SESSION_TOKEN"))
        with _CLIENTS_LOCK:
            client = _CLIENTS.get(key)
            if client is None:
                config = Config(retries={"max_attempts": 5, "mode": "standard"},
                                s3={"addressing_style": "path"} if self.endpoint_url else {})
                session = boto3.session.Session()
                client = session.client("s3", endpoint_url=self.endpoint_url,
                                        region_name=self.region or region_from_env(), config=config)
                _CLIENTS[key] = client
            return client

    def pyarrow_filesystem(self, uri: str | os.PathLike) -> tuple[Any, str]:
        """(pyarrow filesystem, path inside it) for Ray Data / pyarrow.dataset."""
        import pyarrow.fs as pafs

        if not is_s3(uri):
            return pafs.LocalFileSystem(), str(local_path(uri).absolute())
        bucket, key = split_s3(str(uri))
        kwargs: dict[str, Any] = {"region": self.region or region_from_env()}
        access, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if access and secret:
            kwargs.update(access_key=access, secret_key=secret,
                          session_token=os.environ.get("AWS_SESSION_TOKEN"))
        if self.endpoint_url:
            parsed = urlparse(self.endpoint_url)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
        return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")

    # -- single objects -----------------------------------------------------------------------
    def read_bytes(self, uri: str | os.PathLike) -> bytes:
        if not is_s3(uri):
            try:
                return local_path(uri).read_bytes()
            except OSError as err:
                raise StorageError(f"cannot read {uri}: {err.strerror or err}") from err
        bucket, key = split_s3(str(uri))
        try:
            return self.s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as err:
            raise StorageError(f"cannot read {uri}: {_s3_reason(err)}") from err

    def read_text(self, uri: str | os.PathLike, encoding: str = "utf-8") -> str:
        return self.read_bytes(uri).decode(encoding)

    def write_bytes(self, uri: str | os.PathLike, data: bytes) -> None:
        if not is_s3(uri):
            _atomic_local_write(local_path(uri), data)
            return
        bucket, key = split_s3(str(uri))
        try:
            self.s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as err:
            raise StorageError(f"cannot write {uri}: {_s3_reason(err)}") from err

    def write_text(self, uri: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(uri, text.encode(encoding))

    def exists(self, uri: str | os.PathLike) -> bool:
        """True for an existing file/object, or a directory/prefix holding at least one object.

        Only a 404 means "missing": a 403 (S3 answers it for a missing object too when the caller
        may not list the bucket) or an unreachable endpoint raises, since neither says anything
        about the object and treating them as absent would, e.g., report data as never written."""
        if not is_s3(uri):
            return local_path(uri).exists()
        bucket, key = split_s3(str(uri))
        client = self.s3_client()
        if key:
            try:
                client.head_object(Bucket=bucket, Key=key)
                return True
            except Exception as err:
                if _s3_status(err) != 404:
                    raise StorageError(f"cannot check {uri}: {_s3_reason(err)}") from err
        prefix = key.rstrip("/") + "/" if key else ""
        try:
            listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        except Exception as err:
            if _s3_status(err) == 404:
                return False
            raise StorageError(f"cannot check {uri}: {_s3_reason(err)}") from err
        return listed.get("KeyCount", 0) > 0

    def delete(self, uri: str | os.PathLike, *, recursive: bool = False) -> int:
        """Delete a file/object (or everything under a prefix when `recursive`); returns the count."""
        if not is_s3(uri):
            path = local_path(uri)
            if path.is_dir():
                if not recursive:
                    raise StorageError(f"{uri} is a directory; pass recursive=True")
                import shutil

                count = sum(1 for p in path.rglob("*") if p.is_file())
                shutil.rmtree(path)
                return count
            if path.exists():
                path.unlink()
                return 1
            return 0
        bucket, key = split_s3(str(uri))
        keys = [split_s3(u)[1] for u in self.list(uri)] if recursive else [key]
        client = self.s3_client()
        failed: list[str] = []
        for start in range(0, len(keys), 1000):
            chunk = keys[start:start + 1000]
            try:
                # Quiet: the response lists only the keys that were NOT deleted (HTTP 200 all the same)
                answer = client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk],
                                                                       "Quiet": True})
            except Exception as err:
                raise StorageError(f"cannot delete {len(chunk)} object(s) under {uri} (first "
                                   f"s3://{bucket}/{chunk[0]}): {_s3_reason(err)}") from err
            failed += [f"s3://{bucket}/{e.get('Key')} ({e.get('Code')}: {e.get('Message')})"
                       for e in answer.get("Errors", [])]
        if failed:
            shown = "; ".join(failed[:5]) + (f"; and {len(failed) - 5} more" if len(failed) > 5 else "")
            raise StorageError(f"cannot delete {len(failed)} of {len(keys)} object(s) under {uri}: {shown}")
        return len(keys)

    # -- many objects -------------------------------------------------------------------------
    def list(self, uri: str | os.PathLike) -> list[str]:
        """Every file under a directory / prefix, recursively, as full URIs, sorted."""
        if not is_s3(uri):
            root = local_path(uri)
            if root.is_file():
                return [str(root)]
            return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        bucket, key = split_s3(str(uri))
        prefix = key.rstrip("/") + "/" if key else ""
        out: list[str] = []
        try:
            pages = self.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for page in pages:
                out.extend(f"{S3_SCHEME}{bucket}/{obj['Key']}" for obj in page.get("Contents", []))
        except Exception as err:
            raise StorageError(f"cannot list {uri}: {_s3_reason(err)}") from err
        return sorted(out)

    def upload_dir(self, local_dir: str | os.PathLike, uri: str) -> int:
        """Copy a local directory tree to `uri` (local or S3); returns the number of files."""
        root = Path(local_dir)
        if not root.is_dir():
            raise StorageError(f"cannot upload {local_dir}: not a directory")
        files = sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            target = join(uri, path.relative_to(root).as_posix())
            if is_s3(target):
                bucket, key = split_s3(target)
                try:
                    self.s3_client().upload_file(str(path), bucket, key)
                except Exception as err:
                    raise StorageError(f"cannot upload {path} to {target}: {_s3_reason(err)}") from err
            else:
                _atomic_local_write(local_path(target), path.read_bytes())
        return len(files)

    def download_dir(self, uri: str, local_dir: str | os.PathLike) -> int:
        """Copy everything under `uri` into a local directory; returns the number of files."""
        root = Path(local_dir)
        base = str(uri).rstrip("/")
        files = self.list(uri)
        for src in files:
            rel = src[len(base):].lstrip("/") if is_s3(base) else str(Path(src).relative_to(local_path(base)))
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if is_s3(src):
                bucket, key = split_s3(src)
                try:
                    self.s3_client().download_file(bucket, key, str(dest))
                except Exception as err:
                    raise StorageError(f"cannot download {src}: {_s3_reason(err)}") from err
            else:
                _atomic_local_write(dest, Path(src).read_bytes())
        return len(files)


def _atomic_local_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _s3_status(err: Exception) -> int | None:
    response = getattr(err, "response", None) or {}
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _s3_reason(err: Exception) -> str:
    response = getattr(err, "response", None)
    if response and "Error" in response:
        return f"{response['Error'].get('Code')}: {response['Error'].get('Message')}"
    return f"{type(err).__name__}: {err}"


# -- module-level shortcuts (environment endpoint) -------------------------------------------
def default() -> Storage:
    return Storage.from_env()


def read_bytes(uri: str | os.PathLike) -> bytes:
    return default().read_bytes(uri)


def read_text(uri: str | os.PathLike) -> str:
    return default().read_text(uri)


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    default().write_bytes(uri, data)


def write_text(uri: str | os.PathLike, text: str) -> None:
    default().write_text(uri, text)


def exists(uri: str | os.PathLike) -> bool:
    return default().exists(uri)


def list_files(uri: str | os.PathLike) -> list[str]:
    return default().list(uri)


def delete(uri: str | os.PathLike, *, recursive: bool = False) -> int:
    return default().delete(uri, recursive=recursive)


def upload_dir(local_dir: str | os.PathLike, uri: str) -> int:
    return default().upload_dir(local_dir, uri)


def download_dir(uri: str, local_dir: str | os.PathLike) -> int:
    return default().download_dir(uri, local_dir)


def pyarrow_filesystem(uri: str | os.PathLike) -> tuple[Any, str]:
    return default().pyarrow_filesystem(uri)
