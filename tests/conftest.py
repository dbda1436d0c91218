"""Shared fixtures live in tests/fixtures/*.py, loaded as plugins so every area can use them."""

import os

# DeepSpeed chooses its accelerator at import time; the test machines have no GPU.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Must be set before torch loads OpenMP; spinning OpenMP threads collapse on a busy 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.ray_cluster",
    "tests.fixtures.mlflow_server",
    "tests.fixtures.s3",
    "tests.fixtures.k8s",
    "tests.fixtures.distributed",
]
