"""Registered versions are MLflow Models: a chatml stage 2 trained on Ray Train + DeepSpeed exports
a pyfunc LoggedModel; registered and aliased, it loads with `mlflow.pyfunc.load_model` in a Python
that cannot import this project, answers through `mlflow models serve`, and stops at `<|im_end|>`.
"""

from __future__ import annotations

import json
import os
import site
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from PIL import Image

from jobs.train import run_training
from jobs.train_config import TrainConfig
from llava_platform import registry as reg
from llava_platform.config import load_config
from llava_platform.logged_model import find_logged_model, image_data_url, input_example
from llava_platform.model_uri import resolve_model_dir, version_logged_model_id

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
IM_END = "<|im_end|>"


def _question(shapes_data) -> tuple[str, Image.Image]:
    item = json.loads(Path(shapes_data.root, "eval", "shapes_qa.jsonl").read_text().splitlines()[0])
    return item["question"], Image.open(Path(shapes_data.root, item["image"])).convert("RGB")


def _request(question: str, image: Image.Image, max_tokens: int = 48) -> dict:
    content = [{"type": "image_url", "image_url": {"url": image_data_url(image)}}, {"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0.0}


@pytest.fixture(scope="module")
def champion(ray_local, pretrained_checkpoints, shapes_data, tmp_path_factory):
    """A chatml stage 2 started from a `plain` stage-1 export (as the pipeline chains them),
    registered as `<name>@champion` in a sqlite store with local artifacts."""
    from llava.model.builder import build_llava, save_llava
    from llava.model.metadata import describe_model

    tmp = tmp_path_factory.mktemp("pyfunc")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    vision, lm = pretrained_checkpoints
    model, processor = build_llava(vision, lm, template="plain")
    stage1 = save_llava(model, processor, tmp / "stage1",
                        describe_model(processor, template="plain", image_mode="pad", base_vision=str(vision),
                                       base_language_model=str(lm), stage=1))
    cfg = load_config(TrainConfig, CONFIGS / "tiny_stage2.yaml", [
        f"model.vision={vision}", f"model.language_model={lm}", f"model.init_from={stage1}",
        f"data.records={shapes_data.stage2}", f"data.image_root={shapes_data.image_root}", "data.template=chatml",
        f"checkpoint.storage={tmp / 'ckpt'}", f"output={tmp / 'stage2'}", "optim.max_steps=40",
        "optim.global_batch=8", "optim.micro_batch=4", "distributed.num_workers=1",
        "checkpoint.every_n_steps=1000", "name=chatml-stage2",
    ])
    result = run_training(cfg)
    client = reg.get_client(uri)
    name = f"llava-{uuid.uuid4().hex[:6]}"
    version = reg.register_version(name, result.run_id, client=client)
    client.set_registered_model_alias(name, "champion", version)
    yield {"uri": uri, "name": name, "version": version, "run_id": result.run_id, "client": client,
           "output": Path(result.output), "stage1": stage1, "tmp": tmp}
    if saved_env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved_env


@pytest.mark.slow
def test_version_is_an_mlflow_model_linked_to_its_training_run(champion):
    client = champion["client"]
    mv = client.get_model_version(champion["name"], champion["version"])
    logged = find_logged_model(client, champion["run_id"])
    assert logged is not None and version_logged_model_id(mv) == logged.model_id
    assert mv.source == f"models:/{logged.model_id}" and mv.tags["llava.model_format"] == "mlflow-model"
    assert mv.run_id == champion["run_id"] and logged.source_run_id == champion["run_id"]
    from mlflow.models import Model

    location = Path(urlparse(logged.artifact_location).path)
    mlmodel = Model.load(str(location / "MLmodel"))
    inputs = {s["name"] for s in mlmodel.signature.inputs.to_dict()}
    assert inputs == {"messages", "max_tokens", "temperature"} and mlmodel.saved_input_example_info
    requirements = (location / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in requirements} >= {"mlflow", "torch", "transformers", "pillow"}
    assert all("==" in r for r in requirements if not r.startswith("-"))
    # the llava-hf files at the documented path, readable by plain transformers
    from transformers import LlavaForConditionalGeneration

    llava_hf = location / "artifacts" / "llava_hf"
    assert LlavaForConditionalGeneration.from_pretrained(llava_hf).config.model_type == "llava"
    assert resolve_model_dir(f"models:/{champion['name']}@champion", tracking_uri=champion["uri"]) == llava_hf


@pytest.mark.slow
def test_chatml_stage2_export_stops_at_im_end(champion, shapes_data):
    """Stage 1 saved `plain` stop tokens; the stage-2 export must carry chatml's end of turn."""
    from transformers import AutoTokenizer, GenerationConfig

    from llava.model.metadata import read_metadata

    out = champion["output"]
    im_end = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(IM_END)
    assert im_end not in GenerationConfig.from_pretrained(champion["stage1"]).eos_token_id
    assert im_end in GenerationConfig.from_pretrained(out).eos_token_id
    meta = read_metadata(out)
    assert meta.template == "chatml" and im_end in meta.stop_token_ids and meta.stage == 2
    assert meta.base_vision == read_metadata(champion["stage1"]).base_vision

    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(f"models:/{champion['name']}@champion")
    question, image = _question(shapes_data)
    [answer] = model.predict(_request(question, image, max_tokens=48))
    assert answer["finish_reason"] == "stop", answer  # ended on <|im_end|>, well inside the budget
    assert answer["usage"]["completion_tokens"] < 48 and "<|im_start|>" not in answer["text"]


ISOLATED = textwrap.dedent("""
    import json, sys
    for name in ("llava", "llava_platform", "jobs"):
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            sys.exit(f"{name} is importable: the check is not isolated")
    import mlflow.pyfunc
    model = mlflow.pyfunc.load_model(sys.argv[1])
    print("ANSWER " + json.dumps(model.predict(json.loads(sys.stdin.read()))))
""")


@pytest.mark.slow
def test_pyfunc_loads_where_the_project_is_not_installed(champion, shapes_data, tmp_path):
    """`python -S` skips site-packages' .pth files (the editable install of this project); only the
    venv's site-packages directory itself goes on the path: MLflow, torch, transformers, no llava."""
    question, image = _question(shapes_data)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": champion["uri"],
           "PYTHONPATH": os.pathsep.join(site.getsitepackages())}
    proc = subprocess.run([sys.executable, "-S", "-c", ISOLATED, f"models:/{champion['name']}@champion"],
                          input=json.dumps(_request(question, image)), capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [answer] = json.loads(proc.stdout.split("ANSWER ", 1)[1])
    assert isinstance(answer["text"], str) and answer["text"] and answer["finish_reason"] == "stop"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_on_invocations(champion, shapes_data, tmp_path):
    port = _free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    # the scoring server is started as `uvicorn` from PATH: the venv's bin directory must be on it
    env = {**os.environ, "MLFLOW_TRACKING_URI": champion["uri"],
           "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", f"models:/{champion['name']}@champion",
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{base}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow models serve did not come up: {proc.stderr.read()[-3000:] if proc.poll() else ''}")
            time.sleep(1)
        question, image = _question(shapes_data)
        reply = httpx.post(f"{base}/invocations", json={"inputs": _request(question, image)}, timeout=120)
        assert reply.status_code == 200, reply.text
        [answer] = reply.json()["predictions"]
        assert answer["text"] and answer["finish_reason"] == "stop"
        bad = httpx.post(f"{base}/invocations", timeout=60, json={"inputs": {
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]}})
        assert bad.status_code >= 400 and "data URL" in bad.text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_pyfunc_image_preparation_matches_the_model_library(tiny_processor):
    """The pyfunc restates LLaVA's pad-to-square (it cannot import llava); both must agree."""
    from llava.data.images import prepare_image as library_prepare
    from llava_platform.pyfunc_chat import decode_data_url, prepare_image, split_images

    image = Image.new("RGB", (50, 20), (10, 200, 30))
    decoded = decode_data_url(image_data_url(image))
    for mode in ("pad", "resize"):
        ours = prepare_image(decoded, tiny_processor.image_processor, mode)
        assert list(ours.getdata()) == list(library_prepare(image, tiny_processor.image_processor, mode).getdata())
    messages, images = split_images(input_example()["messages"])
    assert messages[0]["content"][0] == {"type": "image"} and len(images) == 1


@pytest.mark.parametrize("url,problem", [
    ("http://example.com/a.png", "must be a data URL"),
    ("data:text/plain;base64,aGk=", "expected data:image"),
    ("data:image/png;base64,@@@", "does not decode"),
    ("data:image/png;base64,aGVsbG8=", "not a readable image"),
])
def test_pyfunc_refuses_bad_image_urls_by_name(url, problem):
    from llava_platform.pyfunc_chat import ChatRequestError, split_images

    with pytest.raises(ChatRequestError, match=problem):
        split_images([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])


def test_versions_registered_the_old_way_still_resolve(mlflow_sqlite, tiny_llava_dir, tmp_path):
    """A run that logged a bare llava-hf directory (before MLflow Models) registers and resolves as before."""
    client = mlflow_sqlite.client()
    run_id = mlflow_sqlite.log_model_dir(tiny_llava_dir)
    name = f"old-{uuid.uuid4().hex[:6]}"
    version = reg.register_version(name, run_id, client=client)
    mv = client.get_model_version(name, version)
    assert mv.tags["llava.model_format"] == "llava-hf" and version_logged_model_id(mv) is None
    resolved = resolve_model_dir(f"models:/{name}/{version}", tmp_path / "cache", client=client)
    assert (resolved / "config.json").is_file() and not (resolved / "MLmodel").exists()


def test_evaluation_metrics_are_linked_to_the_logged_model(mlflow_sqlite, tiny_llava_dir, shapes_data, tmp_path,
                                                           monkeypatch):
    """As the pipeline runs it: evaluate runs:/<stage-2 run>/model, then register; the metrics sit
    on the LoggedModel (its model page) and the version points at the training run."""
    from jobs.evaluate import EvaluateConfig, run_evaluation
    from llava_platform.logged_model import log_llava_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_sqlite.tracking_uri)
    client = mlflow_sqlite.client()
    experiment = mlflow_sqlite.new_experiment("linked")
    run_id = client.create_run(experiment).info.run_id
    model_id = log_llava_model(run_id, tiny_llava_dir, client=client)
    client.set_terminated(run_id)
    cfg = load_config(EvaluateConfig, CONFIGS / "evaluate_shapes.yaml", [
        f"model=runs:/{run_id}/model", f"data_dir={shapes_data.root}", f"output_dir={tmp_path / 'eval'}",
        "shapes.limit=2", "scienceqa.limit=2", "tracking.record_on_version=false",
        f"tracking.experiment={client.get_experiment(experiment).name}"])
    results = run_evaluation(cfg)
    logged = client.get_logged_model(model_id)
    linked = {m.key: m.run_id for m in logged.metrics or []}
    assert linked["shapes.accuracy"] == results["eval_run_id"] and "scienceqa.accuracy" in linked
    assert client.get_run(results["eval_run_id"]).data.tags["llava.model_id"] == model_id
    name = f"linked-{uuid.uuid4().hex[:6]}"
    mv = client.get_model_version(name, reg.register_version(name, run_id, client=client))
    assert mv.run_id == run_id and version_logged_model_id(mv) == model_id
