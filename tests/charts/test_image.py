"""The runtime image definition agrees with the chart and the operator (it is not built in CI)."""

from __future__ import annotations

import re

import yaml

from llava_operator.spec import OperatorSettings
from tests.charts.helm_render import CHART, REPO_ROOT

DOCKERFILE = REPO_ROOT / "platform" / "images" / "Dockerfile"


def test_image_ray_version_matches_chart_and_operator():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=rayproject/ray:([0-9.]+)-py3\d+$", text, re.M)
    assert base, "the image must build on the official Ray image"
    chart_version = yaml.safe_load((CHART / "values.yaml").read_text())["rayVersion"]
    assert base.group(1) == chart_version == OperatorSettings().ray_version


def test_image_runs_unprivileged_and_ships_the_operator():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER (\S+)", text, re.M)
    # Root only for the OS packages layer; the image runs (and installs Python packages) unprivileged.
    assert users and not users[-1].startswith(("root", "0"))
    root_part = text[text.index("USER root"):text.index(f"USER {users[-1]}")] if "USER root" in text else ""
    assert "pip install" not in root_part
    assert re.search(r"^COPY .* operators ", text, re.M) and re.search(r"^COPY .* jobs ", text, re.M)
    assert "llava_operator.handlers" in text
    assert '"torch==2.13.0"' in text, "torch stays pinned to the project's version"
