"""Evaluate a llava-hf model: shapes exact match, ScienceQA-format multiple choice, optional judge.

    python -m jobs.evaluate --config jobs/configs/evaluate_shapes.yaml model=models:/llava-tiny@candidate

`model` is a local directory, `runs:/<id>/model`, `models:/<name>@<alias>` / `models:/<name>/<v>`
or `s3://...` (resolved and cached by `llava_platform.model_uri`), or `pipeline:stage2`: the model
the stage-2 job of this pipeline logged (LLAVA_PIPELINE_ID; how the Kubernetes operator runs it). The data are the held-out files
written by `llava.data.synthetic` under `data_dir` (local or s3://):
`eval/shapes_qa.jsonl`, `eval/scienceqa.jsonl` and, for the judge, `eval/captions.jsonl`.

Writes `results.json`, `report.md` and `chart.png` to a new folder of its own under `output_dir`
(`<UTC time>-<model>-<run>`: no evaluation overwrites another's), logs them with the flat metrics to
an MLflow run (phase `evaluate`, tagged with the evaluated model), and, only when asked
(`tracking.record_on_version=true`, `llavactl eval --record`) and only for a whole evaluation (no
`limit`), records the metrics on the registry version, where the promotion gate reads them. The
pipeline's own evaluation reaches the version through `jobs.promote` (`metrics.eval_run_id`).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from llava_platform import preflight, storage
from llava_platform.config import ConfigError, StrictModel, job_arguments, load_config
from llava_platform.judge_client import JudgeError, JudgeSettings
from llava_platform.model_uri import ModelURIError

log = logging.getLogger("jobs.evaluate")


class BenchmarkConfig(StrictModel):
    enabled: bool = True
    path: str | None = None  # None: the standard file under data_dir
    limit: int | None = Field(None, ge=1)  # first N items (quick checks)
    max_new_tokens: int = Field(16, ge=1)


class GenerationConfig(StrictModel):
    batch_size: int = Field(8, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    image_mode: Literal["pad", "resize"] | None = None  # None: the model's metadata record says


class TrackingConfig(StrictModel):
    enabled: bool = True
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI
    experiment: str = "llava"
    artifact_location: str | None = None  # None: beside a sqlite store, else the server's default
    run_name: str | None = None
    # models:/ URIs: copy the metrics onto the registry version, where the promotion gate reads them.
    # Off unless asked (`llavactl eval --record`): a quick look must not rewrite the gate's evidence.
    # A partial evaluation (a shapes/scienceqa `limit`) is refused for recording.
    record_on_version: bool = False


class EvaluateConfig(StrictModel):
    model: str = Field(min_length=1)
    data_dir: str = Field(min_length=1)
    output_dir: str = ".llava/eval"
    cache_dir: str | None = None  # where remote models are cached; None: ~/.cache/llava/models
    shapes: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    # The shapes questions asked again with a blank image: a model that answers from the image
    # falls to the majority baseline there (the report shows both next to the real accuracy).
    blank_image_control: bool = True
    scienceqa: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    # LLaVA-Bench-style questions from eval/captions.jsonl; they run only when the judge is enabled.
    bench: BenchmarkConfig = Field(default_factory=lambda: BenchmarkConfig(max_new_tokens=96))
    judge: JudgeSettings = Field(default_factory=JudgeSettings)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


PIPELINE_PREFIX = "pipeline:"


# --------------------------------------------------------------------------- data


def read_jsonl(uri: str) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(storage.read_text(uri).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{uri} line {n}: not JSON ({err.msg})") from None
    return rows


def load_items(cfg: EvaluateConfig, name: str) -> list[dict[str, Any]]:
    bench: BenchmarkConfig = getattr(cfg, name)
    uri = benchmark_file(cfg, name)
    if not storage.exists(uri):
        raise ConfigError(f"{name}: evaluation file {uri} does not exist")
    items = read_jsonl(uri)
    return items[: bench.limit] if bench.limit else items


class ImageCache:
    """Images by path relative to data_dir, the last `keep` decoded ones kept (questions about one
    image come together); a benchmark of any size holds a bounded number of decoded images."""

    def __init__(self, data_dir: str, keep: int = 64):
        from collections import OrderedDict

        self.data_dir = data_dir
        self.keep = keep
        self._images: OrderedDict[str, Any] = OrderedDict()

    def get(self, rel: str):
        from PIL import Image

        if rel in self._images:
            self._images.move_to_end(rel)
            return self._images[rel]
        data = storage.read_bytes(storage.join(self.data_dir, rel))
        image = self._images[rel] = Image.open(io.BytesIO(data)).convert("RGB")
        if len(self._images) > self.keep:
            self._images.popitem(last=False)
        return image

    def lazy(self, rel: str | None):
        """A stand-in decoded only when its request's batch is generated (see `generate_all`)."""
        return None if not rel else functools.partial(self.get, rel)


def _request(text: str, image) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if image is not None:
        content.append({"type": "image", "image": image})
    content.append({"type": "text", "text": text})
    return {"messages": [{"role": "user", "content": content}]}


# --------------------------------------------------------------------------- generation


def _with_images(request: dict[str, Any]) -> dict[str, Any]:
    """The request with its lazy images decoded: only one batch of images is in memory at a time."""
    messages = [{**m, "content": [{**part, "image": part["image"]()} if callable(part.get("image")) else part
                                  for part in m["content"]]} for m in request["messages"]]
    return {**request, "messages": messages}


def generate_all(model, processor, requests: list[dict[str, Any]], gen: GenerationConfig,
                 max_new_tokens: int) -> list[str]:
    from llava.infer.generate import generate_batch

    texts: list[str] = []
    for start in range(0, len(requests), gen.batch_size):
        batch = [_with_images(r) for r in requests[start : start + gen.batch_size]]
        results = generate_batch(model, processor, batch, max_new_tokens=max_new_tokens,
                                 temperature=gen.temperature, top_p=gen.top_p, stop=None, seed=gen.seed,
                                 image_mode=gen.image_mode or "pad")
        texts.extend(r.text.strip() for r in results)
    return texts


def run_shapes(cfg, model, processor, images: ImageCache) -> dict[str, Any]:
    from llava.eval.shapes import score_shapes

    items = load_items(cfg, "shapes")
    requests = [_request(item["question"], images.lazy(item.get("image"))) for item in items]
    result = score_shapes(items, generate_all(model, processor, requests, cfg.generation, cfg.shapes.max_new_tokens))
    if cfg.blank_image_control:
        from PIL import Image

        def blank(rel: str):
            return Image.new("RGB", images.get(rel).size, "white")

        blanks = [_request(item["question"], functools.partial(blank, item["image"]) if item.get("image") else None)
                  for item in items]
        result["blank_image"] = score_shapes(
            items, generate_all(model, processor, blanks, cfg.generation, cfg.shapes.max_new_tokens))
    return result


def run_scienceqa(cfg, model, processor, images: ImageCache) -> dict[str, Any]:
    from llava.eval.scienceqa import build_prompt, score_scienceqa

    items = load_items(cfg, "scienceqa")
    requests = [_request(build_prompt(item), images.lazy(item.get("image"))) for item in items]
    replies = generate_all(model, processor, requests, cfg.generation, cfg.scienceqa.max_new_tokens)
    return score_scienceqa(items, replies)


def run_bench(cfg, model, processor, images: ImageCache) -> dict[str, Any]:
    from llava.eval.judge import bench_items_from_captions, relative_scores
    from llava_platform.judge_client import judge_answers

    items = bench_items_from_captions(load_items(cfg, "bench"))
    requests = [_request(item["question"], images.lazy(item.get("image"))) for item in items]
    answers = generate_all(model, processor, requests, cfg.generation, cfg.bench.max_new_tokens)
    rows = judge_answers(items, answers, cfg.judge)
    return {"judge_model": cfg.judge.model, "rules": cfg.judge.rules or "shipped default",
            "errors": sum(1 for r in rows if r["error"]), "scores": relative_scores(rows), "rows": rows}


@dataclass(frozen=True)
class Benchmark:
    """One evaluation benchmark: the EvaluateConfig section holding its settings, its file under
    data_dir, the function that runs it, whether it needs the judge, and whether `limit` is the
    benchmark's own size (LLaVA-Bench's 30 images) rather than a cut making the run partial."""

    section: str
    default_file: str
    run: Callable[[EvaluateConfig, Any, Any, ImageCache], dict[str, Any]]
    needs_judge: bool = False
    limit_is_size: bool = False


# The one table of benchmarks, by results key (their flat metrics: llava.eval.report.flat_metrics).
BENCHMARKS: dict[str, Benchmark] = {
    "shapes": Benchmark("shapes", "eval/shapes_qa.jsonl", run_shapes),
    "scienceqa": Benchmark("scienceqa", "eval/scienceqa.jsonl", run_scienceqa),
    "judge": Benchmark("bench", "eval/captions.jsonl", run_bench, needs_judge=True, limit_is_size=True),
}


def benchmark_file(cfg: EvaluateConfig, section: str) -> str:
    default = next(b.default_file for b in BENCHMARKS.values() if b.section == section)
    return getattr(cfg, section).path or storage.join(cfg.data_dir, default)


def enabled_benchmarks(cfg: EvaluateConfig) -> dict[str, Benchmark]:
    return {key: b for key, b in BENCHMARKS.items()
            if getattr(cfg, b.section).enabled and (cfg.judge.enabled or not b.needs_judge)}


# --------------------------------------------------------------------------- model and tracking


def identify_model(cfg: EvaluateConfig) -> dict[str, Any]:
    """What is being evaluated. A models:/ alias is pinned to its version now, so the alias moving
    during the evaluation cannot mix two models' results."""
    from llava_platform.model_uri import resolve_registry_version, split_runs_uri, version_logged_model_id

    info: dict[str, Any] = {"uri": cfg.model, "resolve_uri": cfg.model}
    from llava_platform.logged_model import find_logged_model
    from llava_platform.registry import get_client

    if cfg.model.startswith(PIPELINE_PREFIX):
        run_id = _pipeline_phase_run(cfg)
        info.update(run_id=run_id, resolve_uri=f"runs:/{run_id}/model")
    elif cfg.model.startswith("runs:/"):
        info["run_id"] = split_runs_uri(cfg.model)[0]
    elif cfg.model.startswith("models:/m-") and not any(ch in cfg.model[len("models:/"):] for ch in "/@"):
        info["model_id"] = cfg.model[len("models:/"):]
    elif cfg.model.startswith("models:/"):
        mv = resolve_registry_version(get_client(cfg.tracking.tracking_uri), cfg.model)
        info.update(name=mv.name, version=str(mv.version), run_id=mv.run_id,
                    resolve_uri=f"models:/{mv.name}/{mv.version}")
        if version_logged_model_id(mv):
            info["model_id"] = version_logged_model_id(mv)
    if info.get("run_id") and "model_id" not in info and info["resolve_uri"].startswith("runs:/"):
        # The MLflow Model the run logged: the evaluation's metrics are linked to it (its model page).
        path = split_runs_uri(info["resolve_uri"])[1]
        logged = find_logged_model(get_client(_tracking_uri(cfg)), info["run_id"], path) if path else None
        if logged is not None:
            info["model_id"] = logged.model_id
    return info


def _pipeline_phase_run(cfg: EvaluateConfig) -> str:
    """`pipeline:<phase>`: the model logged by that phase of this pipeline (the operator's evaluate step)."""
    import os

    from llava_platform import tracking
    from llava_platform.registry import find_pipeline_run, get_client

    phase = cfg.model[len(PIPELINE_PREFIX):] or "stage2"
    pipeline = os.environ.get(tracking.PIPELINE_ID_ENV)
    if not pipeline:
        raise ConfigError(f"model={cfg.model} needs {tracking.PIPELINE_ID_ENV} in the environment")
    run = find_pipeline_run(get_client(_tracking_uri(cfg)), pipeline, phase)
    if run is None:
        raise ConfigError(f"model={cfg.model}: no MLflow run tagged llava.pipeline_id={pipeline}, llava.phase={phase}")
    return run.info.run_id


def _tracking_uri(cfg: EvaluateConfig) -> str:
    from llava_platform import tracking

    return tracking.configure(cfg.tracking.tracking_uri)


def start_eval_run(cfg: EvaluateConfig, model_info: dict[str, Any]) -> str:
    """The MLflow run for this evaluation (phase `evaluate`), tagged with what is evaluated."""
    from llava_platform import registry, tracking

    uri = _tracking_uri(cfg)
    # None lets ensure_experiment put artifacts beside a sqlite store (or at the server's default).
    tracking.ensure_experiment(cfg.tracking.experiment, cfg.tracking.artifact_location)
    name = cfg.tracking.run_name or "evaluate-" + (
        f"{model_info['name']}-v{model_info['version']}" if "version" in model_info else Path(cfg.model).name)
    run_id = tracking.start_job_run(cfg.tracking.experiment, name[:250], "evaluate")
    client = registry.get_client(uri)
    tags = {"llava.model_uri": cfg.model}
    if model_info.get("run_id"):
        tags["llava.evaluated_run_id"] = model_info["run_id"]
    if model_info.get("version"):
        tags.update({"llava.model_name": model_info["name"], "llava.model_version": model_info["version"]})
    if model_info.get("model_id"):
        tags["llava.model_id"] = model_info["model_id"]
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    tracking.log_params(run_id, cfg.model_dump(mode="json"))
    return run_id


def finish_eval_run(cfg: EvaluateConfig, run_id: str, model_info: dict[str, Any], metrics: dict[str, float],
                    out_dir: Path) -> None:
    from llava_platform import registry, tracking

    client = registry.get_client(_tracking_uri(cfg))
    if model_info.get("model_id"):
        from llava_platform.logged_model import log_model_metrics

        log_model_metrics(client, run_id, model_info["model_id"], metrics)
    else:  # a model directory or a run from before models were logged as MLflow Models
        tracking.log_metrics(run_id, metrics, step=0, timestamp_ms=int(time.time() * 1000))
    client.log_artifacts(run_id, str(out_dir), "eval")
    tracking.finish_run(run_id)
    if model_info.get("version") and cfg.tracking.record_on_version:
        registry.set_version_metrics(model_info["name"], model_info["version"], metrics, client=client,
                                     eval_run_id=run_id)


# --------------------------------------------------------------------------- entry point


def run_evaluation(cfg: EvaluateConfig) -> dict[str, Any]:
    if cfg.bench.enabled and cfg.judge.enabled and cfg.judge.api_key_env:
        import os

        if not os.environ.get(cfg.judge.api_key_env):
            raise JudgeError(f"judge: environment variable {cfg.judge.api_key_env} (judge.api_key_env) is not set")
    for bench in enabled_benchmarks(cfg).values():  # fail on missing data before loading anything
        uri = benchmark_file(cfg, bench.section)
        if not storage.exists(uri):
            raise ConfigError(f"{bench.section}: evaluation file {uri} does not exist")
    check_recording(cfg)
    if "://" not in cfg.model and not cfg.model.startswith(("runs:/", "models:/", PIPELINE_PREFIX)):
        try:
            preflight.require_model_dir(cfg.model, "model")
        except preflight.InputError as err:
            raise ConfigError(str(err)) from None
    model_info = identify_model(cfg)
    run_id = start_eval_run(cfg, model_info) if cfg.tracking.enabled else None
    try:
        results = _evaluate(cfg, model_info)
        results["eval_run_id"] = run_id
        out_dir = evaluation_folder(cfg, model_info, run_id)
        results["output_dir"] = str(out_dir)
        _write_outputs(out_dir, results)
        if run_id:
            finish_eval_run(cfg, run_id, model_info, results["metrics"], out_dir)
    except BaseException:
        if run_id:
            from llava_platform import tracking

            tracking.finish_run(run_id, "FAILED")
        raise
    return results


def _evaluate(cfg: EvaluateConfig, model_info: dict[str, Any]) -> dict[str, Any]:
    from llava.eval.report import flat_metrics
    from llava.infer.load import load_for_inference
    from llava.model.metadata import read_metadata
    from llava_platform.model_uri import resolve_model_dir

    remote = model_info["resolve_uri"].startswith(("runs:/", "models:/"))
    tracking_uri = _tracking_uri(cfg) if remote else None
    model_dir = resolve_model_dir(model_info["resolve_uri"], cfg.cache_dir, tracking_uri=tracking_uri)
    model, processor = load_for_inference(str(model_dir), device=cfg.generation.device, dtype=cfg.generation.dtype)
    meta = read_metadata(model_dir)
    if cfg.generation.image_mode is None:  # images as the model was trained on them (its record)
        mode = meta.image_mode if meta else "pad"
        cfg = cfg.model_copy(update={"generation": cfg.generation.model_copy(update={"image_mode": mode})})
    images = ImageCache(cfg.data_dir)
    results: dict[str, Any] = {"model": cfg.model, "model_dir": str(model_dir)}
    if model_info.get("version"):
        results["model_version"] = f"{model_info['name']} v{model_info['version']}"
    timings = {}
    for name, bench in enabled_benchmarks(cfg).items():
        started = time.perf_counter()
        results[name] = bench.run(cfg, model, processor, images)
        timings[name] = time.perf_counter() - started
        log.info("%s done in %.1fs", name, timings[name])
    results["timings_s"] = timings
    results["metrics"] = flat_metrics(results)
    return results


def partial_limits(cfg: EvaluateConfig) -> list[str]:
    """The limits that make this a partial evaluation (`shapes.limit=5`). `bench.limit` is the
    benchmark's own size (30 images, as LLaVA-Bench COCO), not a cut."""
    sections = [b.section for b in BENCHMARKS.values() if not b.limit_is_size]
    return [f"{name}.limit={getattr(cfg, name).limit}" for name in sections
            if getattr(cfg, name).enabled and getattr(cfg, name).limit]


def check_recording(cfg: EvaluateConfig) -> None:
    """Only a whole evaluation may become a version's recorded metrics (what the gate compares)."""
    if cfg.tracking.record_on_version and partial_limits(cfg):
        raise ConfigError(f"tracking.record_on_version: a partial evaluation ({', '.join(partial_limits(cfg))}) is "
                          "never recorded on a registry version; drop the limit or the recording")


def evaluation_folder(cfg: EvaluateConfig, model_info: dict[str, Any], run_id: str | None) -> Path:
    """A new folder under output_dir for this evaluation alone (UTC time, model, run), so no
    evaluation overwrites another's report; names sort by time."""
    if model_info.get("version"):
        label = f"{model_info['name']}-v{model_info['version']}"
    elif model_info.get("run_id"):
        label = f"run-{model_info['run_id'][:8]}"
    else:
        label = Path(cfg.model).name
    label = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in label)[:80]
    stem = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{label}" + (f"-{run_id[:8]}" if run_id else "")
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        folder = root / (stem if n == 1 else f"{stem}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise ConfigError(f"output_dir: cannot create a new evaluation folder under {root}")


def _write_outputs(out_dir: Path, results: dict[str, Any]) -> Path:
    from llava.eval.report import markdown_report, render_chart

    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / "report.md").write_text(markdown_report(results))
    render_chart(results, out_dir / "chart.png")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    config, overrides = job_arguments(argv, prog="python -m jobs.evaluate", description=__doc__.splitlines()[0],
                                      example="model=runs:/<id>/model", schema=EvaluateConfig)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = load_config(EvaluateConfig, config, overrides)
        results = run_evaluation(cfg)
    except (ConfigError, JudgeError, ModelURIError) as err:
        print(f"jobs.evaluate: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"model": cfg.model, "metrics": results["metrics"], "eval_run_id": results.get("eval_run_id"),
                      "output_dir": results["output_dir"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
