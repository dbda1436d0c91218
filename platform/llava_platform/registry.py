"""Model registry on MLflow: versions with lineage, gated promotion, alias history and rollback.

Works against any tracking/registry URI MLflow understands (sqlite for the embedded default, an
`mlflow server` over HTTP with S3 artifacts on Kubernetes). Every operation is written so that a
retry after a crash or a timeout converges on the same state instead of duplicating it:

- `register_version` finds the version already made from the same run + artifact path;
- alias moves are recorded in the registered model's alias history *before* the alias is set,
  and the alias is always re-derived from that history, so a half-finished move is completed by
  the retry rather than applied twice.

The history is one tag per entry (`llava.alias_history.<seq>.<time>.<nonce>`), never a read-
modify-write of one shared value: MLflow has no compare-and-set, and two promotions rewriting one
JSON list would each drop the other's entry. Entries sort by sequence number (the count of entries
the writer saw, so sequential writers order correctly whatever their clocks), then time and
nonce; after writing its entry a writer points the alias at the top of the replayed history and
reads it again until that stops changing, so concurrent moves converge on one alias holder with
every entry kept. Histories written by earlier versions (one JSON list in `llava.alias_history`)
are read first.

Evaluation metrics live on the version as tags `metric.<name>` (written by `jobs.evaluate`), which
is what the promotion gate reads.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from llava_platform.config import StrictModel, load_config

if TYPE_CHECKING:  # mlflow is heavy; imported inside functions
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

HISTORY_TAG = "llava.alias_history"  # earlier versions: the whole history as one JSON list (read only)
HISTORY_ENTRY_PREFIX = HISTORY_TAG + "."  # one tag per entry
METRIC_PREFIX = "metric."
LINEAGE_PREFIX = "llava.lineage."
# Bounded so the JSON stays far below MLflow's tag value limit; older entries are dropped first.
HISTORY_MAX_ENTRIES = 200
CHAMPION = "champion"
CANDIDATE = "candidate"
_log = logging.getLogger(__name__)


class RegistryError(RuntimeError):
    """A registry operation that cannot be carried out (missing version, bad request)."""


# --------------------------------------------------------------------------- client


def get_client(tracking_uri: str | None = None, registry_uri: str | None = None) -> MlflowClient:
    """An MlflowClient; with no URIs given MLflow falls back to MLFLOW_TRACKING_URI."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)


def _client(client: MlflowClient | None) -> MlflowClient:
    return client if client is not None else get_client()


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", ""))


def _is_missing(exc: Exception) -> bool:
    return "RESOURCE_DOES_NOT_EXIST" in _error_code(exc) or "NOT_FOUND" in _error_code(exc)


# How each database MLflow's registry runs on reports two writers inserting the same row at once:
# its alias write checks for the row, then inserts it, so concurrent first writes of one alias race.
_WRITE_CONFLICTS = ("UNIQUE constraint failed", "duplicate key value", "Duplicate entry", "database is locked")


def _is_write_conflict(exc: Exception) -> bool:
    return any(marker in str(exc) for marker in _WRITE_CONFLICTS)


# --------------------------------------------------------------------------- registration


def ensure_registered_model(name: str, *, client: MlflowClient | None = None, description: str | None = None):
    """Get the registered model `name`, creating it when missing (safe under a concurrent create)."""
    from mlflow.exceptions import MlflowException

    client = _client(client)
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if not _is_missing(exc):
            raise
    try:
        return client.create_registered_model(name, description=description)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in _error_code(exc):
            raise
        return client.get_registered_model(name)


def _version_source(client: MlflowClient, run_id: str, artifact_path: str) -> str:
    run = client.get_run(run_id)
    base = run.info.artifact_uri.rstrip("/")
    return f"{base}/{artifact_path.strip('/')}" if artifact_path else base


def _registration_source(client: MlflowClient, run_id: str, artifact_path: str) -> tuple[str, str | None]:
    """The run's LoggedModel named `artifact_path` (an MLflow Model: `models:/<model id>`), else, for
    runs that logged a bare llava-hf directory, that artifact directory itself."""
    from llava_platform.logged_model import find_logged_model

    logged = find_logged_model(client, run_id, artifact_path.strip("/")) if artifact_path.strip("/") else None
    if logged is not None:
        return f"models:/{logged.model_id}", logged.model_id
    return _version_source(client, run_id, artifact_path), None


def find_version_for_run(
    name: str, run_id: str, artifact_path: str = "model", *, client: MlflowClient | None = None
) -> ModelVersion | None:
    """The version of `name` registered from `run_id`/`artifact_path`, if one exists."""
    client = _client(client)
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    wanted = artifact_path.strip("/")
    for mv in sorted(found, key=lambda v: int(v.version)):
        if (mv.tags or {}).get("llava.artifact_path", wanted) == wanted:
            return mv
    return None


def register_version(
    name: str,
    run_id: str,
    artifact_path: str = "model",
    tags: dict[str, Any] | None = None,
    *,
    client: MlflowClient | None = None,
    candidate_alias: str | None = CANDIDATE,
    description: str | None = None,
) -> str:
    """Register the model logged under `artifact_path` of `run_id` as a version of `name`: the run's
    MLflow Model of that name (linked to the version as its LoggedModel), or a bare llava-hf artifact
    directory for runs from before models were logged as MLflow Models.

    Idempotent: a second call for the same run and artifact path returns the existing version
    (its tags are refreshed). The new version gets `candidate_alias` unless that is None.
    Returns the version number as a string.
    """
    client = _client(client)
    ensure_registered_model(name, client=client)
    existing = find_version_for_run(name, run_id, artifact_path, client=client)
    all_tags = {"llava.run_id": run_id, "llava.artifact_path": artifact_path.strip("/")}
    all_tags.update({k: _tag_value(v) for k, v in (tags or {}).items()})
    if existing is None:
        source, model_id = _registration_source(client, run_id, artifact_path)
        all_tags["llava.model_format"] = "mlflow-model" if model_id else "llava-hf"
        mv = client.create_model_version(name, source, run_id=run_id, tags=all_tags, description=description,
                                         model_id=model_id)
        version = str(mv.version)
        _wait_ready(client, name, version)
    else:
        version = str(existing.version)
        for key, value in all_tags.items():
            if (existing.tags or {}).get(key) != value:
                client.set_model_version_tag(name, version, key, value)
    if candidate_alias:
        _move_alias(client, name, candidate_alias, version, action="register", reason=None)
    return version


def _wait_ready(client: MlflowClient, name: str, version: str, timeout_s: float = 60.0) -> None:
    """File/sqlite/HTTP stores create versions READY at once; other stores may copy asynchronously."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_model_version(name, version).status)
        if status == "READY":
            return
        if status == "FAILED_REGISTRATION":
            raise RegistryError(f"{name} version {version}: registration failed")
        if time.monotonic() > deadline:
            raise RegistryError(f"{name} version {version}: still {status} after {timeout_s:.0f}s")
        time.sleep(0.5)


def _tag_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


# --------------------------------------------------------------------------- lineage and metrics


def code_version() -> str:
    """git sha of the checkout this code runs from (`+dirty` when modified), else the package version."""
    repo = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        if sha:
            return f"git:{sha}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"pkg:llava-platform=={version('llava-platform')}"
    except PackageNotFoundError:
        return "unknown"


def set_lineage(
    name: str,
    version: str,
    *,
    client: MlflowClient | None = None,
    data_uris: dict[str, str] | list[str] | None = None,
    manifest_digests: dict[str, str] | None = None,
    stage1_run_id: str | None = None,
    config_digest: str | None = None,
    code: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Tag a version with where it came from. Returns the tags written (re-running rewrites the same)."""
    client = _client(client)
    tags: dict[str, str] = {"code_version": code or code_version()}
    if data_uris is not None:
        tags["data_uris"] = _tag_value(data_uris)
    if manifest_digests is not None:
        tags["manifest_digests"] = _tag_value(manifest_digests)
    if stage1_run_id:
        tags["stage1_run_id"] = stage1_run_id
    if config_digest:
        tags["config_digest"] = config_digest
    for key, value in (extra or {}).items():
        tags[key] = _tag_value(value)
    written = {f"{LINEAGE_PREFIX}{k}": v for k, v in tags.items()}
    for key, value in written.items():
        client.set_model_version_tag(name, str(version), key, value)
    return written


def set_version_metrics(
    name: str,
    version: str,
    metrics: dict[str, float],
    *,
    client: MlflowClient | None = None,
    eval_run_id: str | None = None,
) -> None:
    """Record evaluation metrics on the version as `metric.<name>` tags (what the gate reads)."""
    client = _client(client)
    for key, value in metrics.items():
        client.set_model_version_tag(name, str(version), f"{METRIC_PREFIX}{key}", repr(float(value)))
    if eval_run_id:
        client.set_model_version_tag(name, str(version), "llava.eval_run_id", eval_run_id)


def version_metrics(mv: ModelVersion) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in (mv.tags or {}).items():
        if key.startswith(METRIC_PREFIX):
            try:
                out[key[len(METRIC_PREFIX):]] = float(value)
            except ValueError:
                continue
    return out


def version_lineage(mv: ModelVersion) -> dict[str, str]:
    return {k[len(LINEAGE_PREFIX):]: v for k, v in (mv.tags or {}).items() if k.startswith(LINEAGE_PREFIX)}


def find_runs(client: MlflowClient, filter_string: str, max_results: int = 1) -> list:
    """Runs matching `filter_string` across every experiment, newest first."""
    ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return []
    return list(client.search_runs(ids, filter_string, max_results=max_results, order_by=["attributes.start_time DESC"]))


def find_pipeline_run(client: MlflowClient, pipeline_id: str, phase: str):
    """The newest run a job logged for `phase` of pipeline `pipeline_id` (tags set by every job)."""
    runs = find_runs(client, f"tags.`llava.pipeline_id` = '{pipeline_id}' and tags.`llava.phase` = '{phase}'")
    return runs[0] if runs else None


def attach_eval_run(name: str, version: str, eval_run_id: str, *, client: MlflowClient | None = None) -> dict:
    """Copy an evaluation run's metrics onto a version (the evaluation may predate the registration)."""
    client = _client(client)
    metrics = dict(client.get_run(eval_run_id).data.metrics)
    set_version_metrics(name, version, metrics, client=client, eval_run_id=eval_run_id)
    return metrics


def _data_digest(uri: str) -> tuple[str | None, str | None]:
    """(sha256 of a data manifest/records file, None), or (None, why it cannot be read from here).
    Only storage errors count as unreadable: anything else is a bug and raises."""
    import hashlib

    from llava_platform import storage

    try:
        return "sha256:" + hashlib.sha256(storage.read_bytes(uri)).hexdigest(), None
    except storage.StorageError as err:
        return None, str(err)


def _data_digests(run_id: str, data_uris: dict[str, str], tags: dict[str, str]) -> tuple[dict, dict]:
    """Digests of the run's data (recorded by the job, else computed here) and, for each file that
    could not be read, the reason: lineage without a digest is recorded as such, never silently."""
    digests: dict[str, str] = {}
    unavailable: dict[str, str] = {}
    for key, uri in data_uris.items():
        digest, why = tags.get(f"llava.data_digest.{key}"), None
        if not digest:
            digest, why = _data_digest(uri)
        if digest:
            digests[key] = digest
        else:
            unavailable[key] = why or "unknown"
            _log.warning("lineage of run %s: no digest of the %s data (%s)", run_id, key, why)
    return digests, unavailable


def collect_lineage(client: MlflowClient, stage2_run_id: str, stage1_run_id: str | None = None) -> dict[str, Any]:
    """Lineage of a stage-2 run from what the training jobs logged: their config params and tags."""
    import hashlib

    run = client.get_run(stage2_run_id)
    params, tags = dict(run.data.params), dict(run.data.tags)
    data_uris: dict[str, str] = {}
    if params.get("data.records"):
        data_uris["stage2"] = params["data.records"]
    if stage1_run_id is None and tags.get("llava.pipeline_id"):
        found = find_pipeline_run(client, tags["llava.pipeline_id"], "stage1")
        stage1_run_id = found.info.run_id if found else None
    if stage1_run_id is None and tags.get("mlflow.parentRunId"):
        # embedded runs carry no pipeline id; stage 1 is then the sibling under the same parent run
        siblings = find_runs(client, f"tags.`mlflow.parentRunId` = '{tags['mlflow.parentRunId']}' "
                                     "and tags.`llava.phase` = 'stage1'")
        stage1_run_id = siblings[0].info.run_id if siblings else None
    if stage1_run_id:
        records = client.get_run(stage1_run_id).data.params.get("data.records")
        if records:
            data_uris["stage1"] = records
    digests, unavailable = _data_digests(stage2_run_id, data_uris, tags)
    extra: dict[str, Any] = {}
    if params.get("model.init_from"):
        extra["init_from"] = params["model.init_from"]
    for key in ("base_model", "adapter"):  # LoRA runs (jobs/train_worker.py): the base and its adapter
        if tags.get(f"llava.{key}"):
            extra[key] = tags[f"llava.{key}"]
    if unavailable:
        extra["digest_unavailable"] = unavailable
    config_digest = tags.get("llava.config_digest") or hashlib.sha256(
        json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    code = tags.get("llava.code_version") or (
        f"git:{tags['mlflow.source.git.commit']}" if tags.get("mlflow.source.git.commit") else None)
    return {"data_uris": data_uris, "manifest_digests": digests, "stage1_run_id": stage1_run_id,
            "config_digest": config_digest, "code": code or code_version(), "extra": extra or None}


# --------------------------------------------------------------------------- gate


class MetricBound(StrictModel):
    min: float | None = None
    max: float | None = None


class RegressionRule(StrictModel):
    # metric -> which direction is better; compared against the current champion's value.
    metrics: dict[str, Literal["higher", "lower"]] = {}
    # absolute slack: a candidate may be this much worse than the champion and still pass.
    tolerance: float = 0.0


class GateConfig(StrictModel):
    thresholds: dict[str, MetricBound] = {}
    regression: RegressionRule = RegressionRule()
    # A version with no evaluation metrics at all is refused (only `force` with a reason moves the
    # alias): with no thresholds and no champion yet, nothing else would stop an unevaluated model.
    require_evaluation: bool = True


def load_gate(path: str | Path | None, overrides: list[str] | None = None) -> GateConfig:
    return load_config(GateConfig, path, overrides)


def default_gate() -> GateConfig:
    """Shipped default: no absolute floors, no more than 2 points worse than the champion."""
    return GateConfig(
        regression=RegressionRule(
            metrics={"shapes.accuracy": "higher", "scienceqa.accuracy": "higher"}, tolerance=0.02
        )
    )


@dataclass
class GateCheck:
    metric: str
    kind: str  # "min" | "max" | "regression"
    value: float | None
    bound: float | None
    passed: bool
    detail: str


@dataclass
class GateDecision:
    name: str
    version: str
    alias: str
    passed: bool  # the gate itself (before any --force)
    promoted: bool  # alias points at `version` after the call
    forced: bool = False
    noop: bool = False  # alias already pointed there
    previous: str | None = None
    reason: str | None = None
    checks: list[GateCheck] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_gate(
    gate: GateConfig, candidate: dict[str, float], champion: dict[str, float] | None
) -> tuple[bool, list[GateCheck]]:
    """Pure gate logic: evaluation present, thresholds on the candidate, then no regression against
    the champion."""
    checks: list[GateCheck] = []
    if gate.require_evaluation and not candidate:
        checks.append(GateCheck("metric.*", "evaluated", None, None, False,
                                "no evaluation metrics on the candidate (metric.* tags): evaluate it first, "
                                "or force with a reason"))
    for metric, bound in sorted(gate.thresholds.items()):
        value = candidate.get(metric)
        for kind, limit in (("min", bound.min), ("max", bound.max)):
            if limit is None:
                continue
            if value is None:
                checks.append(GateCheck(metric, kind, None, limit, False, f"{metric} missing on candidate"))
                continue
            ok = value >= limit if kind == "min" else value <= limit
            op = ">=" if kind == "min" else "<="
            detail = f"{metric}={value:.4g} {op} {limit:.4g}" if ok else f"{metric}={value:.4g} not {op} {limit:.4g}"
            checks.append(GateCheck(metric, kind, value, limit, ok, detail))
    if champion is not None:
        tol = gate.regression.tolerance
        for metric, better in sorted(gate.regression.metrics.items()):
            value, ref = candidate.get(metric), champion.get(metric)
            if ref is None:  # nothing to regress against (the champion predates this metric)
                checks.append(
                    GateCheck(metric, "regression", value, None, True, f"{metric}: champion has no value, skipped")
                )
                continue
            if value is None:
                checks.append(GateCheck(metric, "regression", None, ref, False, f"{metric} missing on candidate"))
                continue
            ok = value >= ref - tol if better == "higher" else value <= ref + tol
            word = "within" if ok else "regresses beyond"
            detail = f"{metric}={value:.4g} vs champion {ref:.4g}: {word} tolerance {tol:.4g}"
            checks.append(GateCheck(metric, "regression", value, ref, ok, detail))
    return all(c.passed for c in checks), checks


# --------------------------------------------------------------------------- alias history


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _actor() -> str:
    explicit = os.environ.get("LLAVA_ACTOR")
    if explicit:
        return explicit
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _history_json(name: str, key: str, raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{name}: tag {key} is not valid JSON ({exc})") from None


def _entry_tags(tags: dict[str, str]) -> list[str]:
    """The per-entry history tag keys, oldest first (sequence, then time, then nonce)."""
    return sorted(k for k in tags if k.startswith(HISTORY_ENTRY_PREFIX))


def alias_history(name: str, *, client: MlflowClient | None = None) -> list[dict[str, Any]]:
    """Every recorded alias move of `name`, oldest first."""
    client = _client(client)
    tags = client.get_registered_model(name).tags or {}
    history: list[dict[str, Any]] = []
    if tags.get(HISTORY_TAG):
        legacy = _history_json(name, HISTORY_TAG, tags[HISTORY_TAG])
        history += list(legacy) if isinstance(legacy, list) else []
    history += [_history_json(name, key, tags[key]) for key in _entry_tags(tags)]
    return history


def _append_history(client: MlflowClient, name: str, entry: dict[str, Any], seen: int) -> None:
    """Add one entry as its own tag; `seen` is how many entries the writer read before deciding.
    Entries beyond HISTORY_MAX_ENTRIES are pruned oldest first."""
    import time
    import uuid

    key = f"{HISTORY_ENTRY_PREFIX}{seen:08d}.{time.time_ns():020d}.{uuid.uuid4().hex[:8]}"
    client.set_registered_model_tag(name, key, json.dumps(entry))
    keys = _entry_tags(client.get_registered_model(name).tags or {})
    for old in keys[: max(0, len(keys) - HISTORY_MAX_ENTRIES)]:
        _delete_model_tag(client, name, old)


def _delete_model_tag(client: MlflowClient, name: str, key: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model_tag(name, key)
    except MlflowException as exc:
        if not _is_missing(exc):  # a concurrent writer pruned it first
            raise


def _set_alias(client: MlflowClient, name: str, alias: str, version: str, attempts: int = 6) -> None:
    """`set_registered_model_alias`, retried (with jittered backoff) when the registry's database
    reports a concurrent writer of the same row; any other error is raised at once."""
    import random
    import time

    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException as exc:
            if attempt == attempts - 1 or not _is_write_conflict(exc):
                raise
            _log.info("%s@%s: concurrent alias write (%s); retrying", name, alias, exc.error_code)
            time.sleep(random.uniform(0, 0.05 * 2**attempt))


def _settle_alias(client: MlflowClient, name: str, alias: str, attempts: int = 20) -> str | None:
    """Point `alias` at the top of its replayed history, then read the history again until it no
    longer changes underneath: the last writer's final read sees every entry, so concurrent
    moves end on one holder. Returns that holder (None when the history holds no version)."""
    target = None
    for _ in range(attempts):
        stack = replay_stack(alias_history(name, client=client), alias)
        if stack and stack[-1] == target:
            return target
        if not stack:
            return None
        target = stack[-1]
        if current_alias_version(name, alias, client=client) != target:
            _set_alias(client, name, alias, target)
    raise RegistryError(f"{name}@{alias}: its history kept changing over {attempts} reads; retry the move")


def replay_stack(history: list[dict[str, Any]], alias: str) -> list[str]:
    """The versions `alias` has held, oldest first, with rolled-back ones popped off."""
    stack: list[str] = []
    for entry in history:
        if entry.get("alias") != alias:
            continue
        if entry.get("action") == "rollback":
            if stack:
                stack.pop()
        elif entry.get("to") is not None:
            if not stack and entry.get("from") is not None:
                # the alias was set before any recorded history (by hand, or an older tool): keep that
                # holder so a rollback can return to it
                stack.append(str(entry["from"]))
            stack.append(str(entry["to"]))
    return stack


def current_alias_version(name: str, alias: str, *, client: MlflowClient | None = None) -> str | None:
    from mlflow.exceptions import MlflowException

    client = _client(client)
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if _is_missing(exc) or "INVALID_PARAMETER_VALUE" in _error_code(exc):
            return None
        raise


def _move_alias(
    client: MlflowClient, name: str, alias: str, version: str, *, action: str, reason: str | None
) -> str | None:
    """Record then apply `alias -> version`. Returns the version the alias held before (None if none).

    History first: if the process dies between the two writes, the retry sees its own entry on top
    of the history and only sets the alias.
    """
    previous = current_alias_version(name, alias, client=client)
    history = alias_history(name, client=client)
    stack = replay_stack(history, alias)
    if not (stack and stack[-1] == version):
        entry = {"alias": alias, "action": action, "from": previous, "to": version, "who": _actor(),
                 "when": _now(), "reason": reason}
        _append_history(client, name, entry, len(history))
    _settle_alias(client, name, alias)
    return previous


# --------------------------------------------------------------------------- promotion and rollback


def promote(
    name: str,
    version: str,
    alias: str = CHAMPION,
    gate: GateConfig | None = None,
    force: bool = False,
    reason: str | None = None,
    *,
    client: MlflowClient | None = None,
) -> GateDecision:
    """Point `alias` at `version` if it passes the gate (or `force` with a `reason`).

    The gate compares the version's `metric.*` tags with thresholds and with the version the alias
    points at now. A first promotion (no current holder) only faces the thresholds.
    """
    client = _client(client)
    version = str(version)
    if force and not (reason and reason.strip()):
        raise RegistryError("a forced promotion needs a reason (--reason TEXT)")
    mv = _get_version(client, name, version)
    current = current_alias_version(name, alias, client=client)
    decision = GateDecision(name=name, version=version, alias=alias, passed=True, promoted=False,
                            previous=current, reason=reason if force else None)
    if current == version and not _pending(client, name, alias, version):
        decision.noop = decision.promoted = True
        decision.reasons.append(f"{alias} already points at version {version}")
        return decision
    champion_metrics = None
    if current is not None and current != version:
        champion_metrics = version_metrics(_get_version(client, name, current))
    passed, checks = evaluate_gate(gate or default_gate(), version_metrics(mv), champion_metrics)
    decision.passed, decision.checks = passed, checks
    decision.reasons = [c.detail for c in checks if not c.passed] if not passed else [c.detail for c in checks]
    if current is None:
        decision.reasons.append(f"first {alias}: no regression check")
    if not passed and not force:
        return decision
    if not passed:
        decision.forced = True
        decision.reasons.append(f"forced: {reason}")
        client.set_model_version_tag(name, version, f"llava.forced_reason.{alias}", reason or "")
    client.set_model_version_tag(name, version, f"llava.gate.{alias}", json.dumps(
        {"passed": passed, "forced": decision.forced, "against": current, "when": _now(),
         "checks": [asdict(c) for c in checks]}))
    action = "force" if decision.forced else "promote"
    _move_alias(client, name, alias, version, action=action, reason=reason if decision.forced else None)
    decision.promoted = True
    return decision


def _pending(client: MlflowClient, name: str, alias: str, version: str) -> bool:
    """True when the alias points at `version` but the history does not record it (set by hand)."""
    stack = replay_stack(alias_history(name, client=client), alias)
    return not (stack and stack[-1] == version)


def _get_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if _is_missing(exc):
            raise RegistryError(f"registered model {name!r} has no version {version}") from None
        raise


@dataclass
class RollbackResult:
    name: str
    alias: str
    from_version: str | None
    to_version: str
    noop: bool = False


def rollback(
    name: str, alias: str = CHAMPION, *, client: MlflowClient | None = None, expect_current: str | None = None
) -> RollbackResult:
    """Move `alias` back to the version it held before its current one; the move is recorded.

    `expect_current` makes a retried rollback idempotent: if the alias no longer holds that version
    because an earlier attempt already rolled it back, nothing more happens.
    """
    client = _client(client)
    current = current_alias_version(name, alias, client=client)
    history = alias_history(name, client=client)
    stack = replay_stack(history, alias)
    last = next((e for e in reversed(history) if e.get("alias") == alias), None)
    if expect_current is not None and current != str(expect_current):
        if last and last.get("action") == "rollback" and last.get("from") == str(expect_current):
            if current != last.get("to"):
                _set_alias(client, name, alias, last["to"])
            return RollbackResult(name, alias, str(expect_current), str(last["to"]), noop=True)
        raise RegistryError(f"{name}@{alias} is {current}, not {expect_current}; refusing to roll back")
    if stack and current != stack[-1] and last and last.get("action") == "rollback":
        # An earlier rollback was recorded but its alias write never landed: finish it, don't repeat it.
        _set_alias(client, name, alias, stack[-1])
        return RollbackResult(name, alias, current, stack[-1], noop=True)
    if current is None:
        raise RegistryError(f"{name} has no {alias!r} alias to roll back")
    if len(stack) < 2 or stack[-1] != current:
        raise RegistryError(f"{name}@{alias}: no earlier {alias} recorded in the alias history to roll back to")
    target = stack[-2]
    _append_history(client, name, {"alias": alias, "action": "rollback", "from": current, "to": target,
                                   "who": _actor(), "when": _now(), "reason": None}, len(history))
    return RollbackResult(name, alias, current, _settle_alias(client, name, alias) or target)


# --------------------------------------------------------------------------- listing


def describe_version(mv: ModelVersion, aliases: list[str] | None = None) -> dict[str, Any]:
    return {
        "name": mv.name,
        "version": str(mv.version),
        "aliases": sorted(aliases if aliases is not None else list(getattr(mv, "aliases", []) or [])),
        "run_id": mv.run_id,
        "source": mv.source,
        "status": str(mv.status),
        "created": datetime.fromtimestamp((mv.creation_timestamp or 0) / 1000, timezone.utc).isoformat(
            timespec="seconds"),
        "metrics": version_metrics(mv),
        "lineage": version_lineage(mv),
        "tags": {k: v for k, v in (mv.tags or {}).items()
                 if not k.startswith((METRIC_PREFIX, LINEAGE_PREFIX))},
    }


def list_versions(name: str, *, client: MlflowClient | None = None) -> list[dict[str, Any]]:
    """All versions of `name`, newest first, with aliases, metrics and lineage."""
    client = _client(client)
    rm = client.get_registered_model(name)
    by_version: dict[str, list[str]] = {}
    for alias, ver in (rm.aliases or {}).items():
        by_version.setdefault(str(ver), []).append(alias)
    versions = client.search_model_versions(f"name = '{name}'")
    out = [describe_version(mv, by_version.get(str(mv.version), [])) for mv in versions]
    return sorted(out, key=lambda d: int(d["version"]), reverse=True)


def list_models(*, client: MlflowClient | None = None) -> list[dict[str, Any]]:
    client = _client(client)
    out = []
    for rm in client.search_registered_models():
        latest = max((int(v.version) for v in (rm.latest_versions or [])), default=None)
        out.append({"name": rm.name, "aliases": {a: str(v) for a, v in (rm.aliases or {}).items()},
                    "latest_version": str(latest) if latest is not None else None})
    return sorted(out, key=lambda d: d["name"])
