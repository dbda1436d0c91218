"""Pipeline manifests for the operator tests: the shipped examples and a small CPU-only one."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = REPO_ROOT / "operators" / "llava_operator" / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.yaml"))
CRD = REPO_ROOT / "charts" / "llava-platform" / "crds" / "llavapipelines.llava.dev.yaml"


def example_pipeline(name: str = "llava15-7b") -> dict:
    return yaml.safe_load((EXAMPLES_DIR / f"{name}.yaml").read_text())


def small_pipeline(name: str = "demo", *, max_attempts: int = 2, serving: bool = True) -> dict:
    """Every phase enabled, tiny CPU clusters, as a user would `kubectl apply` it."""
    stage = {"workers": {"replicas": 0, "cpu": "1", "memory": "2Gi"}}
    return {
        "apiVersion": "llava.dev/v1alpha1",
        "kind": "LlavaPipeline",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "data": {"sourceUri": "s3://bucket/raw/", "outputUri": "s3://bucket/processed/"},
            "models": {"vision": "tiny/clip", "language": "tiny/llama"},
            "stages": {
                "preprocess": {"config": "jobs/configs/preprocess_stage2.yaml", **copy.deepcopy(stage)},
                "stage1": {"config": "jobs/configs/tiny_stage1.yaml",
                           "overrides": ["model.vision=${models.vision}", "optim.max_steps=2"]},
                "stage2": {"config": "jobs/configs/tiny_stage2.yaml"},
                "evaluate": {"config": "jobs/configs/evaluate_pipeline.yaml"},
                "promote": {"config": "jobs/configs/promote_default.yaml",
                            "overrides": ["simple_gate.threshold=${gate.threshold}"]},
            },
            "cluster": {"head": {"cpu": "1", "memory": "2Gi"}, "workers": {"replicas": 0}},
            "evaluation": {"gate": {"metric": "shapes_accuracy", "threshold": 0.5}},
            "serving": {"enabled": serving, "auth": {"apiKeySecret": {"name": "llava-api-keys", "key": "api-key"}}},
            "retryPolicy": {"maxAttempts": max_attempts},
        },
    }
