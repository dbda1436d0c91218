"""Typed configuration: pydantic models are the schema, YAML files and `key=value` overrides the input.

Every config model in the project derives from `StrictModel`, so an unknown key or a bad value
fails with a message that names the dotted key, whether it came from YAML or the command line.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value); the value is read as YAML so types come out right."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        msg = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def validate_config(model: type[M], data: dict[str, Any], source: str = "config") -> M:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def load_config(model: type[M], path: str | Path | None, overrides: list[str] | None = None) -> M:
    """Read YAML at `path` (or start empty), apply dotted overrides, validate strictly."""
    data: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        source = str(path)
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    apply_overrides(data, list(overrides or []))
    return validate_config(model, data, source)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b": v}; used for MLflow params."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_digest(model: BaseModel) -> str:
    """Stable short digest of a config, for lineage tags."""
    blob = json.dumps(model.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def job_arguments(argv: list[str] | None, *, prog: str, description: str, example: str, schema: type[BaseModel],
                  config_required: bool = True, default_config: str | Path | None = None,
                  ) -> tuple[str | None, list[str]]:
    """The command line every job shares: `--config FILE` plus `key=value` overrides, and `--dry-run`.

    `--dry-run` validates the config and overrides against `schema` exactly as the run would
    (`load_config(schema, config or default_config, overrides)`), prints the effective config as
    YAML and exits like `--help` does: 0 when valid, 2 with the offending dotted key on stderr.
    It returns before the job touches Ray, MLflow or storage, so a pipeline's entrypoints can be
    checked anywhere (`llavactl pipeline render` output, CI) before a cluster runs them.
    """
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=config_required, help="YAML config (jobs/configs/*.yaml)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate config + overrides, print the effective config as YAML, and exit")
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    args = parser.parse_args(argv)
    if args.dry_run:
        raise SystemExit(dry_run(schema, args.config or default_config, args.overrides, prog=prog))
    return args.config, args.overrides


def dry_run(schema: type[BaseModel], config: str | Path | None, overrides: list[str], *, prog: str) -> int:
    """Print the effective config of a job as YAML (exit status 0), or the config error (status 2)."""
    import sys

    try:
        cfg = load_config(schema, config, overrides)
    except (ConfigError, OSError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0
