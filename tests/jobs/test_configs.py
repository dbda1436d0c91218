"""Every shipped YAML loads against its schema; bad keys and values fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.evaluate import EvaluateConfig
from jobs.generate_instructions import GenerateConfig
from jobs.pipeline import PipelineConfig
from jobs.preprocess import PreprocessConfig
from jobs.promote import PromoteConfig
from jobs.train_config import TrainConfig
from llava.train.deepspeed_config import BatchPlan
from llava_platform.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
SCHEMAS = {"tiny_stage": TrainConfig, "llava15_": TrainConfig, "llava_v1_": TrainConfig, "pipeline_": PipelineConfig,
           "evaluate_": EvaluateConfig, "promote_": PromoteConfig, "preprocess_": PreprocessConfig,
           "generate_": GenerateConfig}


def schema_for(path: Path):
    for prefix, schema in SCHEMAS.items():
        if path.name.startswith(prefix):
            return schema
    raise AssertionError(f"{path.name}: no schema known for this config file")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(schema_for(path), path)
    assert cfg is not None


@pytest.mark.parametrize("name,stage,lr,batch,zero,epochs", [
    ("llava15_7b_stage1.yaml", 1, 1e-3, 256, 2, 1), ("llava15_7b_stage2.yaml", 2, 2e-5, 128, 3, 1),
    ("llava_v1_stage1.yaml", 1, 2e-3, 128, 2, 1), ("llava_v1_stage2.yaml", 2, 2e-5, 32, 3, 3),
])
def test_reference_recipes(name, stage, lr, batch, zero, epochs):
    cfg = load_config(TrainConfig, CONFIGS / name)
    assert (cfg.stage, cfg.optim.lr, cfg.optim.global_batch, cfg.distributed.zero_stage, cfg.optim.epochs) == (
        stage, lr, batch, zero, epochs)
    assert cfg.optim.warmup_ratio == 0.03 and cfg.data.max_length == 2048 and cfg.model.gradient_checkpointing
    assert cfg.model.projector == ("linear" if name.startswith("llava_v1") else "mlp2x_gelu")
    assert cfg.model.vision.endswith("-336") != name.startswith("llava_v1")
    # The global batch holds on any world size that divides it; accumulation absorbs the change.
    for world in (1, 2, 4, 8):
        plan = BatchPlan(cfg.optim.global_batch, cfg.optim.micro_batch, world)
        assert plan.micro_batch * plan.accumulation * world == cfg.optim.global_batch


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"optim\.learning_rate: unknown key"):
        load_config(TrainConfig, CONFIGS / "tiny_stage1.yaml", ["optim.learning_rate=1"])


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"distributed\.zero_stage"):
        load_config(TrainConfig, CONFIGS / "tiny_stage1.yaml", ["distributed.zero_stage=5"])
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        load_config(TrainConfig, CONFIGS / "tiny_stage1.yaml", ["optim.lr=-1"])


def test_override_must_be_key_value():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TrainConfig, CONFIGS / "tiny_stage1.yaml", ["optim.lr"])


def test_batch_plan_refuses_an_indivisible_world():
    with pytest.raises(ValueError, match="not a multiple"):
        _ = BatchPlan(256, 32, 3).accumulation
