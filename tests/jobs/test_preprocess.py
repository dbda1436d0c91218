"""jobs.preprocess on real Ray Data: every broken record ends in rejects/ with its reason, every
good record in the shards, over S3 (moto) and local disk, and a re-run writes the same bytes."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.preprocess import SHARD_SCHEMA, main
from llava.data.synthetic import write_shapes_dataset
from llava_platform import storage


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def build_mixed_dataset(root: Path) -> tuple[list[dict | str], set[str], dict[str, str]]:
    """Synthetic records plus one of every kind of broken record.

    Returns (JSONL lines, ids expected in the output, {id: expected reject reason code})."""
    shapes = write_shapes_dataset(root, 8, seed=1, n_eval=0)
    good = json.loads(shapes.stage2.read_text())[:12]
    images = root / "images"
    good_png = (images / "shapes_000000.png").read_bytes()
    (images / "corrupt.png").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(600)))
    (images / "truncated.png").write_bytes(_png(Image.effect_noise((64, 64), 60).convert("RGB"))[:700])
    (images / "empty.png").write_bytes(b"")
    (images / "huge.png").write_bytes(_png(Image.new("RGB", (120, 120), (9, 9, 9))))
    (images / "cmyk.jpg").write_bytes(_png(Image.new("CMYK", (40, 64), (0, 200, 0, 0)), "JPEG"))
    (images / "gray.png").write_bytes(_png(Image.new("L", (64, 30), 128)))
    assert good_png

    def img(rid: str, name: str) -> dict:
        return {"id": rid, "image": f"images/{name}", "conversations": _turns("<image>\nWhat is shown?", "Shapes.")}

    good += [img("mode-cmyk", "cmyk.jpg"), img("mode-gray", "gray.png"),
             {"id": "text-only", "conversations": _turns("What is two plus two?", "Four.")}]
    bad = {
        "img-corrupt": (img("img-corrupt", "corrupt.png"), "image_corrupt"),
        "img-truncated": (img("img-truncated", "truncated.png"), "image_corrupt"),
        "img-empty": (img("img-empty", "empty.png"), "image_empty"),
        "img-missing": (img("img-missing", "nowhere.png"), "image_missing"),
        "img-huge": (img("img-huge", "huge.png"), "image_too_large"),
        "img-escape": (img("img-escape", "../../etc/passwd"), "image_path"),
        "no-conversations": ({"id": "no-conversations", "image": "images/shapes_000000.png"}, "schema"),
        "bad-role": ({"id": "bad-role", "conversations": [{"from": "robot", "value": "hi"}]}, "schema"),
        "two-placeholders": ({"id": "two-placeholders", "image": "images/shapes_000001.png",
                              "conversations": _turns("<image>\n<image>\nWhat?", "Shapes.")}, "placeholder_mismatch"),
        "image-no-placeholder": ({"id": "image-no-placeholder", "image": "images/shapes_000001.png",
                                  "conversations": _turns("What?", "Shapes.")}, "placeholder_mismatch"),
        "too-long": ({"id": "too-long", "conversations": _turns("Tell me a story.", "and then " * 400)}, "too_long"),
        good[0]["id"]: (dict(good[0]), "duplicate_id"),
    }
    lines: list[dict | str] = [*good, *(rec for rec, _ in bad.values()), "{this is not json"]
    random.Random(5).shuffle(lines)
    reasons = {rid: code for rid, (_, code) in bad.items()}
    reasons["<bad-json>"] = "bad_json"
    return lines, {r["id"] for r in good}, reasons


def _read_shards(out: str) -> pa.Table:
    tables = []
    for uri in storage.list_files(storage.join(out, "shards")):
        tables.append(pq.read_table(pa.BufferReader(storage.read_bytes(uri))))
    return pa.concat_tables(tables)


def _read_rejects(out: str) -> list[dict]:
    return [json.loads(line) for uri in storage.list_files(storage.join(out, "rejects"))
            for line in storage.read_text(uri).splitlines()]


def _args(out: str, inp: str, processor: Path | str, *extra: str) -> list[str]:
    return ["--config", "jobs/configs/preprocess_stage2.yaml", f"input={inp}", f"output={out}",
            f"processor={processor}", "max_length=256", "images.max_pixels=10000", "rows_per_shard=5", "row_group_rows=2",
            "batch_size=4", "num_workers=1", "max_reject_fraction=0.6", *extra]


def _check_output(out: str, good_ids: set[str], reasons: dict[str, str], duplicate: str,
                  size: tuple[int, int]) -> dict:
    table = _read_shards(out)
    assert table.schema.equals(SHARD_SCHEMA)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(good_ids), "every good record exactly once"
    for row in table.to_pylist():
        assert len(row["labels"]) == len(row["input_ids"]) == row["length"]
        assert any(label != -100 for label in row["labels"])
        assert row["num_images"] == len(row["images"]) == (0 if row["modality"] == "text" else 1)
        for blob in row["images"]:
            image = Image.open(io.BytesIO(blob))
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == size
    assert {r["modality"] for r in table.to_pylist()} == {"image", "text"}
    rejects = _read_rejects(out)
    got = {}
    for rej in rejects:
        key = "<bad-json>" if rej["reason"].startswith("bad_json") else rej["id"]
        got[key] = rej["reason"].split(":", 1)[0]
        assert ":" in rej["reason"] and rej["record"] is not None
    assert got == reasons
    dup = next(r for r in rejects if r["reason"].startswith("duplicate_id"))
    assert dup["id"] == duplicate
    manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    assert manifest["counts"] == {"input": len(good_ids) + len(reasons), "written": len(good_ids),
                                  "rejected": len(reasons)}
    expected_reasons: dict[str, int] = {}
    for code in reasons.values():
        expected_reasons[code] = expected_reasons.get(code, 0) + 1
    assert manifest["rejects_by_reason"] == expected_reasons
    assert [s["rows"] for s in manifest["shards"]] == [5] * (len(good_ids) // 5) + ([len(good_ids) % 5] if len(good_ids) % 5 else [])
    _check_index(out, manifest, table)
    return manifest


def _check_index(out: str, manifest: dict, table: pa.Table) -> None:
    """The index addresses every written row: reading shard/row group/row gives back that sample."""
    index = pq.read_table(pa.BufferReader(storage.read_bytes(storage.join(out, manifest["index"]["path"]))))
    assert index.column("id").to_pylist() == sorted(table.column("id").to_pylist())
    assert manifest["dataset"]["template"] == "vicuna_v1" and manifest["dataset"]["image_tokens_per_image"] > 0
    for entry in index.to_pylist():
        shard = pq.ParquetFile(pa.BufferReader(storage.read_bytes(
            storage.join(out, manifest["shards"][entry["shard"]]["path"]))))
        assert shard.metadata.row_group(entry["row_group"]).num_rows <= manifest["row_group_rows"]
        row = shard.read_row_group(entry["row_group"]).slice(entry["row"], 1).to_pylist()[0]
        assert (row["id"], row["length"], row["modality"], row["num_images"]) == (
            entry["id"], entry["length"], entry["modality"], entry["n_images"])


def test_mixed_dataset_over_s3_twice(ray_local, tiny_llava_dir, tiny_processor, s3_bucket, tmp_path, capsys):
    lines, good_ids, reasons = build_mixed_dataset(tmp_path / "data")
    (tmp_path / "data" / "records.jsonl").write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    storage.upload_dir(tmp_path / "data", f"s3://{s3_bucket}/raw")
    storage.upload_dir(tiny_llava_dir, f"s3://{s3_bucket}/models/base")  # the processor comes from S3 too
    out = f"s3://{s3_bucket}/processed"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = _args(out, f"s3://{s3_bucket}/raw/records.jsonl", f"s3://{s3_bucket}/models/base",
                 f"mlflow.tracking_uri={tracking}")
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "rejected image_corrupt: 2" in printed and "rejected bad_json: 1" in printed
    duplicate = next(rid for rid, code in reasons.items() if code == "duplicate_id")
    from llava.data.images import target_size

    manifest = _check_output(out, good_ids, reasons, duplicate, target_size(tiny_processor.image_processor))
    for shard in manifest["shards"]:
        import hashlib

        assert hashlib.sha256(storage.read_bytes(storage.join(out, shard["path"]))).hexdigest() == shard["sha256"]

    before = {u: storage.read_bytes(u) for u in storage.list_files(out)}
    assert main(args) == 0  # second run: same names, same bytes, nothing added
    after = {u: storage.read_bytes(u) for u in storage.list_files(out)}
    assert after == before

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    runs = client.search_runs([client.get_experiment_by_name("preprocess").experiment_id])
    assert len(runs) == 2
    assert runs[0].data.metrics["rejects.image_corrupt"] == 2
    assert runs[0].data.metrics["count.written"] == len(good_ids)


def test_local_json_list_reject_limit_and_mode_policy(ray_local, tiny_llava_dir, tmp_path, capsys):
    lines, good_ids, reasons = build_mixed_dataset(tmp_path / "data")
    records = [line for line in lines if not isinstance(line, str)]
    (tmp_path / "data" / "records.json").write_text(json.dumps(records))
    out = tmp_path / "out"
    # a stale shard from an earlier, bigger run must disappear: overwrite, not append
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "shard-00099.parquet").write_bytes(b"old")
    args = _args(str(out), str(tmp_path / "data" / "records.json"), tiny_llava_dir, "images.mode_policy=reject")
    assert main(args) == 0
    table = _read_shards(str(out))
    ids = set(table.column("id").to_pylist())
    assert ids == good_ids - {"mode-cmyk"}
    assert not (out / "shards" / "shard-00099.parquet").exists()
    got = {r["id"]: r["reason"].split(":")[0] for r in _read_rejects(str(out))}
    assert got["mode-cmyk"] == "image_mode"

    # the job fails, and leaves no manifest, when the reject fraction passes the limit
    assert main([*args, "max_reject_fraction=0.2"]) == 1
    assert "exceeds max_reject_fraction" in capsys.readouterr().err
    assert not (out / "manifest.json").exists()
    assert len(_read_rejects(str(out))) == len(reasons) - 1 + 1  # bad JSON line absent from a JSON list


def test_parquet_input_with_inline_image_bytes(ray_local, tiny_llava_dir, tmp_path):
    shapes = write_shapes_dataset(tmp_path / "shapes", 4, seed=2, n_eval=0)
    records = json.loads(shapes.stage1.read_text())
    rows = [{"id": r["id"], "conversations": json.dumps(r["conversations"]),
             "images": [(shapes.root / r["image"]).read_bytes()]} for r in records]
    rows.append({"id": "broken-bytes", "conversations": json.dumps(records[0]["conversations"]),
                 "images": [b"\x89PNG\r\n\x1a\nnot really"]})
    rows.append({"id": "text", "conversations": json.dumps(_turns("Say hi.", "Hi.")), "images": []})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "input.parquet")
    out = tmp_path / "out"
    args = ["--config", "jobs/configs/preprocess_stage1.yaml", f"input={tmp_path / 'input.parquet'}",
            f"output={out}", f"processor={tiny_llava_dir}", "num_workers=1", "max_reject_fraction=0.5"]
    assert main(args) == 0
    table = _read_shards(str(out))
    assert sorted(table.column("id").to_pylist()) == sorted([r["id"] for r in records] + ["text"])
    rejects = _read_rejects(str(out))
    assert [(r["id"], r["reason"].split(":")[0]) for r in rejects] == [("broken-bytes", "image_corrupt")]
    assert rejects[0]["record"]["image_bytes_lengths"] == [len(b"\x89PNG\r\n\x1a\nnot really")]


def test_config_errors_name_the_key(tmp_path, capsys):
    assert main(["--config", "jobs/configs/preprocess_stage2.yaml", "images.max_pixel=5"]) == 2
    assert "images.max_pixel: unknown key" in capsys.readouterr().err
    assert main(["--config", "jobs/configs/preprocess_stage2.yaml", "template=alpaca"]) == 2
    assert "template" in capsys.readouterr().err


@pytest.mark.parametrize("config", sorted(Path("jobs/configs").glob("preprocess_*.yaml")))
def test_shipped_configs_load(config):
    from jobs.preprocess import PreprocessConfig
    from llava_platform.config import load_config

    cfg = load_config(PreprocessConfig, config)
    assert cfg.template in ("plain", "vicuna_v1")


def test_llavactl_data_synth_and_preprocess_over_s3(ray_local, tiny_llava_dir, s3_bucket, monkeypatch):
    """The CLI path: `llavactl data synth` to S3, then `llavactl data preprocess` from S3 to S3 (the
    job runs in a child process, as `ray job submit` would run it, attached to the test's Ray)."""
    import argparse

    from llava_platform.commands import data

    parser = argparse.ArgumentParser(prog="llavactl")
    data.register(parser.add_subparsers(dest="command", required=True))

    def cli(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return args.func(args)

    monkeypatch.setenv("RAY_ADDRESS", ray_local.get_runtime_context().gcs_address)
    root = f"s3://{s3_bucket}/shapes"
    assert cli("data", "synth", "--output", root, "--n", "6", "--n-eval", "2") == 0
    assert storage.exists(f"{root}/images/shapes_000005.png") and storage.exists(f"{root}/eval/shapes_qa.jsonl")
    out = f"s3://{s3_bucket}/processed"
    assert cli("data", "preprocess", "--input", f"{root}/stage1.json", "--output", out,
               "--processor", str(tiny_llava_dir), "--template", "plain", "--max-reject-fraction", "0", "num_workers=1") == 0
    manifest = json.loads(storage.read_text(f"{out}/manifest.json"))
    assert manifest["counts"] == {"input": 6, "written": 6, "rejected": 0}
    assert manifest["config"]["template"] == "plain" and manifest["modality"] == {"image": 6}
    assert cli("data", "preprocess", "--input", f"{root}/missing.json", "--output", out,
               "--processor", str(tiny_llava_dir)) == 2


def _shards_in_order(out: str) -> list[str]:
    manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    return [i for s in manifest["shards"]
            for i in pq.read_table(pa.BufferReader(storage.read_bytes(storage.join(out, s["path"])))).column("id").to_pylist()]


def test_folder_of_json_and_jsonl_shards_in_name_order_with_ids_unique_across_shards(ray_local, tiny_llava_dir,
                                                                                   tmp_path):
    shapes = write_shapes_dataset(tmp_path / "raw", 6, seed=3, n_eval=0)
    records = json.loads(shapes.stage1.read_text())
    (tmp_path / "raw" / "b-part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[3:]))
    (tmp_path / "raw" / "a-part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:3]))
    (tmp_path / "raw" / "sub").mkdir()
    # images resolve from the deepest folder holding every input file: raw/, not raw/sub/
    (tmp_path / "raw" / "sub" / "c-part.json").write_text(json.dumps([records[5]]))
    for name in ("stage1.json", "stage2.json", "captions.jsonl"):
        (tmp_path / "raw" / name).unlink()  # the folder holds only the shards under test
    out = tmp_path / "out"
    assert main(["--config", "jobs/configs/preprocess_stage1.yaml", f"input={tmp_path / 'raw'}", f"output={out}",
                 f"processor={tiny_llava_dir}", "num_workers=1", "max_reject_fraction=0.5"]) == 0
    assert _shards_in_order(str(out)) == [r["id"] for r in records]  # a-part, then b-part
    assert [(r["id"], r["reason"]) for r in _read_rejects(str(out))] == [
        (records[5]["id"], f"duplicate_id: {records[5]['id']} already written")]


def test_input_lists_keep_their_order_and_bad_inputs_are_named(tmp_path):
    from jobs.preprocess import PreprocessConfig, input_files
    from llava_platform.config import ConfigError, validate_config

    for name in ("b.jsonl", "a.jsonl", "c.parquet"):
        (tmp_path / name).write_text("")
    (tmp_path / "empty").mkdir()

    def files(inp):
        cfg = validate_config(PreprocessConfig, {"input": inp, "output": str(tmp_path / "o"), "processor": "p"})
        return [(Path(u).name, fmt) for u, fmt in input_files(cfg)]

    assert files([str(tmp_path / "b.jsonl"), str(tmp_path / "a.jsonl")]) == [("b.jsonl", "jsonl"), ("a.jsonl", "jsonl")]
    with pytest.raises(ConfigError, match="mixes Parquet and JSON"):
        files(str(tmp_path))
    with pytest.raises(ConfigError, match="holds no"):
        files(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="missing.jsonl does not exist"):
        files(str(tmp_path / "missing.jsonl"))
