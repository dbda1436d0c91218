"""Registry behaviour on a real MLflow store: registration, lineage, gate tables, rollback, retries.

Most tests use the embedded sqlite store; one end-to-end test repeats the core flow against a real
`mlflow server` over HTTP with S3 (moto) artifacts.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from llava_platform import registry as reg
from llava_platform.registry import GateConfig, MetricBound, RegistryError, RegressionRule


def _model_dir(tmp_path: Path, tag: str) -> Path:
    """A stand-in artifact directory; the registry never looks inside it."""
    d = tmp_path / f"model-{tag}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llava", "tag": tag}))
    return d


@pytest.fixture
def backend(mlflow_sqlite):
    return mlflow_sqlite


@pytest.fixture
def name() -> str:
    return f"llava-{uuid.uuid4().hex[:6]}"


def _register(backend, tmp_path, name, tag, metrics=None) -> str:
    client = backend.client()
    run_id = backend.log_model_dir(_model_dir(tmp_path, tag))
    version = reg.register_version(name, run_id, client=client)
    if metrics is not None:
        reg.set_version_metrics(name, version, metrics, client=client)
    return version


GATE = GateConfig(
    thresholds={"shapes.accuracy": MetricBound(min=0.5), "judge.unparseable_rate": MetricBound(max=0.1)},
    regression=RegressionRule(metrics={"shapes.accuracy": "higher", "latency_s": "lower"}, tolerance=0.02),
)


def test_register_is_idempotent_and_points_at_run_artifacts(backend, tmp_path, name):
    client = backend.client()
    run_id = backend.log_model_dir(_model_dir(tmp_path, "a"))
    v1 = reg.register_version(name, run_id, client=client, tags={"stage": "2"})
    v2 = reg.register_version(name, run_id, client=client, tags={"stage": "2"})
    assert v1 == v2 == "1"
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 1
    mv = versions[0]
    assert mv.run_id == run_id
    assert mv.source == client.get_run(run_id).info.artifact_uri.rstrip("/") + "/model"
    assert mv.tags["stage"] == "2"
    # registration makes the version the candidate
    assert reg.current_alias_version(name, "candidate", client=client) == "1"
    # a different run is a new version
    assert _register(backend, tmp_path, name, "b") == "2"
    assert reg.current_alias_version(name, "candidate", client=client) == "2"


def test_lineage_tags_round_trip(backend, tmp_path, name):
    client = backend.client()
    version = _register(backend, tmp_path, name, "a")
    written = reg.set_lineage(
        name, version, client=client,
        data_uris={"stage2": "s3://data/instruct/"}, manifest_digests={"stage2": "sha256:abc"},
        stage1_run_id="r-stage1", config_digest="0123abcd",
    )
    assert written["llava.lineage.stage1_run_id"] == "r-stage1"
    (described,) = reg.list_versions(name, client=client)
    lineage = described["lineage"]
    assert json.loads(lineage["data_uris"]) == {"stage2": "s3://data/instruct/"}
    assert json.loads(lineage["manifest_digests"]) == {"stage2": "sha256:abc"}
    assert lineage["config_digest"] == "0123abcd"
    assert lineage["code_version"].startswith(("git:", "pkg:"))


# Gate table: (candidate metrics, champion metrics or None, passes?)
GATE_CASES = [
    ({"shapes.accuracy": 0.8, "judge.unparseable_rate": 0.0}, None, True),  # first champion, thresholds ok
    ({"shapes.accuracy": 0.4, "judge.unparseable_rate": 0.0}, None, False),  # below min
    ({"shapes.accuracy": 0.8, "judge.unparseable_rate": 0.2}, None, False),  # above max
    ({"judge.unparseable_rate": 0.0}, None, False),  # thresholded metric missing
    ({"shapes.accuracy": 0.79, "judge.unparseable_rate": 0.0}, {"shapes.accuracy": 0.80}, True),  # in tolerance
    ({"shapes.accuracy": 0.70, "judge.unparseable_rate": 0.0}, {"shapes.accuracy": 0.80}, False),  # regression
    ({"shapes.accuracy": 0.9, "judge.unparseable_rate": 0.0, "latency_s": 2.0},
     {"shapes.accuracy": 0.8, "latency_s": 1.0}, False),  # lower-is-better metric got worse
    ({"shapes.accuracy": 0.9, "judge.unparseable_rate": 0.0, "latency_s": 1.01},
     {"shapes.accuracy": 0.8, "latency_s": 1.0}, True),
    ({"shapes.accuracy": 0.9, "judge.unparseable_rate": 0.0}, {"shapes.accuracy": 0.8, "latency_s": 1.0},
     False),  # champion has latency, candidate lacks it
]


@pytest.mark.parametrize(("candidate", "champion", "expected"), GATE_CASES)
def test_gate_table(candidate, champion, expected):
    passed, checks = reg.evaluate_gate(GATE, candidate, champion)
    assert passed is expected
    assert all(c.detail for c in checks)
    assert passed == all(c.passed for c in checks)


def test_promote_pass_fail_force_and_rollback(backend, tmp_path, name):
    client = backend.client()
    v1 = _register(backend, tmp_path, name, "a", {"shapes.accuracy": 0.8, "judge.unparseable_rate": 0.0})
    first = reg.promote(name, v1, gate=GATE, client=client)
    assert first.promoted and first.passed and first.previous is None
    assert any("first champion" in r for r in first.reasons)

    v2 = _register(backend, tmp_path, name, "b", {"shapes.accuracy": 0.6, "judge.unparseable_rate": 0.0})
    refused = reg.promote(name, v2, gate=GATE, client=client)
    assert not refused.promoted and not refused.passed
    assert any("regresses" in r for r in refused.reasons)
    assert reg.current_alias_version(name, "champion", client=client) == v1

    with pytest.raises(RegistryError, match="reason"):
        reg.promote(name, v2, gate=GATE, force=True, client=client)
    forced = reg.promote(name, v2, gate=GATE, force=True, reason="hotfix for tokenizer", client=client)
    assert forced.promoted and forced.forced and not forced.passed
    assert reg.current_alias_version(name, "champion", client=client) == v2
    assert client.get_model_version(name, v2).tags["llava.forced_reason.champion"] == "hotfix for tokenizer"

    v3 = _register(backend, tmp_path, name, "c", {"shapes.accuracy": 0.61, "judge.unparseable_rate": 0.0})
    assert reg.promote(name, v3, gate=GATE, client=client).promoted

    back = reg.rollback(name, client=client)
    assert (back.from_version, back.to_version) == (v3, v2)
    back = reg.rollback(name, client=client)
    assert (back.from_version, back.to_version) == (v2, v1)
    with pytest.raises(RegistryError, match="no earlier"):
        reg.rollback(name, client=client)
    assert reg.current_alias_version(name, "champion", client=client) == v1

    history = [e for e in reg.alias_history(name, client=client) if e["alias"] == "champion"]
    assert [(e["action"], e["from"], e["to"]) for e in history] == [
        ("promote", None, v1), ("force", v1, v2), ("promote", v2, v3), ("rollback", v3, v2), ("rollback", v2, v1),
    ]
    assert history[1]["reason"] == "hotfix for tokenizer"
    assert all(e["who"] and e["when"] for e in history)


def test_retries_are_idempotent(backend, tmp_path, name):
    client = backend.client()
    v1 = _register(backend, tmp_path, name, "a", {"shapes.accuracy": 0.8, "judge.unparseable_rate": 0.0})
    v2 = _register(backend, tmp_path, name, "b", {"shapes.accuracy": 0.9, "judge.unparseable_rate": 0.0})
    reg.promote(name, v1, gate=GATE, client=client)
    reg.promote(name, v2, gate=GATE, client=client)
    again = reg.promote(name, v2, gate=GATE, client=client)
    assert again.noop and again.promoted
    champion_entries = [e for e in reg.alias_history(name, client=client) if e["alias"] == "champion"]
    assert len(champion_entries) == 2

    # A rollback retried with the version it meant to move away from does not roll back twice.
    first = reg.rollback(name, client=client, expect_current=v2)
    retry = reg.rollback(name, client=client, expect_current=v2)
    assert first.to_version == retry.to_version == v1 and retry.noop
    assert reg.current_alias_version(name, "champion", client=client) == v1


def test_promotion_interrupted_between_history_and_alias_is_completed_by_retry(backend, tmp_path, name):
    client = backend.client()
    v1 = _register(backend, tmp_path, name, "a", {"shapes.accuracy": 0.8, "judge.unparseable_rate": 0.0})
    v2 = _register(backend, tmp_path, name, "b", {"shapes.accuracy": 0.9, "judge.unparseable_rate": 0.0})
    reg.promote(name, v1, gate=GATE, client=client)

    class AliasWriteFails:
        """The real client, except that the alias write dies as a dropped connection would."""

        def __getattr__(self, attr):
            return getattr(client, attr)

        def set_registered_model_alias(self, *args, **kwargs):
            raise ConnectionError("connection reset")

    with pytest.raises(ConnectionError):
        reg.promote(name, v2, gate=GATE, client=AliasWriteFails())
    assert reg.current_alias_version(name, "champion", client=client) == v1
    done = reg.promote(name, v2, gate=GATE, client=client)
    assert done.promoted
    assert reg.current_alias_version(name, "champion", client=client) == v2
    entries = [e for e in reg.alias_history(name, client=client) if e["alias"] == "champion"]
    assert [(e["from"], e["to"]) for e in entries] == [(None, v1), (v1, v2)]


def test_unknown_version_and_empty_rollback_fail_clearly(backend, tmp_path, name):
    client = backend.client()
    _register(backend, tmp_path, name, "a", {"shapes.accuracy": 0.8})
    with pytest.raises(RegistryError, match="no version 7"):
        reg.promote(name, "7", client=client)
    with pytest.raises(RegistryError, match="no 'champion' alias"):
        reg.rollback(name, client=client)


def test_gate_config_file_is_strict(tmp_path):
    good = tmp_path / "gate.yaml"
    good.write_text("thresholds:\n  shapes.accuracy: {min: 0.3}\nregression:\n  metrics: {shapes.accuracy: higher}\n")
    gate = reg.load_gate(good, ["regression.tolerance=0.05"])
    assert gate.thresholds["shapes.accuracy"].min == 0.3 and gate.regression.tolerance == 0.05
    bad = tmp_path / "bad.yaml"
    bad.write_text("thresholds:\n  shapes.accuracy: {minimum: 0.3}\n")
    with pytest.raises(ValueError, match="minimum"):
        reg.load_gate(bad)


def test_registry_over_http_server_with_s3_artifacts(mlflow_server, tmp_path, name):
    client = mlflow_server.client()
    v1 = _register(mlflow_server, tmp_path, name, "a", {"shapes.accuracy": 0.8, "judge.unparseable_rate": 0.0})
    assert _register(mlflow_server, tmp_path, name, "b", {"shapes.accuracy": 0.5}) == "2"
    assert reg.promote(name, v1, gate=GATE, client=client).promoted
    assert not reg.promote(name, "2", gate=GATE, client=client).promoted
    assert reg.promote(name, "2", gate=GATE, force=True, reason="manual", client=client).forced
    assert reg.rollback(name, client=client).to_version == v1
    listed = {d["version"]: d for d in reg.list_versions(name, client=client)}
    assert listed[v1]["aliases"] == ["champion"] and listed["2"]["aliases"] == ["candidate"]
    assert listed[v1]["metrics"]["shapes.accuracy"] == pytest.approx(0.8)
    # the artifacts really went to S3 through the server
    import boto3

    s3 = boto3.client("s3", endpoint_url=mlflow_server.s3_endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=mlflow_server.bucket)["Contents"]]
    assert any(k.endswith("model/config.json") for k in keys)


# --------------------------------------------------------------------------- CLI and promote job


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    import argparse

    from llava_platform.commands import models as models_cmd

    parser = argparse.ArgumentParser(prog="llavactl")
    models_cmd.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_models_cli_list_show_promote_rollback(backend, tmp_path, name, capsys):
    client = backend.client()
    v1 = _register(backend, tmp_path, name, "a", {"shapes.accuracy": 0.8, "scienceqa.accuracy": 0.7})
    reg.set_lineage(name, v1, client=client, data_uris={"stage2": "data/stage2.json"}, config_digest="cafe")
    v2 = _register(backend, tmp_path, name, "b", {"shapes.accuracy": 0.5, "scienceqa.accuracy": 0.7})
    uri = ["--tracking-uri", backend.tracking_uri]
    gate = tmp_path / "gate.yaml"
    gate.write_text("regression:\n  metrics: {shapes.accuracy: higher}\n  tolerance: 0.05\n")

    code, out, _ = _cli(["models", "promote", name, v1, "--gate", str(gate), *uri], capsys)
    assert code == 0 and "PROMOTED" in out
    code, out, _ = _cli(["models", "promote", name, v2, "--gate", str(gate), *uri], capsys)
    assert code == 3 and "REFUSED" in out and "shapes.accuracy=0.5" in out
    code, _, err = _cli(["models", "promote", name, v2, "--force", *uri], capsys)
    assert code == 2 and "--reason" in err
    code, out, _ = _cli(["models", "promote", name, v2, "--force", "--reason", "needed for demo", *uri], capsys)
    assert code == 0 and "FORCED" in out

    code, out, _ = _cli(["models", "list", name, "--json", *uri], capsys)
    listed = {d["version"]: d for d in json.loads(out)[name]}
    assert listed[v2]["aliases"] == ["candidate", "champion"]
    assert listed[v2]["tags"]["llava.forced_reason.champion"] == "needed for demo"
    assert listed[v1]["lineage"]["config_digest"] == "cafe"
    code, out, _ = _cli(["models", "list", *uri], capsys)
    assert code == 0 and f"{name}: 2 version(s)" in out and "shapes.accuracy=0.8" in out
    code, out, _ = _cli(["models", "show", name, v1, *uri], capsys)
    assert code == 0 and "config_digest=cafe" in out and "source:" in out

    code, out, _ = _cli(["models", "rollback", name, *uri], capsys)
    assert code == 0 and f"v{v2} -> v{v1}" in out
    assert reg.current_alias_version(name, "champion", client=client) == v1
    code, out, _ = _cli(["models", "history", name, "--json", *uri], capsys)
    actions = [e["action"] for e in json.loads(out) if e["alias"] == "champion"]
    assert actions == ["promote", "force", "rollback"]
    code, _, err = _cli(["models", "show", name, "9", *uri], capsys)
    assert code == 1 and "no version 9" in err


def test_models_cli_without_a_store_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit, match="no MLflow store"):
        _cli(["models", "list", "--workdir", str(tmp_path / "none")], capsys)


def test_promote_job_registers_attaches_eval_and_gates(backend, tmp_path, name, monkeypatch):
    from mlflow import MlflowClient

    from jobs.promote import main as promote_main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    client = backend.client()
    pipeline = f"pipe-{uuid.uuid4().hex[:6]}"
    exp = backend.new_experiment("train")
    records = tmp_path / "stage2.json"
    records.write_text("[]")

    def train_and_eval(tag: str, accuracy: float) -> str:
        stage2 = MlflowClient(backend.tracking_uri).create_run(
            exp, tags={"llava.pipeline_id": f"{pipeline}-{tag}", "llava.phase": "stage2"})
        run_id = stage2.info.run_id
        client.log_param(run_id, "data.records", str(records))
        client.log_artifacts(run_id, str(_model_dir(tmp_path, tag)), "model")
        client.set_terminated(run_id)
        ev = client.create_run(exp, tags={"llava.pipeline_id": f"{pipeline}-{tag}", "llava.phase": "evaluate"})
        client.log_metric(ev.info.run_id, "shapes.accuracy", accuracy)
        client.set_terminated(ev.info.run_id)
        return run_id

    first = train_and_eval("a", 0.8)
    second = train_and_eval("b", 0.4)
    config = str(Path(__file__).resolve().parents[2] / "jobs/configs/promote_default.yaml")
    common = [f"tracking_uri={backend.tracking_uri}", f"model_name={name}", "experiment=promote-test"]
    monkeypatch.setenv("LLAVA_PIPELINE_ID", f"{pipeline}-a")
    assert promote_main(["--config", config, *common]) == 0
    assert promote_main(["--config", config, *common]) == 0  # a retried job changes nothing
    monkeypatch.setenv("LLAVA_PIPELINE_ID", f"{pipeline}-b")
    assert promote_main(["--config", config, *common]) == 3
    assert promote_main(["--config", config, *common, "fail_on_refusal=false"]) == 0

    versions = {d["version"]: d for d in reg.list_versions(name, client=client)}
    assert len(versions) == 2
    assert versions["1"]["run_id"] == first and versions["2"]["run_id"] == second
    assert versions["1"]["aliases"] == ["champion"]
    assert versions["2"]["metrics"] == {"shapes.accuracy": 0.4}
    lineage = versions["1"]["lineage"]
    assert json.loads(lineage["data_uris"]) == {"stage2": str(records)}
    assert json.loads(lineage["manifest_digests"])["stage2"].startswith("sha256:")
    # the job's own run records the refusal for the operator to find
    runs = reg.find_runs(client, f"tags.`llava.pipeline_id` = '{pipeline}-b' and tags.`llava.phase` = 'promote'", 5)
    assert runs and all(r.data.tags["llava.promoted"] == "false" for r in runs)
    forced = promote_main(["--config", config, *common, "force=true", "reason=accepting lower accuracy"])
    assert forced == 0
    assert reg.current_alias_version(name, "champion", client=client) == "2"
    assert not (tmp_path / "mlruns").exists()


def test_collect_lineage_finds_stage1_by_pipeline_or_parent(backend, tmp_path):
    client = backend.client()
    exp = backend.new_experiment("lineage")
    records = tmp_path / "records.json"
    records.write_text('[{"id": "a"}]')
    parent = client.create_run(exp).info.run_id
    stage1 = client.create_run(exp, tags={"mlflow.parentRunId": parent, "llava.phase": "stage1"}).info.run_id
    client.log_param(stage1, "data.records", "s3://data/stage1.json")
    stage2 = client.create_run(exp, tags={"mlflow.parentRunId": parent, "llava.phase": "stage2",
                                          "mlflow.source.git.commit": "abc123"}).info.run_id
    client.log_param(stage2, "data.records", str(records))
    client.log_param(stage2, "model.init_from", "/work/models/stage1")
    lineage = reg.collect_lineage(client, stage2)
    assert lineage["stage1_run_id"] == stage1
    assert lineage["data_uris"] == {"stage2": str(records), "stage1": "s3://data/stage1.json"}
    import hashlib

    assert lineage["manifest_digests"] == {"stage2": "sha256:" + hashlib.sha256(records.read_bytes()).hexdigest()}
    assert lineage["code"] == "git:abc123" and lineage["extra"]["init_from"] == "/work/models/stage1"
    # stage 1's records are not readable from here: said so in the lineage, not silently left out
    assert "s3://data/stage1.json" in lineage["extra"]["digest_unavailable"]["stage1"]
    assert lineage["config_digest"] == reg.collect_lineage(client, stage2)["config_digest"]  # stable


def test_alias_set_outside_the_history_can_still_be_rolled_back_to(backend, tmp_path, name):
    client = backend.client()
    v1 = _register(backend, tmp_path, name, "a", {"shapes.accuracy": 0.8})
    v2 = _register(backend, tmp_path, name, "b", {"shapes.accuracy": 0.9})
    client.set_registered_model_alias(name, "champion", v1)  # by hand, e.g. in the MLflow UI
    assert reg.promote(name, v2, client=client).promoted
    assert reg.rollback(name, client=client).to_version == v1


def test_eight_concurrent_promotions_keep_every_history_entry(mlflow_server, tmp_path, name):
    """Eight promoters at once against one `mlflow server`: every move is in the history, and the
    alias ends on the version the replayed history puts on top."""
    import threading

    client = mlflow_server.client()
    versions = [_register(mlflow_server, tmp_path, name, f"c{i}", {"shapes.accuracy": 0.9, "scienceqa.accuracy": 0.9})
                for i in range(8)]
    start = threading.Barrier(len(versions))
    errors: list[BaseException] = []

    def promote(version: str) -> None:
        try:
            start.wait()
            assert reg.promote(name, version, client=mlflow_server.client()).promoted
        except BaseException as exc:  # surfaced below: a thread's exception would be lost
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    champion = [e for e in reg.alias_history(name, client=client) if e["alias"] == "champion"]
    assert sorted(e["to"] for e in champion) == sorted(versions)
    assert reg.current_alias_version(name, "champion", client=client) == reg.replay_stack(champion, "champion")[-1]
    # and the history stays usable: a rollback moves to the entry below the top
    back = reg.rollback(name, client=client)
    assert back.to_version == reg.replay_stack(champion, "champion")[-2]


class _RacingClient:
    """A real client whose first alias writes fail as MLflow's server answers when another writer
    inserted the same alias row a moment earlier (seen in CI with eight concurrent promotions)."""

    def __init__(self, client, conflicts: int, message: str):
        self._client, self.conflicts, self.message, self.alias_writes = client, conflicts, message, 0

    def __getattr__(self, attr):
        return getattr(self._client, attr)

    def set_registered_model_alias(self, name, alias, version):
        from mlflow.exceptions import MlflowException

        self.alias_writes += 1
        if self.conflicts:
            self.conflicts -= 1
            raise MlflowException(self.message, error_code="BAD_REQUEST")
        return self._client.set_registered_model_alias(name, alias, version)


def test_a_concurrent_alias_write_is_retried_and_other_errors_are_not(backend, tmp_path, name):
    from mlflow.exceptions import MlflowException

    client = backend.client()
    version = _register(backend, tmp_path, name, "a", {"shapes.accuracy": 0.9, "scienceqa.accuracy": 0.9})
    racing = _RacingClient(client, 2, "(sqlite3.IntegrityError) UNIQUE constraint failed: registered_model_aliases.name")
    assert reg.promote(name, version, client=racing).promoted
    assert racing.alias_writes == 3
    assert reg.current_alias_version(name, "champion", client=client) == version

    other = _register(backend, tmp_path, name, "b", {"shapes.accuracy": 0.95, "scienceqa.accuracy": 0.95})
    broken = _RacingClient(client, 1, "PERMISSION_DENIED: not allowed")
    with pytest.raises(MlflowException, match="not allowed"):
        reg.promote(name, other, client=broken)
    assert broken.alias_writes == 1


def test_default_gate_refuses_an_unevaluated_first_model_unless_forced(backend, tmp_path, name):
    client = backend.client()
    version = _register(backend, tmp_path, name, "a")  # no metric.* tags
    refused = reg.promote(name, version, client=client)
    assert not refused.promoted and not refused.passed
    assert any("no evaluation metrics" in r for r in refused.reasons)
    assert reg.current_alias_version(name, "champion", client=client) is None
    forced = reg.promote(name, version, force=True, reason="smoke-test model, evaluated by hand", client=client)
    assert forced.promoted and forced.forced
    assert reg.current_alias_version(name, "champion", client=client) == version


def test_history_written_as_one_json_tag_by_earlier_versions_is_still_read(backend, tmp_path, name):
    client = backend.client()
    v1 = _register(backend, tmp_path, name, "a", {"shapes.accuracy": 0.8})
    v2 = _register(backend, tmp_path, name, "b", {"shapes.accuracy": 0.9})
    legacy = [{"alias": "champion", "action": "promote", "from": None, "to": v1, "who": "x", "when": "t", "reason": None}]
    client.set_registered_model_tag(name, reg.HISTORY_TAG, json.dumps(legacy))
    client.set_registered_model_alias(name, "champion", v1)
    assert reg.promote(name, v2, client=client).promoted
    assert [(e["from"], e["to"]) for e in reg.alias_history(name, client=client) if e["alias"] == "champion"] == [
        (None, v1), (v1, v2)]
    assert reg.rollback(name, client=client).to_version == v1


def test_a_data_file_that_cannot_be_digested_is_recorded_in_the_lineage(backend, tmp_path, s3_bucket):
    client = backend.client()
    exp = backend.new_experiment("digest")
    stage2 = client.create_run(exp).info.run_id
    client.log_param(stage2, "data.records", str(tmp_path / "gone.json"))  # deleted since training
    lineage = reg.collect_lineage(client, stage2)
    assert lineage["manifest_digests"] == {}
    assert "gone.json" in lineage["extra"]["digest_unavailable"]["stage2"]
    other = client.create_run(exp).info.run_id
    client.log_param(other, "data.records", f"s3://{s3_bucket}/missing/stage2.json")
    reason = reg.collect_lineage(client, other)["extra"]["digest_unavailable"]["stage2"]
    assert "missing/stage2.json" in reason and "NoSuchKey" in reason
