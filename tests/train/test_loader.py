"""The records-file source read by position through the DataLoader gives exactly the micro-batches
the eager path (every sample encoded with its images up front) gives, padded and packed."""

from __future__ import annotations

import json

import pytest
import torch

from llava.train.dataset import encode_records
from llava.train.deepspeed_config import BatchPlan
from llava.train.loader import CollateMicroBatch, RankSchedule, encode_records_index, micro_batch_loader
from llava.train.packing import build_micro_batch


@pytest.mark.parametrize("packing,workers", [(False, 1), (True, 0)])
def test_records_read_by_position_match_the_eager_micro_batches(tiny_processor, shapes_data, packing, workers):
    records = json.loads(shapes_data.stage2.read_text())[:40]
    kwargs = {"max_length": 512, "image_root": shapes_data.image_root, "image_mode": "pad"}
    source, rejected = encode_records_index(records, tiny_processor, "vicuna_v1", **kwargs)
    eager, eager_rejected = encode_records(records, tiny_processor, "vicuna_v1", **kwargs)
    assert [r.id for r in rejected] == [r.id for r in eager_rejected]
    assert source.ids == [s.id for s in eager]
    plan = BatchPlan(global_batch=8, micro_batch=2, world_size=2)
    build = {"packing": packing, "pad_id": tiny_processor.tokenizer.pad_token_id,
             "image_processor": tiny_processor.image_processor, "max_length": 512}
    schedule = RankSchedule(source.index, seed=3, group_by_modality_length=True, global_batch=8, micro_batch=2,
                            rank=1, world_size=2, start=1, total=4, per_epoch=5)
    loader = micro_batch_loader(source, schedule, CollateMicroBatch(**build), workers=workers, prefetch=2)
    expected = [positions for _, micros in schedule.steps() for positions in micros]
    got = list(loader)
    assert len(got) == len(expected) == 3 * plan.accumulation
    for (micro, ids), positions in zip(got, expected, strict=True):
        want = build_micro_batch([eager[i] for i in positions.tolist()], **build)
        assert ids == [eager[i].id for i in positions.tolist()]
        assert micro.inputs.keys() == want.inputs.keys()
        for key in want.inputs:
            torch.testing.assert_close(micro.inputs[key], want.inputs[key], rtol=0, atol=0, msg=key)


def test_processed_shards_read_by_position_match_the_eager_micro_batches(tiny_processor, shapes_data, tmp_path):
    """Shards in several files and row groups (written by the pre-processing writer, PNG so the
    pixels are exact): every position reads back its own sample."""
    import pyarrow as pa

    from jobs.preprocess import SHARD_SCHEMA, ImageRules, ShardWriter, encode_stored_image
    from jobs.processed_data import open_processed
    from llava.train.sample_index import MANIFEST_FORMAT

    records = json.loads(shapes_data.stage2.read_text())[:30]
    eager, _ = encode_records(records, tiny_processor, "vicuna_v1", max_length=512,
                              image_root=shapes_data.image_root)
    png = ImageRules(store_format="png")
    writer = ShardWriter(str(tmp_path), rows_per_shard=7, row_group_rows=3)
    writer.add(pa.Table.from_pylist([
        {"id": s.id, "input_ids": s.input_ids, "labels": s.labels,
         "images": [encode_stored_image(i, png) for i in s.images], "num_images": len(s.images),
         "length": len(s.input_ids), "modality": s.modality} for s in eager], schema=SHARD_SCHEMA))
    writer.flush()
    manifest = {"format": MANIFEST_FORMAT, "shards": writer.shards, "index": writer.write_index(),
                "counts": {"written": len(eager)}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    source = open_processed(str(tmp_path))
    by_id = sorted(eager, key=lambda s: s.id)  # the index order
    build = {"packing": False, "pad_id": tiny_processor.tokenizer.pad_token_id,
             "image_processor": tiny_processor.image_processor, "max_length": 512}
    schedule = RankSchedule(source.index, seed=1, group_by_modality_length=True, global_batch=8, micro_batch=2,
                            rank=0, world_size=1, start=0, total=4, per_epoch=4)
    expected = [positions for _, micros in schedule.steps() for positions in micros]
    got = list(micro_batch_loader(source, schedule, CollateMicroBatch(**build), workers=1, prefetch=2))
    assert len(got) == len(expected) == 16
    for (micro, ids), positions in zip(got, expected, strict=True):
        want = build_micro_batch([by_id[i] for i in positions.tolist()], **build)
        assert ids == [by_id[i].id for i in positions.tolist()]
        for key in want.inputs:
            torch.testing.assert_close(micro.inputs[key], want.inputs[key], rtol=0, atol=0, msg=key)
