"""Register a stage-2 model, attach its evaluation and lineage, and promote it through the gate.

    python -m jobs.promote --config jobs/configs/promote_default.yaml key=value ...

Steps, each safe to repeat (the Kubernetes operator retries a failed job as a whole):
1. find the stage-2 run (`source.run_id`, else the newest run of this pipeline's `stage2` phase);
2. register its `model` artifacts as a version (the same run always maps to the same version);
3. tag lineage (data URIs + digests, stage-1 run, config digest, code version) from the training runs;
4. copy the evaluation run's metrics onto the version (`metrics.eval_run_id`, else the newest run of
   this pipeline's `evaluate` phase, else the newest run that evaluated this stage-2 run);
5. move `alias` to the version if the gate passes (or `force` with a `reason`); the default gate
   refuses a version without evaluation metrics, the first one included. Concurrent promotions
   of one model each record their move (llava_platform.registry: one history tag per entry).

The job logs its own MLflow run (phase `promote`) holding the gate decision. Exit codes: 0 promoted
(or already promoted), 3 refused by the gate (when `fail_on_refusal`), 2 bad configuration.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from pydantic import Field

from llava_platform import registry as reg
from llava_platform import tracking
from llava_platform.config import ConfigError, StrictModel, job_arguments, load_config
from llava_platform.registry import GateConfig, MetricBound


class SourceConfig(StrictModel):
    run_id: str | None = None  # the stage-2 training run; None: found through pipeline_id + phase
    pipeline_id: str | None = None  # None: LLAVA_PIPELINE_ID from the environment
    phase: str = "stage2"
    artifact_path: str = "model"
    stage1_run_id: str | None = None  # lineage; None: found through the pipeline id or the parent run


class MetricsConfig(StrictModel):
    eval_run_id: str | None = None
    eval_phase: str = "evaluate"
    required: bool = False  # fail when no evaluation run is found (instead of gating on no metrics)


class SimpleGate(StrictModel):
    """The operator's one-metric gate (LlavaPipeline spec.evaluation.gate), merged into `gate`."""

    metric: str | None = None
    threshold: float | None = None
    higher_is_better: bool = True


class PromoteConfig(StrictModel):
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI
    experiment: str = "llava"
    # where a newly created experiment keeps artifacts; None: next to a sqlite store, else the server's
    artifact_location: str | None = None
    model_name: str = Field("llava-tiny", min_length=1)
    alias: str = "champion"
    candidate_alias: str | None = "candidate"
    source: SourceConfig = Field(default_factory=SourceConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    gate: GateConfig = Field(default_factory=reg.default_gate)
    simple_gate: SimpleGate = Field(default_factory=SimpleGate)
    force: bool = False
    reason: str | None = None
    fail_on_refusal: bool = True


def effective_gate(cfg: PromoteConfig) -> GateConfig:
    gate = cfg.gate.model_copy(deep=True)
    sg = cfg.simple_gate
    if sg.metric and sg.threshold is not None:
        bound = gate.thresholds.get(sg.metric, MetricBound())
        bound = bound.model_copy(update={"min": sg.threshold} if sg.higher_is_better else {"max": sg.threshold})
        gate.thresholds = {**gate.thresholds, sg.metric: bound}
    return gate


def _pipeline_id(cfg: PromoteConfig) -> str | None:
    return cfg.source.pipeline_id or os.environ.get(tracking.PIPELINE_ID_ENV) or None


def find_stage2_run(client, cfg: PromoteConfig) -> str:
    if cfg.source.run_id:
        return cfg.source.run_id
    pipeline = _pipeline_id(cfg)
    if not pipeline:
        raise ConfigError("source.run_id is not set and there is no pipeline id (source.pipeline_id or "
                          f"{tracking.PIPELINE_ID_ENV}) to find the {cfg.source.phase} run by")
    run = reg.find_pipeline_run(client, pipeline, cfg.source.phase)
    if run is None:
        raise ConfigError(f"no MLflow run tagged llava.pipeline_id={pipeline}, llava.phase={cfg.source.phase}")
    return run.info.run_id


def find_eval_run(client, cfg: PromoteConfig, stage2_run_id: str) -> str | None:
    if cfg.metrics.eval_run_id:
        return cfg.metrics.eval_run_id
    pipeline = _pipeline_id(cfg)
    if pipeline:
        run = reg.find_pipeline_run(client, pipeline, cfg.metrics.eval_phase)
        if run is not None:
            return run.info.run_id
    runs = reg.find_runs(client, f"tags.`llava.evaluated_run_id` = '{stage2_run_id}'")
    return runs[0].info.run_id if runs else None


def run_promotion(cfg: PromoteConfig) -> dict[str, Any]:
    uri = tracking.configure(cfg.tracking_uri)
    client = reg.get_client(uri)
    if cfg.force and not (cfg.reason and cfg.reason.strip()):
        raise ConfigError("force=true needs reason=...")
    stage2 = find_stage2_run(client, cfg)
    version = reg.register_version(cfg.model_name, stage2, cfg.source.artifact_path, client=client,
                                   candidate_alias=cfg.candidate_alias)
    lineage = reg.collect_lineage(client, stage2, cfg.source.stage1_run_id)
    reg.set_lineage(cfg.model_name, version, client=client, **lineage)
    eval_run = find_eval_run(client, cfg, stage2)
    if eval_run is None and cfg.metrics.required:
        raise ConfigError(f"no evaluation run found for stage-2 run {stage2} (metrics.required=true)")
    metrics = reg.attach_eval_run(cfg.model_name, version, eval_run, client=client) if eval_run else {}
    decision = reg.promote(cfg.model_name, version, alias=cfg.alias, gate=effective_gate(cfg), force=cfg.force,
                           reason=cfg.reason, client=client)
    summary = {"model_name": cfg.model_name, "version": version, "stage2_run_id": stage2, "eval_run_id": eval_run,
               "metrics": metrics, "decision": decision.to_dict()}
    _log_job_run(cfg, summary)
    return summary


def _log_job_run(cfg: PromoteConfig, summary: dict[str, Any]) -> None:
    """A run for this job (phase `promote`) so pipelines can find what it decided."""
    from mlflow import MlflowClient

    tracking.ensure_experiment(cfg.experiment, cfg.artifact_location)
    run_id = tracking.start_job_run(cfg.experiment, f"promote-{cfg.model_name}-v{summary['version']}", "promote")
    client = MlflowClient()
    decision = summary["decision"]
    for key, value in {"llava.model_name": cfg.model_name, "llava.model_version": summary["version"],
                       "llava.promoted": str(decision["promoted"]).lower(),
                       "llava.forced": str(decision["forced"]).lower()}.items():
        client.set_tag(run_id, key, value)
    client.log_dict(run_id, summary, "promotion.json")
    tracking.finish_run(run_id)


def main(argv: list[str] | None = None) -> int:
    config, overrides = job_arguments(argv, prog="python -m jobs.promote", description=__doc__.splitlines()[0],
                                      example="source.run_id=abc", schema=PromoteConfig)
    try:
        cfg = load_config(PromoteConfig, config, overrides)
        summary = run_promotion(cfg)
    except (ConfigError, reg.RegistryError) as err:
        print(f"jobs.promote: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    decision = summary["decision"]
    if not decision["promoted"]:
        print("jobs.promote: refused by the gate: " + "; ".join(decision["reasons"]), file=sys.stderr)
        return 3 if cfg.fail_on_refusal else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
