"""The whole LLaVA pipeline in one Ray job: synthetic data -> tiny base checkpoints -> stage 1 ->
stage 2 -> evaluation -> registration and gated promotion to `champion`.

    python -m jobs.pipeline --config jobs/configs/pipeline_tiny.yaml workdir=/tmp/run
    ray job submit -- python -m jobs.pipeline --config jobs/configs/pipeline_tiny.yaml

Everything it writes lives under `workdir`; every phase is an MLflow run nested under one
pipeline run. `llavactl run` starts this job on the embedded stack and then serves the champion.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from pydantic import Field

from jobs.train import run_training
from jobs.train_config import TrainConfig
from llava_platform import tracking
from llava_platform.config import ConfigError, StrictModel, job_arguments, load_config

CONFIG_DIR = Path(__file__).parent / "configs"


class PipelineConfig(StrictModel):
    workdir: str = ".llava"
    experiment: str = "llava"
    model_name: str = Field("llava-tiny", min_length=1)
    seed: int = 0
    n_images: int = Field(300, gt=0, description="synthetic training images")
    image_size: int = Field(64, ge=24)
    lm_pretrain_steps: int = Field(150, ge=0, description="text pre-training of the tiny LM (stands in for Vicuna)")
    clip_pretrain_steps: int = Field(300, ge=0, description="contrastive image-caption pre-training of the tiny "
                                                          "CLIP (stands in for CLIP ViT-L/14)")
    stage1_config: str = "tiny_stage1.yaml"
    stage1_overrides: list[str] = []
    stage2_config: str = "tiny_stage2.yaml"
    stage2_overrides: list[str] = []
    evaluate_config: str = "evaluate_shapes.yaml"
    promote_config: str = "promote_default.yaml"


def _config_path(name: str) -> Path:
    path = Path(name)
    return path if path.exists() else CONFIG_DIR / name


def _text_corpus(ds) -> list[str]:
    """Every caption and answer of the synthetic training split: the tiny LM's pre-training text."""
    corpus = [c for line in ds.captions.read_text().splitlines() if line.strip()
              for c in json.loads(line)["captions"]]
    for rec in json.loads(ds.stage2.read_text()):
        corpus += [t["value"].replace("<image>", "").strip() for t in rec["conversations"]]
    return corpus


def _image_captions(ds) -> list[tuple[object, list[str]]]:
    """(image, its five captions) for every training image: the tiny CLIP's pre-training pairs.
    Held-out images are not among them."""
    from llava.data.images import open_image

    rows = [json.loads(line) for line in ds.captions.read_text().splitlines() if line.strip()]
    return [(open_image(ds.image_root / r["image"]), r["captions"]) for r in rows]


def prepare_inputs(cfg: PipelineConfig, work: Path) -> tuple[Path, Path, object]:
    from llava.data.synthetic import write_shapes_dataset
    from llava.model.tiny import build_tiny_checkpoints

    print(f"[pipeline] synthetic shapes data: {cfg.n_images} images -> {work / 'data'}", flush=True)
    ds = write_shapes_dataset(work / "data", cfg.n_images, seed=cfg.seed, image_size=cfg.image_size)
    print(f"[pipeline] tiny base checkpoints (CLIP pre-trained {cfg.clip_pretrain_steps} steps on image-caption "
          f"pairs, LM {cfg.lm_pretrain_steps} steps on text) -> {work / 'base'}", flush=True)
    vision, lm = build_tiny_checkpoints(work / "base", corpus=_text_corpus(ds), pretrain_steps=cfg.lm_pretrain_steps,
                                        clip_pairs=_image_captions(ds), clip_steps=cfg.clip_pretrain_steps,
                                        image_size=cfg.image_size, seed=cfg.seed)
    return vision, lm, ds


def stage_config(cfg: PipelineConfig, stage: int, work: Path, vision: Path, lm: Path, ds, parent: str) -> TrainConfig:
    name, extra = (cfg.stage1_config, cfg.stage1_overrides) if stage == 1 else (cfg.stage2_config, cfg.stage2_overrides)
    records = ds.stage1 if stage == 1 else ds.stage2
    overrides = [
        f"model.vision={vision}", f"model.language_model={lm}", f"data.records={records}",
        f"data.image_root={ds.image_root}", f"checkpoint.storage={work / 'checkpoints'}",
        f"output={work / 'models' / f'stage{stage}'}", f"tracking.experiment={cfg.experiment}",
        f"tracking.parent_run_id={parent}", f"seed={cfg.seed}",
    ]
    if stage == 2:
        overrides.append(f"model.init_from={work / 'models' / 'stage1'}")
    return load_config(TrainConfig, _config_path(name), overrides + list(extra))


def evaluate_and_promote(cfg: PipelineConfig, work: Path, ds, stage2_run: str, parent: str) -> dict:
    from jobs.evaluate import EvaluateConfig, run_evaluation
    from jobs.promote import PromoteConfig, run_promotion

    ev_cfg = load_config(EvaluateConfig, _config_path(cfg.evaluate_config), [
        f"model=runs:/{stage2_run}/model", f"data_dir={ds.root}", f"output_dir={work / 'eval'}",
        f"tracking.experiment={cfg.experiment}"])
    os.environ[tracking.PARENT_RUN_ENV] = parent  # nests the evaluation run under the pipeline run
    results = run_evaluation(ev_cfg)
    print(f"[pipeline] evaluation: {json.dumps(results['metrics'], sort_keys=True)}", flush=True)
    pr_cfg = load_config(PromoteConfig, _config_path(cfg.promote_config), [
        f"model_name={cfg.model_name}", f"experiment={cfg.experiment}", f"source.run_id={stage2_run}",
        f"metrics.eval_run_id={results['eval_run_id']}", "fail_on_refusal=false"])
    summary = run_promotion(pr_cfg)
    decision = summary["decision"]
    verdict = "promoted to" if decision["promoted"] else "NOT promoted to"
    print(f"[pipeline] registered {cfg.model_name} v{summary['version']}, {verdict} {pr_cfg.alias}: "
          f"{'; '.join(decision['reasons'])}", flush=True)
    return {"version": summary["version"], "promoted": decision["promoted"], "metrics": results["metrics"],
            "eval_run_id": results["eval_run_id"]}


def run_pipeline(cfg: PipelineConfig) -> dict:
    work = Path(cfg.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    tracking.configure()
    parent = tracking.start_job_run(cfg.experiment, f"pipeline-{cfg.model_name}", "pipeline")
    tracking.log_params(parent, cfg.model_dump(mode="json"))
    try:
        vision, lm, ds = prepare_inputs(cfg, work)
        runs = {}
        for stage in (1, 2):
            print(f"[pipeline] stage {stage}: training on Ray Train + DeepSpeed", flush=True)
            result = run_training(stage_config(cfg, stage, work, vision, lm, ds, parent))
            runs[f"stage{stage}"] = result.run_id
            print(f"[pipeline] stage {stage}: done, final loss {result.metrics.get('loss', float('nan')):.4f}, "
                  f"run {result.run_id}", flush=True)
        promotion = evaluate_and_promote(cfg, work, ds, runs["stage2"], parent)
    except BaseException:
        tracking.finish_run(parent, "FAILED")
        raise
    tracking.finish_run(parent)
    summary = {"pipeline_run_id": parent, "runs": runs, "model_name": cfg.model_name,
               "elapsed_s": round(time.time() - started, 1), **promotion}
    (work / "pipeline_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    config, overrides = job_arguments(argv, prog="python -m jobs.pipeline", description=__doc__.splitlines()[0],
                                      example="workdir=/tmp/run", config_required=False,
                                      schema=PipelineConfig, default_config=CONFIG_DIR / 'pipeline_tiny.yaml')
    try:
        cfg = load_config(PipelineConfig, config or CONFIG_DIR / 'pipeline_tiny.yaml', overrides)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    summary = run_pipeline(cfg)
    print("PIPELINE_SUMMARY " + json.dumps(summary), flush=True)
    return 0 if summary["promoted"] else 3


if __name__ == "__main__":
    sys.exit(main())
