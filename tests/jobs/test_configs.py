"""Every shipped YAML loads against its schema; bad keys and values fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jobs.evaluate import EvaluateConfig
from jobs.generate_instructions import GenerateConfig
from jobs.pipeline import PipelineConfig
from jobs.preprocess import PreprocessConfig
from jobs.promote import PromoteConfig
from jobs.train_config import TrainConfig
from llava.train.deepspeed_config import BatchPlan
from llava_platform.config import ConfigError, load_config, validate_config

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
SCHEMAS = {"tiny_stage": TrainConfig, "tiny_lora": TrainConfig, "llava15_": TrainConfig, "llava_v1_": TrainConfig, "pipeline_": PipelineConfig,
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


def test_stage_recipes_are_methods_and_old_configs_without_one_get_the_stage_default():
    for stage, lm in ((1, "frozen"), (2, "full")):
        cfg = load_config(TrainConfig, CONFIGS / f"tiny_stage{stage}.yaml")
        assert (cfg.method.vision.mode, cfg.method.projector.mode, cfg.method.language_model.mode) == (
            "frozen", "full", lm)
        data = yaml.safe_load((CONFIGS / f"tiny_stage{stage}.yaml").read_text())
        del data["method"]
        assert validate_config(TrainConfig, data).method == cfg.method


def test_reference_lora_recipe():
    cfg = load_config(TrainConfig, CONFIGS / "llava15_7b_lora.yaml")
    m = cfg.method
    assert (m.lora.r, m.lora.alpha, m.lora.dropout, m.lora.target_modules) == (128, 256, 0.05, "all-linear")
    assert (m.language_model.mode, m.projector.mode, m.vision.mode) == ("lora", "full", "frozen")
    assert cfg.part_lrs() == {"vision": 2e-4, "projector": 2e-5, "language_model": 2e-4}
    assert cfg.distributed.zero_stage == 3 and cfg.optim.global_batch == 128 and cfg.model.gradient_checkpointing
    assert cfg.adapter_destination() == "s3://llava-models/llava15-7b/lora-adapter"


@pytest.mark.parametrize("name", ["llava15_7b_lora.yaml", "tiny_lora.yaml"])
def test_lora_recipes_pass_dry_run(name, capsys):
    from jobs.train import main

    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(CONFIGS / name), "--dry-run"])
    assert exit_.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["method"]["language_model"]["mode"] == "lora"


@pytest.mark.parametrize("override,message", [
    ("method.vision.lr=1e-5", r"method\.vision: .*lr is set but the part is frozen"),
    ("model.init_from=null model.vision=v model.language_model=lm", r"LoRA part needs a saved base"),
    ("model.init_from=null", r"set model\.init_from \(a llava-hf checkpoint\), or model\.vision"),
    ("method.quantization=4bit distributed.zero_stage=3", r"does not partition with ZeRO-3"),
    ("method.language_model.mode=full method.quantization=4bit", r"set language_model\.mode=lora"),
    ("method.projector.mode=frozen method.projector.lr=null method.language_model.mode=frozen "
     "method.language_model.lr=null", r"every part is frozen"),
    ("method.projector.mode=partial", r"method\.projector\.mode"),
])
def test_bad_methods_fail_naming_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, CONFIGS / "tiny_lora.yaml", override.split())


def test_qlora_without_cuda_depends_on_bitsandbytes_cpu_support(monkeypatch):
    """bitsandbytes >= 0.50 runs 4-bit layers on CPU (tests/model/test_lora.py trains one); with an
    older release or none, a CPU-only QLoRA config is refused at load time."""
    from jobs import train_config

    cfg = load_config(TrainConfig, CONFIGS / "tiny_lora.yaml", ["method.quantization=4bit"])
    assert cfg.method.quantization == "4bit" and not cfg.distributed.use_gpu
    monkeypatch.setattr(train_config, "_bitsandbytes_runs_on_cpu", lambda: False)
    with pytest.raises(ConfigError, match=r"needs CUDA: set distributed\.use_gpu=true"):
        load_config(TrainConfig, CONFIGS / "tiny_lora.yaml", ["method.quantization=4bit"])
