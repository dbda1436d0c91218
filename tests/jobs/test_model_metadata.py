"""The metadata records: a processed dataset encoded with another template or image mode than the
training config is refused on the driver, naming both; a model's record round-trips and a
malformed one fails by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.train import check_training_data
from jobs.train_config import TrainConfig
from llava.model.metadata import MetadataError, ModelMetadata, read_metadata, write_metadata
from llava.train.sample_index import MANIFEST_FORMAT
from llava_platform.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


def _processed(tmp_path: Path, template: str, image_mode: str) -> Path:
    out = tmp_path / f"processed-{template}-{image_mode}"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({
        "format": MANIFEST_FORMAT, "counts": {"input": 64, "written": 64, "rejected": 0},
        "dataset": {"template": template, "image_mode": image_mode, "image_tokens_per_image": 16}}))
    return out


def _cfg(processed: Path, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, CONFIGS / "tiny_stage2.yaml", [
        "data.records=null", f"data.processed={processed}", "model.init_from=null", "optim.global_batch=8",
        "optim.micro_batch=2", *extra])


def test_shards_of_the_configured_template_and_image_mode_pass(tmp_path):
    assert check_training_data(_cfg(_processed(tmp_path, "vicuna_v1", "pad"))) == 64


@pytest.mark.parametrize("template,image_mode,named", [
    ("chatml", "pad", "template 'chatml' (config: data.template='vicuna_v1')"),
    ("vicuna_v1", "resize", "image_mode 'resize' (config: data.image_mode='pad')"),
])
def test_shards_encoded_differently_fail_naming_both(tmp_path, template, image_mode, named):
    with pytest.raises(ConfigError, match="data.processed") as err:
        check_training_data(_cfg(_processed(tmp_path, template, image_mode)))
    assert named in str(err.value)


def test_model_record_round_trips_and_rejects_a_malformed_one(tmp_path):
    meta = ModelMetadata(template="chatml", image_mode="pad", image_tokens_per_image=16, stop_token_ids=(2, 4),
                         base_vision="clip", base_language_model="llama", stage=2)
    write_metadata(tmp_path, meta)
    assert read_metadata(tmp_path) == meta
    assert read_metadata(tmp_path / "missing") is None  # exported before records existed
    (tmp_path / "llava_metadata.json").write_text(json.dumps({"template": "chatml"}))
    with pytest.raises(MetadataError, match="missing image_mode, image_tokens_per_image, stop_token_ids"):
        read_metadata(tmp_path)
