"""GPT-assisted instruction generation: captions + boxes -> LLaVA instruction records.

    python -m jobs.generate_instructions --config jobs/configs/generate_rule.yaml input=... output=...

For each input record (the schema of caps_boxes_coco2014_val_80.jsonl) and each requested type
(conversation, detail_description, complex_reasoning) the teacher is asked for a reply, either
the rule-based teacher or an OpenAI-compatible endpoint prompted with a system message and few-shot
examples. Replies are parsed into LLaVA records. Output layout (local path or s3://):

    <output>/parts/part-RRR-CCCCC.jsonl     produced records, one file per chunk (R = run, C = chunk)
    <output>/rejects/part-RRR-CCCCC.jsonl   {id, source_id, task_type, reason, reply, record}
    <output>/instructions.json              all produced records merged, sorted by id (LLaVA JSON list)
    <output>/summary.json                   counts of this run and of the whole output

Resumable: ids already in parts/ are skipped, so a re-run after a crash only asks for what is
missing; rejected ids are asked again. Few-shot sampling depends only on (seed, id, type).
"""

from __future__ import annotations

import json
import logging
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from llava.datagen.parse import ReplyParseError, reply_to_record
from llava.datagen.prompts import PromptError, build_messages, load_prompt_dir
from llava.datagen.rule_teacher import TASK_TYPES, RuleTeacher
from llava_platform import storage
from llava_platform.config import ConfigError, StrictModel, config_digest, job_arguments, load_config
from llava_platform.teacher_client import TeacherClient, TeacherError, TeacherSettings

log = logging.getLogger("jobs.generate_instructions")
TaskType = Literal["conversation", "detail_description", "complex_reasoning"]


class TeacherConfig(StrictModel):
    kind: Literal["rule", "openai"] = "rule"
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    api_key_env: str | None = "OPENAI_API_KEY"
    concurrency: int = Field(4, ge=1, le=256)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(5, ge=0, le=20)
    backoff_base_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    temperature: float = Field(0.2, ge=0, le=2)
    max_tokens: int = Field(1024, ge=16)
    noun: str = "object"  # rule teacher: what to call the objects ("shape" for synthetic data)


class GenerateConfig(StrictModel):
    input: str
    output: str
    task_types: list[TaskType] = Field(default_factory=lambda: list(TASK_TYPES), min_length=1)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    prompts_dir: str | None = None  # None: the project's prompts in llava/datagen/prompts
    seed: int = 0
    num_shots: int | None = Field(None, ge=0)
    limit: int | None = Field(None, ge=1)
    chunk_size: int = Field(64, ge=1)
    image_prefix: str = ""  # prepended to each input record's `image` in the output records
    max_reject_fraction: float = Field(0.5, ge=0, le=1)


@dataclass
class RunStats:
    requested: int = 0
    skipped: int = 0
    produced: int = 0
    rejected: Counter = field(default_factory=Counter)


def read_input(uri: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(records, rejects) from a JSONL file; broken lines and records without captions are rejects."""
    records, rejects = [], []
    for number, line in enumerate(storage.read_text(uri).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            rejects.append({"id": f"line-{number}", "reason": f"bad_json: line {number}: {err.msg}", "record": line})
            continue
        if not isinstance(record, dict) or not record.get("id") or not record.get("captions"):
            rejects.append({"id": str(record.get("id", f"line-{number}")) if isinstance(record, dict)
                            else f"line-{number}", "reason": "bad_input: record needs 'id' and 'captions'",
                            "record": record})
            continue
        records.append(record)
    return records, rejects


def produced_ids(output: str) -> tuple[set[str], int]:
    """Ids already written under parts/, and the number of earlier runs (for part names)."""
    ids: set[str] = set()
    runs: set[str] = set()
    for uri in storage.list_files(storage.join(output, "parts")):
        name = uri.rsplit("/", 1)[-1]
        if not name.endswith(".jsonl"):
            continue
        runs.add(name.split("-")[1])
        for line in storage.read_text(uri).splitlines():
            if line.strip():
                ids.add(json.loads(line)["id"])
    return ids, len(runs)


class Generator:
    def __init__(self, cfg: GenerateConfig):
        self.cfg = cfg
        self.rule = RuleTeacher(noun=cfg.teacher.noun, seed=cfg.seed)
        self.prompts = load_prompt_dir(cfg.prompts_dir, list(cfg.task_types)) if cfg.teacher.kind == "openai" else {}
        self.client = None
        if cfg.teacher.kind == "openai":
            t = cfg.teacher
            self.client = TeacherClient(TeacherSettings(
                base_url=t.base_url, model=t.model, api_key_env=t.api_key_env, concurrency=t.concurrency,
                timeout_s=t.timeout_s, max_retries=t.max_retries, backoff_base_s=t.backoff_base_s,
                backoff_max_s=t.backoff_max_s, temperature=t.temperature, max_tokens=t.max_tokens))

    def replies(self, jobs: list[tuple[dict[str, Any], str]]) -> list[tuple[str | None, str | None]]:
        """(reply, error) per (record, task type)."""
        if self.client is None:
            out: list[tuple[str | None, str | None]] = []
            for record, task in jobs:
                try:
                    out.append((self.rule.reply(record, task), None))
                except ValueError as err:
                    out.append((None, f"bad_input: {err}"))
            return out
        requests = [(i, build_messages(self.prompts[task], record, seed=self.cfg.seed,
                                       num_shots=self.cfg.num_shots)) for i, (record, task) in enumerate(jobs)]
        results = self.client.complete_many(requests)
        return [(r.text, None if r.error is None else f"teacher_error: {r.error}") for r in results]

    def to_record(self, record: dict[str, Any], task: str, reply: str) -> dict[str, Any]:
        rng = random.Random(f"{self.cfg.seed}:{record['id']}:{task}:parse")
        image = record.get("image")
        image = f"{self.cfg.image_prefix}{image}" if image else None
        return reply_to_record(reply, task, record_id=str(record["id"]), image=image, rng=rng)


def _write_jsonl(uri: str, rows: list[dict[str, Any]]) -> None:
    storage.write_text(uri, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def run_chunk(gen: Generator, jobs: list[tuple[dict[str, Any], str]], name: str, stats: RunStats) -> None:
    good, bad = [], []
    for (record, task), (reply, error) in zip(jobs, gen.replies(jobs), strict=True):
        out_id = f"{record['id']}_{task}"
        reason = error
        if reason is None:
            try:
                good.append(gen.to_record(record, task, reply or ""))
                continue
            except ReplyParseError as err:
                reason = err.reason
        bad.append({"id": out_id, "source_id": record["id"], "task_type": task, "reason": reason,
                    "reply": reply, "record": record})
        stats.rejected[reason.split(":", 1)[0]] += 1
    if good:
        _write_jsonl(storage.join(gen.cfg.output, "parts", name), good)
    if bad:
        _write_jsonl(storage.join(gen.cfg.output, "rejects", name), bad)
    stats.produced += len(good)


def merge_outputs(output: str) -> int:
    merged: dict[str, dict[str, Any]] = {}
    for uri in storage.list_files(storage.join(output, "parts")):
        for line in storage.read_text(uri).splitlines():
            if line.strip():
                rec = json.loads(line)
                merged[rec["id"]] = rec
    records = [merged[k] for k in sorted(merged)]
    storage.write_text(storage.join(output, "instructions.json"), json.dumps(records, ensure_ascii=False, indent=1))
    return len(records)


def generate(cfg: GenerateConfig) -> dict[str, Any]:
    records, input_rejects = read_input(cfg.input)
    if cfg.limit is not None:
        records = records[: cfg.limit]
    done, run_index = produced_ids(cfg.output)
    gen = Generator(cfg)
    stats = RunStats()
    jobs = []
    for record in records:
        for task in cfg.task_types:
            stats.requested += 1
            if f"{record['id']}_{task}" in done:
                stats.skipped += 1
            else:
                jobs.append((record, task))
    if input_rejects:
        _write_jsonl(storage.join(cfg.output, "rejects", "input.jsonl"), input_rejects)  # same each run
        for r in input_rejects:
            stats.rejected[r["reason"].split(":", 1)[0]] += 1
    for start in range(0, len(jobs), cfg.chunk_size):
        name = f"part-{run_index:03d}-{start // cfg.chunk_size:05d}.jsonl"
        run_chunk(gen, jobs[start:start + cfg.chunk_size], name, stats)
        log.info("chunk %s done: produced %d so far", name, stats.produced)
    total = merge_outputs(cfg.output)
    attempted = len(jobs) + len(input_rejects)
    summary = {"requested": stats.requested, "skipped_existing": stats.skipped, "produced": stats.produced,
               "rejected": sum(stats.rejected.values()), "rejected_by_reason": dict(sorted(stats.rejected.items())),
               "total_records": total, "reject_fraction": (sum(stats.rejected.values()) / attempted) if attempted else 0.0,
               "config": cfg.model_dump(mode="json"), "config_digest": config_digest(cfg)}
    storage.write_text(storage.join(cfg.output, "summary.json"), json.dumps(summary, indent=1, sort_keys=True))
    return summary


def main(argv: list[str] | None = None) -> int:
    config, overrides = job_arguments(argv, prog="python -m jobs.generate_instructions", config_required=False,
                                      description=__doc__.split("\n")[0], example="teacher.kind=rule",
                                      schema=GenerateConfig)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = load_config(GenerateConfig, config, overrides)
        summary = generate(cfg)
    except (ConfigError, PromptError, storage.StorageError, TeacherError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    shown = {k: v for k, v in summary.items() if k != "config"}
    print(json.dumps(shown, indent=1, sort_keys=True))
    if summary["reject_fraction"] > cfg.max_reject_fraction:
        print(f"error: reject fraction {summary['reject_fraction']:.3f} exceeds max_reject_fraction "
              f"{cfg.max_reject_fraction}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
