"""Storage: the same operations behave the same on a local directory and on S3 (moto server)."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llava_platform import storage
from llava_platform.storage import Storage, StorageError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/prefix"


def test_roundtrip_list_exists_delete(root):
    storage.write_text(storage.join(root, "a.txt"), "hello")
    storage.write_bytes(storage.join(root, "sub/b.bin"), b"\x00\x01")
    storage.write_bytes(storage.join(root, "sub/deeper/c.bin"), b"c")
    assert storage.read_text(storage.join(root, "a.txt")) == "hello"
    assert storage.read_bytes(storage.join(root, "sub/b.bin")) == b"\x00\x01"
    listed = storage.list_files(root)
    assert [u[len(root):] for u in listed] == ["/a.txt", "/sub/b.bin", "/sub/deeper/c.bin"]
    assert storage.exists(storage.join(root, "a.txt"))
    assert storage.exists(storage.join(root, "sub"))  # a directory / prefix with objects
    assert not storage.exists(storage.join(root, "missing.txt"))
    storage.write_text(storage.join(root, "a.txt"), "replaced")
    assert storage.read_text(storage.join(root, "a.txt")) == "replaced"
    assert storage.delete(storage.join(root, "sub"), recursive=True) == 2
    assert [u[len(root):] for u in storage.list_files(root)] == ["/a.txt"]


def test_missing_object_error_names_uri(root):
    target = storage.join(root, "nope.json")
    with pytest.raises(StorageError, match="nope.json"):
        storage.read_bytes(target)


def test_upload_and_download_directory(root, tmp_path):
    src = tmp_path / "src"
    (src / "x" / "y").mkdir(parents=True)
    (src / "top.txt").write_text("top")
    (src / "x" / "y" / "leaf.bin").write_bytes(os.urandom(300_000))
    assert storage.upload_dir(src, storage.join(root, "ckpt")) == 2
    dest = tmp_path / "dest"
    assert storage.download_dir(storage.join(root, "ckpt"), dest) == 2
    assert (dest / "top.txt").read_text() == "top"
    assert (dest / "x" / "y" / "leaf.bin").read_bytes() == (src / "x" / "y" / "leaf.bin").read_bytes()


def test_pyarrow_filesystem_reads_what_storage_wrote(root):
    table = pa.table({"id": ["a", "b"], "n": [1, 2]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(storage.join(root, "t.parquet"), sink.getvalue().to_pybytes())
    fs, path = storage.pyarrow_filesystem(storage.join(root, "t.parquet"))
    assert pq.read_table(path, filesystem=fs).equals(table)
    # and the other way round: pyarrow writes, storage reads
    fs, path = storage.pyarrow_filesystem(storage.join(root, "u.parquet"))
    if not storage.is_s3(root):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(pa.BufferReader(storage.read_bytes(storage.join(root, "u.parquet")))).equals(table)


def test_local_writes_are_atomic_and_leave_no_temporaries(tmp_path):
    target = tmp_path / "d" / "file.json"
    storage.write_text(target, "one")
    storage.write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]


def test_explicit_endpoint_overrides_environment(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    explicit = Storage(endpoint_url=s3_server)
    explicit.write_text(f"s3://{s3_bucket}/k.txt", "via explicit endpoint")
    assert explicit.read_text(f"s3://{s3_bucket}/k.txt") == "via explicit endpoint"
    assert Storage.from_env().endpoint_url == "http://127.0.0.1:9"


def test_unknown_bucket_is_a_clear_error(s3_server):
    with pytest.raises(StorageError, match="no-such-bucket"):
        storage.write_text("s3://no-such-bucket/x.txt", "x")


def test_uri_helpers():
    assert storage.split_s3("s3://b/a/c.txt") == ("b", "a/c.txt")
    assert storage.join("s3://b/p/", "x", "/y.txt") == "s3://b/p/x/y.txt"
    with pytest.raises(StorageError, match="no bucket"):
        storage.split_s3("s3:///key")


def _deny(s3_bucket: str, actions: list[str], prefix: str) -> None:
    """A bucket policy that denies `actions` on `prefix/*` to everyone (as a retention rule would)."""
    import json

    import boto3

    policy = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Deny", "Principal": "*", "Action": actions, "Resource": f"arn:aws:s3:::{s3_bucket}/{prefix}/*"}]}
    boto3.client("s3").put_bucket_policy(Bucket=s3_bucket, Policy=json.dumps(policy))


def test_s3_delete_that_leaves_objects_behind_raises_naming_them(s3_bucket):
    root = f"s3://{s3_bucket}/shards"
    for name in ("keep/a.parquet", "keep/b.parquet", "free/c.parquet"):
        storage.write_text(f"{root}/{name}", "x")
    _deny(s3_bucket, ["s3:DeleteObject"], "shards/keep")
    with pytest.raises(StorageError, match="cannot delete 2 of 3") as err:
        storage.delete(root, recursive=True)
    assert "shards/keep/a.parquet" in str(err.value) and "AccessDenied" in str(err.value)
    # what could be deleted is gone; the stale shards are still there, and now known to be
    assert storage.list_files(root) == [f"{root}/keep/a.parquet", f"{root}/keep/b.parquet"]


def test_s3_exists_tells_forbidden_from_missing(s3_bucket):
    storage.write_text(f"s3://{s3_bucket}/secret/manifest.json", "{}")
    # moto names the action of a HEAD request s3:HeadObject (AWS checks s3:GetObject)
    _deny(s3_bucket, ["s3:GetObject", "s3:HeadObject"], "secret")
    with pytest.raises(StorageError, match="secret/manifest.json") as err:
        storage.exists(f"s3://{s3_bucket}/secret/manifest.json")
    assert "403" in str(err.value) or "Forbidden" in str(err.value)
    assert not storage.exists(f"s3://{s3_bucket}/public/missing.json")  # a 404 is still "missing"
