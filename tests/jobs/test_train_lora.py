"""LoRA fine-tuning of a registered llava-hf model on real Ray Train + DeepSpeed (CPU, gloo):
`model.init_from=models:/...`, exact stop/resume of adapters and optimizer, and the two exports
(merged model for plain transformers, adapter for peft on its base), both logged to MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from jobs.train import run_training
from jobs.train_config import TrainConfig
from llava_platform.config import load_config
from llava_platform.model_uri import resolve_model_dir
from llava_platform.registry import collect_lineage

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


@pytest.fixture
def champion(tmp_path, monkeypatch, tiny_llava_dir):
    """The tiny llava-hf model registered as llava-tiny@champion in a fresh sqlite registry."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    client.create_registered_model("llava-tiny")
    mv = client.create_model_version("llava-tiny", str(tiny_llava_dir))
    client.set_registered_model_alias("llava-tiny", "champion", mv.version)
    monkeypatch.setenv("LLAVA_MODEL_CACHE", str(tmp_path / "cache"))
    return "models:/llava-tiny@champion"


def lora_cfg(root: Path, data, *extra) -> TrainConfig:
    overrides = [f"data.records={data.stage2}", f"data.image_root={data.image_root}",
                 f"checkpoint.storage={root / 'ckpt'}", f"output={root / 'out'}",
                 "optim.global_batch=8", "optim.micro_batch=2", "optim.max_steps=6", "checkpoint.every_n_steps=2",
                 "method.lora.r=4", "method.lora.alpha=8"]
    return load_config(TrainConfig, CONFIGS / "tiny_lora.yaml", overrides + list(extra))


def losses(run_id: str) -> list[float]:
    return [m.value for m in sorted(MlflowClient().get_metric_history(run_id, "loss"), key=lambda m: m.step)]


@pytest.mark.slow
def test_lora_fine_tune_of_the_champion_resumes_exactly_and_exports_merged_and_adapter(
        ray_local, champion, tiny_llava_dir, shapes_data, tmp_path):
    # ZeRO-2: the partitioned optimizer state of the adapters is what the checkpoint must restore.
    common = ["distributed.zero_stage=2"]
    straight = run_training(lora_cfg(tmp_path / "a", shapes_data, *common, "name=straight"))
    stopped = run_training(lora_cfg(tmp_path / "b", shapes_data, *common, "name=stopped", "stop_after_steps=3"))
    resumed = run_training(lora_cfg(tmp_path / "b", shapes_data, *common, "name=resumed",
                                    f"checkpoint.resume_from={stopped.checkpoint}"))
    assert resumed.metrics["step"] == 6

    full, tail = losses(straight.run_id), losses(resumed.run_id)
    assert tail == pytest.approx(full[3:], rel=1e-5) and full[0] != pytest.approx(full[-1], rel=1e-3)
    a, b = (load_file(str(Path(r.output + "-adapter") / "adapter_model.safetensors")) for r in (straight, resumed))
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)

    # LoRA checkpoints hold what trains, not the frozen base.
    ckpt_bytes = sum(f.stat().st_size for f in Path(stopped.checkpoint).rglob("*") if f.is_file())
    model_bytes = (Path(tiny_llava_dir) / "model.safetensors").stat().st_size
    assert ckpt_bytes < model_bytes

    # The merged export is a plain llava-hf model: transformers alone loads it and answers.
    merged = LlavaForConditionalGeneration.from_pretrained(straight.output).eval()
    processor = AutoProcessor.from_pretrained(straight.output)
    messages = [{"role": "user", "content": [{"type": "text", "text": "How many shapes are there?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, return_tensors="pt")
    out = merged.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    # ... and equals the adapter loaded with peft on its base.
    on_base = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir),
                                        straight.output + "-adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, on_base(**inputs).logits, rtol=1e-5, atol=1e-5)

    client = MlflowClient()
    run = client.get_run(straight.run_id)
    assert "adapter" in {a.path for a in client.list_artifacts(straight.run_id)}
    logged = LlavaForConditionalGeneration.from_pretrained(resolve_model_dir(f"runs:/{straight.run_id}/model"))
    for key, value in logged.state_dict().items():
        assert torch.equal(value, merged.state_dict()[key]), key
    assert run.data.tags["llava.base_model"] == champion
    assert run.data.tags["llava.adapter"] == f"runs:/{straight.run_id}/adapter"
    lineage = collect_lineage(client, straight.run_id)["extra"]
    assert lineage["base_model"] == champion and lineage["adapter"] == f"runs:/{straight.run_id}/adapter"
    trained = {k: float(v) for k, v in run.data.params.items() if k.startswith("trainable.")}
    assert trained["trainable.vision"] == 0 and trained["trainable.language_model"] > 0
    assert 0 < trained["trainable.fraction"] < 0.2, trained


def test_zero3_lora_trains_and_exports_adapter_and_merged_model(one_rank_process_group, tiny_llava_dir, shapes_data,
                                                                 tmp_path, monkeypatch):
    """ZeRO-3 partitions the base and the adapters alike; the export gathers only what trained
    (the adapters and the projector) and merges them into the base read back from its checkpoint."""
    import deepspeed

    from jobs import train_worker as tw
    from llava.train.deepspeed_config import BatchPlan, deepspeed_config

    monkeypatch.chdir(tmp_path)
    cfg = lora_cfg(tmp_path, shapes_data, f"model.init_from={tiny_llava_dir}", "distributed.zero_stage=3",
                   "method.lora.dropout=0")
    tw._register_zero3(cfg, world_size=1)  # as the loop does: the base is built under zero.Init
    loaded = tw._load_model(cfg)
    model, counts = tw._apply_method(loaded.model, cfg)
    engine, *_ = deepspeed.initialize(model=model, optimizer=tw.build_optimizer(model, cfg.part_lrs()),
                                      config=deepspeed_config(BatchPlan(2, 2, 1), zero_stage=3, precision="fp32"))
    processor = loaded.processor
    messages = [{"role": "user", "content": [{"type": "text", "text": "How many shapes?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "There are 3 shapes."}]}]
    inputs = processor(text=[processor.apply_chat_template(messages)] * 2, return_tensors="pt")
    for _ in range(3):
        loss = engine(**inputs, labels=inputs["input_ids"], use_cache=False).loss
        engine.backward(loss)
        engine.step()
    ctx = tw.WorkerContext(rank=0, world_size=1, device=torch.device("cpu"), run_id=None)
    tw._export(engine, processor, cfg, ctx, zero_stage=3)

    merged = LlavaForConditionalGeneration.from_pretrained(cfg.output).eval()
    on_base = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir),
                                        cfg.adapter_destination()).eval()
    untouched = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
    adapter = load_file(str(Path(cfg.adapter_destination()) / "adapter_model.safetensors"))
    assert all(t.numel() > 0 for t in adapter.values()), "an adapter tensor was saved as an empty ZeRO-3 shard"
    assert sum(t.numel() for t in adapter.values()) == counts["total"]
    with torch.no_grad():
        got, want, before = (m(**inputs).logits for m in (merged, on_base, untouched))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - before).abs().max() > 1e-4, "training under ZeRO-3 changed nothing"


def test_qlora_trains_checkpoints_and_exports_on_cpu(one_rank_process_group, tiny_llava_dir, shapes_data, tmp_path,
                                                     monkeypatch):
    """QLoRA through the training loop's pieces under ZeRO-2: 4-bit base (bitsandbytes runs it on
    CPU), a checkpoint of what trains round-trips, and the export merges into the unquantized base."""
    import deepspeed

    from jobs import train_worker as tw
    from llava.train.deepspeed_config import BatchPlan, deepspeed_config

    monkeypatch.chdir(tmp_path)
    cfg = lora_cfg(tmp_path, shapes_data, f"model.init_from={tiny_llava_dir}", "distributed.zero_stage=2",
                   "method.quantization=4bit", "method.lora.dropout=0")
    loaded = tw._load_model(cfg)
    assert type(loaded.model.model.language_model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    model, _ = tw._apply_method(loaded.model, cfg)
    engine, *_ = deepspeed.initialize(model=model, optimizer=tw.build_optimizer(model, cfg.part_lrs()),
                                      config=deepspeed_config(BatchPlan(2, 2, 1), zero_stage=2, precision="fp32"))
    messages = [{"role": "user", "content": [{"type": "text", "text": "How many shapes?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "There are 3 shapes."}]}]
    inputs = loaded.processor(text=[loaded.processor.apply_chat_template(messages)] * 2, return_tensors="pt")
    curve = []
    for _ in range(4):
        loss = engine(**inputs, labels=inputs["input_ids"], use_cache=False).loss
        engine.backward(loss)
        engine.step()
        curve.append(loss.item())
    assert curve[-1] < curve[0]
    engine.save_checkpoint(str(tmp_path / "ckpt"), tag="ds", exclude_frozen_parameters=True)
    engine.load_checkpoint(str(tmp_path / "ckpt"), tag="ds", load_module_strict=False)
    ctx = tw.WorkerContext(rank=0, world_size=1, device=torch.device("cpu"), run_id=None)
    tw._export(engine, loaded.processor, cfg, ctx, zero_stage=2)
    merged = LlavaForConditionalGeneration.from_pretrained(cfg.output)
    assert type(merged.model.language_model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert (Path(cfg.adapter_destination()) / "adapter_config.json").is_file()
