"""`llavactl data ...`: the data command group.

The pipeline subcommands (synth, preprocess, generate) live in `data_pipeline`; `show-sample`,
which renders one record's prompt and label mask, is defined here.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from llava_platform.commands import data_pipeline

    p = subparsers.add_parser("data", help="synthetic data, pre-processing, instruction generation, inspection")
    sub = p.add_subparsers(dest="data_command", required=True)
    data_pipeline.add_subcommands(sub)
    show = sub.add_parser("show-sample", help="render one record: prompt text and which tokens are supervised")
    show.add_argument("file", help="LLaVA JSON or JSONL records")
    show.add_argument("--index", type=int, default=0, help="record index (default 0)")
    show.add_argument("--model", required=True, help="llava-hf model directory (its processor and tokenizer)")
    show.add_argument("--template", default="vicuna_v1", help="plain | vicuna_v1 | chatml")
    show.add_argument("--max-length", type=int, default=4096)
    show.add_argument("--json", action="store_true", help='print {"input_ids": [...], "labels": [...]} only')
    show.set_defaults(func=show_sample_main)


def show_sample_main(args: argparse.Namespace) -> int:
    from llava_platform import preflight

    # Before the heavy imports: a missing directory is otherwise a hub "Repo id" error under a page of stack.
    preflight.require_model_dir(args.model, "--model")
    from transformers import AutoProcessor

    from llava.data.encode import SampleRejected, encode_record
    from llava.data.inspect import marked_text, summary_line, token_table
    from llava.data.records import RecordError, load_records
    from llava.data.templates import TemplateError

    try:
        records = load_records(args.file)
    except (OSError, ValueError, RecordError) as err:
        print(f"llavactl data show-sample: cannot read {args.file}: {err}", file=sys.stderr)
        return 2
    if not 0 <= args.index < len(records):
        print(f"llavactl data show-sample: --index {args.index} out of range (file has {len(records)} records)",
              file=sys.stderr)
        return 2
    processor = AutoProcessor.from_pretrained(args.model)
    try:
        # Masks do not depend on pixels, so images are not opened: the tool works without them.
        sample = encode_record(records[args.index], processor, args.template, max_length=args.max_length,
                               load_pixels=False)
    except (SampleRejected, TemplateError) as err:
        print(f"rejected: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"input_ids": sample.input_ids, "labels": sample.labels}))
        return 0
    tok = processor.tokenizer
    print(summary_line(sample))
    print("--- prompt (supervised text between ⟦ ⟧) ---")
    print(marked_text(sample, tok))
    print("--- tokens (S = supervised) ---")
    print("\n".join(token_table(sample, tok)))
    return 0
