"""Log a llava-hf directory as an MLflow Model: an MLflow 3 LoggedModel of the run that trained it.

The logged model is the pyfunc in `llava_platform/pyfunc_chat.py` (models from code, so it loads
where this project is not installed) with the llava-hf directory as its artifact `llava_hf`:

    <logged model artifacts>/MLmodel                 flavor, signature, input example, requirements
    <logged model artifacts>/artifacts/llava_hf/     the llava-hf files (transformers, vLLM read them)

It is named `model` after the run's artifact path, so `runs:/<run_id>/model` keeps naming it (MLflow 3
resolves that URI to the run's logged model of that name), and `registry.register_version` links the
registered version to it; evaluation logs its metrics against it (`log_model_metrics`).
"""

from __future__ import annotations

import base64
import io
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModel

MODEL_NAME = "model"
LLAVA_HF_ARTIFACT = "llava_hf"
LLAVA_HF_SUBDIR = f"artifacts/{LLAVA_HF_ARTIFACT}"
PYFUNC_FILE = Path(__file__).with_name("pyfunc_chat.py")
# What the pyfunc imports; pinned to the versions that exported the model (torch without its
# local build suffix, so a CUDA or CPU build of the same release both satisfy it).
REQUIREMENTS = ("mlflow", "torch", "transformers", "pillow")


class ModelLoggingError(RuntimeError):
    """The llava-hf directory cannot be logged as an MLflow Model."""


def pip_requirements() -> list[str]:
    pins = []
    for dist in REQUIREMENTS:
        try:
            pins.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            raise ModelLoggingError(f"{dist} is not installed; it is a requirement of the logged model") from None
    return pins


def chat_signature():
    """OpenAI chat format: messages whose content is a string or text / image_url parts."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, Object, Property, Schema

    message = Object([Property("role", "string"), Property("content", AnyType())])
    inputs = Schema([
        ColSpec(Array(message), "messages"),
        ColSpec("long", "max_tokens", required=False),
        ColSpec("double", "temperature", required=False),
    ])
    usage = Object([Property("prompt_tokens", "long"), Property("completion_tokens", "long"),
                    Property("total_tokens", "long")])
    outputs = Schema([ColSpec("string", "text"), ColSpec("string", "finish_reason"), ColSpec(usage, "usage")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def image_data_url(image) -> str:
    """A PIL image as a PNG data URL, the form the pyfunc takes images in."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def input_example(question: str = "What shape is in the image?") -> dict[str, Any]:
    from PIL import Image

    image = Image.new("RGB", (32, 32), (200, 40, 40))
    content = [{"type": "image_url", "image_url": {"url": image_data_url(image)}}, {"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 16, "temperature": 0.0}


def _llava_hf_source(llava_dir: Path, scratch: Path) -> Path:
    """pyfunc names the artifact's folder after its source folder: it must be called `llava_hf`."""
    if llava_dir.name == LLAVA_HF_ARTIFACT:
        return llava_dir
    dst = scratch / LLAVA_HF_ARTIFACT
    shutil.copytree(llava_dir, dst)
    return dst


def log_llava_model(
    run_id: str,
    llava_dir: str | Path,
    *,
    client: MlflowClient | None = None,
    name: str = MODEL_NAME,
    tags: dict[str, str] | None = None,
    metadata: dict[str, Any] | None = None,
    step: int = 0,
) -> str:
    """Log `llava_dir` as the MLflow Model `name` of `run_id`; returns the LoggedModel id.

    `metadata` goes into MLmodel's metadata (the model's own record, for whoever reads MLmodel);
    `tags` onto the LoggedModel (e.g. lineage of an adapter or merged export).
    """
    import mlflow.pyfunc
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    llava_dir = Path(llava_dir)
    if not (llava_dir / "config.json").is_file():
        raise ModelLoggingError(f"{llava_dir} has no config.json: not a llava-hf directory")
    client = client or MlflowClient()
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, tags=tags,
                                        model_type="llava")
    try:
        with tempfile.TemporaryDirectory(prefix="llava-mlmodel-") as tmp:
            out = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                path=str(out), python_model=str(PYFUNC_FILE),
                artifacts={LLAVA_HF_ARTIFACT: str(_llava_hf_source(llava_dir, Path(tmp)))},
                signature=chat_signature(), input_example=input_example(), pip_requirements=pip_requirements(),
                metadata=metadata,
                mlflow_model=Model(artifact_path=logged.artifact_location, run_id=run_id, model_id=logged.model_id,
                                   model_uuid=logged.model_id),
            )
            client.log_model_artifacts(logged.model_id, str(out))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
    except BaseException:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    client.finalize_logged_model(logged.model_id, "READY")
    return logged.model_id


def find_logged_model(client: MlflowClient, run_id: str, name: str = MODEL_NAME) -> LoggedModel | None:
    """The newest READY LoggedModel `name` of `run_id` (a retried export may have logged several)."""
    experiment_id = client.get_run(run_id).info.experiment_id
    found = client.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"name = '{name}' AND source_run_id = '{run_id}'",
        order_by=[{"field_name": "creation_time", "ascending": False}],
    )
    ready = [m for m in found if str(m.status).endswith("READY")]
    return ready[0] if ready else None


def log_model_metrics(client: MlflowClient, run_id: str, model_id: str, metrics: dict[str, float],
                      *, step: int = 0, timestamp_ms: int | None = None) -> None:
    """Record `metrics` in `run_id` linked to the LoggedModel, so its model page lists them."""
    import time

    from mlflow.entities import Metric

    ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
    batch = [Metric(key, float(value), ts, step, model_id=model_id, run_id=run_id) for key, value in metrics.items()]
    for start in range(0, len(batch), 1000):  # MLflow's log_batch limit
        client.log_batch(run_id, metrics=batch[start : start + 1000])
