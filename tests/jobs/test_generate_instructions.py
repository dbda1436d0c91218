"""jobs.generate_instructions end to end: a real HTTP teacher on loopback, local and S3 storage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.generate_instructions import main
from llava.datagen.prompts import BOX_LINE, load_prompt_dir
from llava.datagen.rule_teacher import TASK_TYPES
from llava_platform import storage
from tests.datagen.teacher_server import TeacherServer
from tests.paths import REFERENCE

CAPS = REFERENCE / "caps_boxes_coco2014_val_80.jsonl"
pytestmark = pytest.mark.skipif(not REFERENCE.is_dir(), reason="shared reference data not present")


def _records() -> list[dict]:
    return [json.loads(line) for line in CAPS.read_text().splitlines()]


def _outputs(out: str) -> tuple[list[dict], list[dict], dict]:
    records = json.loads(storage.read_text(storage.join(out, "instructions.json")))
    rejects = [json.loads(line) for uri in storage.list_files(storage.join(out, "rejects"))
               for line in storage.read_text(uri).splitlines()]
    return records, rejects, json.loads(storage.read_text(storage.join(out, "summary.json")))


@pytest.fixture
def teacher(monkeypatch):
    monkeypatch.setenv("TEACHER_TEST_KEY", "sk-test")
    prompts = load_prompt_dir(REFERENCE / "prompts")
    with TeacherServer(system_to_type={p.system_message: t for t, p in prompts.items()}) as srv:
        yield srv


def _openai_args(teacher: TeacherServer, out: Path, *extra: str) -> list[str]:
    return ["--config", "jobs/configs/generate_openai.yaml", f"input={CAPS}", f"output={out}",
            f"prompts_dir={REFERENCE / 'prompts'}", f"teacher.base_url={teacher.base_url}",
            "teacher.model=teacher-test", "teacher.api_key_env=TEACHER_TEST_KEY", "teacher.backoff_base_s=0.01",
            "teacher.backoff_max_s=0.02", "teacher.concurrency=8", "chunk_size=50", *extra]


def test_reference_records_through_http_teacher_with_faults_then_resume(teacher, tmp_path):
    records = _records()
    bad, flaky = records[3], records[7]
    # every request about `bad` gets a malformed reply; `flaky` first meets a 429, a 500 and a 503
    teacher.plan(bad["captions"][0], "malformed", "malformed", "malformed")
    teacher.plan(flaky["captions"][0], "429", "500", "503")
    out = tmp_path / "gen"
    assert main(_openai_args(teacher, out)) == 0
    produced, rejects, summary = _outputs(str(out))
    ids = {r["id"] for r in produced}
    expected = {f"{r['id']}_{t}" for r in records for t in TASK_TYPES}
    assert ids == expected - {f"{bad['id']}_{t}" for t in TASK_TYPES}
    assert sorted(r["id"] for r in rejects) == sorted(f"{bad['id']}_{t}" for t in TASK_TYPES)
    assert {r["reason"].split(":")[0] for r in rejects} == {"unexpected_block"}
    assert all(r["record"]["id"] == bad["id"] and r["reply"] for r in rejects)
    assert summary["produced"] == len(expected) - 3 and summary["rejected_by_reason"] == {"unexpected_block": 3}
    by_type = {t: [r for r in produced if r["id"].endswith(t)] for t in TASK_TYPES}
    assert all(len(v) == len(records) - 1 for v in by_type.values())
    assert all(len(r["conversations"]) == 2 for r in by_type["complex_reasoning"] + by_type["detail_description"])
    assert all(r["image"].endswith(".jpg") for r in produced)
    # the conversation prompt carried captions only, the others captions and boxes (as the shots do)
    prompts = load_prompt_dir(REFERENCE / "prompts")
    queries: dict[str, set[str]] = {t: set() for t in TASK_TYPES}
    for body in teacher.requests:  # retried requests repeat: compare the sets of distinct queries
        task = next(t for t, p in prompts.items() if p.system_message == body["messages"][0]["content"])
        queries[task].add(body["messages"][-1]["content"])
    assert not any(BOX_LINE.search(q) for q in queries["conversation"])
    assert queries["detail_description"] == queries["complex_reasoning"]
    assert sum(bool(BOX_LINE.search(q)) for q in queries["detail_description"]) >= len(records) - 5

    # resume: only the three rejected ids are asked again (and now succeed)
    before = len(teacher.requests)
    assert main(_openai_args(teacher, out)) == 0
    produced2, _, summary2 = _outputs(str(out))
    assert len(teacher.requests) - before == 3
    assert summary2["skipped_existing"] == len(expected) - 3 and summary2["produced"] == 3
    assert {r["id"] for r in produced2} == expected
    assert len(produced2) == len(expected)


def test_few_shot_order_is_deterministic_by_seed(teacher, tmp_path):
    def shots(run: str, seed: int) -> dict[str, list[str]]:
        teacher.requests.clear()
        assert main(_openai_args(teacher, tmp_path / run, "limit=6", f"seed={seed}")) == 0
        return {b["messages"][-1]["content"] + b["messages"][0]["content"]:
                [m["content"] for m in b["messages"][1:-1]] for b in teacher.requests}

    first, again, other = shots("a", 1), shots("b", 1), shots("c", 2)
    assert first == again and first != other


def test_rule_teacher_over_s3_is_resumable(s3_bucket, tmp_path):
    src = f"s3://{s3_bucket}/in/caps.jsonl"
    lines = CAPS.read_text().splitlines()[:12]
    storage.write_text(src, "\n".join(lines + ['{"id": "broken", "captions": []}', "{not json"]) + "\n")
    out = f"s3://{s3_bucket}/out/instruct"
    args = ["--config", "jobs/configs/generate_rule.yaml", f"input={src}", f"output={out}",
            "teacher.noun=object", "chunk_size=7", "max_reject_fraction=0.2"]
    assert main([*args, "limit=5"]) == 0  # a first, partial run (as if it had been interrupted)
    assert main(args) == 0
    produced, rejects, summary = _outputs(out)
    assert len(produced) == 12 * 3 and len({r["id"] for r in produced}) == 36
    assert summary["skipped_existing"] == 15 and summary["produced"] == 21
    reasons = sorted(r["reason"].split(":")[0] for r in rejects if r["id"] in ("broken", "line-14"))
    assert reasons == ["bad_input", "bad_json"]
    assert storage.list_files(storage.join(out, "parts"))[0].endswith("part-000-00000.jsonl")


def test_bad_config_and_missing_key_exit_with_a_message(tmp_path, capsys, monkeypatch):
    assert main(["--config", "jobs/configs/generate_rule.yaml", "teacher.flavour=x"]) == 2
    assert "teacher.flavour: unknown key" in capsys.readouterr().err
    monkeypatch.delenv("NOT_SET_KEY_VAR", raising=False)
    code = main(["--config", "jobs/configs/generate_openai.yaml", f"input={CAPS}", f"output={tmp_path}",
                 "teacher.api_key_env=NOT_SET_KEY_VAR"])
    assert code == 2 and "NOT_SET_KEY_VAR" in capsys.readouterr().err


def test_llavactl_data_generate_against_http_teacher(teacher, tmp_path):
    import argparse

    from llava_platform.commands import data

    parser = argparse.ArgumentParser(prog="llavactl")
    data.register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli"
    args = parser.parse_args(["data", "generate", "--input", str(CAPS), "--output", str(out), "--teacher", "openai",
                              "--base-url", teacher.base_url, "--model", "teacher-test",
                              "--api-key-env", "TEACHER_TEST_KEY", "--prompts-dir", str(REFERENCE / "prompts"),
                              "--types", "conversation", "detail_description", "--seed", "3", "limit=4"])
    assert args.func(args) == 0
    produced, rejects, summary = _outputs(str(out))
    assert sorted(r["id"] for r in produced) == sorted(f"{r['id']}_{t}" for r in _records()[:4]
                                                       for t in ("conversation", "detail_description"))
    assert rejects == [] and summary["config"]["seed"] == 3 and len(teacher.requests) == 8


def test_missing_prompt_directory_is_an_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TEACHER_TEST_KEY", "sk-test")
    code = main(["--config", "jobs/configs/generate_openai.yaml", f"input={CAPS}", f"output={tmp_path}",
                 "teacher.api_key_env=TEACHER_TEST_KEY", f"prompts_dir={tmp_path / 'nope'}"])
    assert code == 2 and "prompt directory not found" in capsys.readouterr().err
