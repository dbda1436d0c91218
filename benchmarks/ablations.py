"""The paper's ablations in miniature, on the `make run` recipe: 3 seeds, mean and spread.

    python benchmarks/ablations.py                       # all variants, seeds 0 1 2
    python benchmarks/ablations.py --seeds 0 --variants both_stages no_stage1

Variants (each against `both_stages`, the shipped recipe: stage 1 then stage 2, features of the
vision layer -2, `mlp2x_gelu` projector):
- `no_stage1`: stage 2 only, the projector starts fresh (the paper: -5.11 points on ScienceQA);
- `layer_-1`: last-layer vision features instead of the penultimate (the paper: about -1 point);
- `linear`: one linear projector (LLaVA v1) instead of the two-layer MLP (LLaVA-1.5).

Per seed the data, the tiny CLIP and the tiny LM are built once, exactly as `llavactl run` builds
them (jobs/configs/pipeline_tiny.yaml), and every variant trains from them with the stage
hyper-parameters of jobs/configs/tiny_stage{1,2}.yaml. Training runs in-process on one worker
(same global batch, learning rates, steps, schedule and freezing as the Ray Train + DeepSpeed jobs;
no Ray, so that 4 variants x 3 seeds fit on a CPU). Evaluation: the held-out shapes questions
(real and blank images) and the ScienceQA-format items, greedy, as jobs.evaluate asks them.
Long-running (tens of minutes on 2 CPU cores); never part of the test suite. Last line:
`RESULT key=value ...` with the mean per variant.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "platform")]

from jobs.pipeline import _image_captions, _text_corpus  # noqa: E402
from llava.data.collate import collate_padded  # noqa: E402
from llava.data.synthetic import write_shapes_dataset  # noqa: E402
from llava.data.templates import get_template  # noqa: E402
from llava.eval.report import majority_baseline  # noqa: E402
from llava.eval.scienceqa import build_prompt, score_scienceqa  # noqa: E402
from llava.eval.shapes import score_shapes  # noqa: E402
from llava.infer.generate import generate_batch  # noqa: E402
from llava.model.builder import build_llava  # noqa: E402
from llava.model.freezing import PARTS, PartModes, apply_freezing  # noqa: E402
from llava.model.tiny import build_tiny_checkpoints  # noqa: E402
from llava.train.dataset import encode_records  # noqa: E402
from llava.train.optim import build_optimizer, build_scheduler  # noqa: E402

CONFIGS = REPO / "jobs" / "configs"
VARIANTS = {
    "both_stages": {"stage1": True, "layer": -2, "projector": "mlp2x_gelu"},
    "no_stage1": {"stage1": False, "layer": -2, "projector": "mlp2x_gelu"},
    "layer_-1": {"stage1": True, "layer": -1, "projector": "mlp2x_gelu"},
    "linear": {"stage1": True, "layer": -2, "projector": "linear"},
}


def _yaml(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def train_stage(model, processor, records: list[dict], stage_cfg: dict, stage: int, image_root, seed: int) -> dict:
    optim, data = stage_cfg["optim"], stage_cfg["data"]
    apply_freezing(model, PartModes.for_stage(stage))
    samples, rejected = encode_records(records, processor, data["template"], max_length=data["max_length"],
                                       image_root=image_root)
    steps, batch = optim["max_steps"], optim["global_batch"]
    opt = build_optimizer(model, dict.fromkeys(PARTS, optim["lr"]))
    sched = build_scheduler(opt, steps, optim.get("warmup_ratio", 0.03))
    rng, order, losses = random.Random(seed), [], []
    pad_id = processor.tokenizer.pad_token_id
    trainable = [p for p in model.parameters() if p.requires_grad]
    started = time.perf_counter()
    model.train()
    for _ in range(steps):
        if len(order) < batch:  # epochs of a fresh shuffle, as the training job's sampler
            more = list(range(len(samples)))
            rng.shuffle(more)
            order += more
        idx, order = order[:batch], order[batch:]
        # Micro-batches of the config's size, gradients accumulated: the same step as the job's.
        micro = stage_cfg["optim"]["micro_batch"]
        step_loss = 0.0
        for start in range(0, batch, micro):
            chosen = [samples[i] for i in idx[start : start + micro]]
            loss = model(**collate_padded(chosen, pad_id, processor.image_processor), use_cache=False).loss
            (loss * len(chosen) / batch).backward()
            step_loss += loss.item() * len(chosen) / batch
        torch.nn.utils.clip_grad_norm_(trainable, optim.get("grad_clip", 1.0))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
    model.eval()
    return {"samples": len(samples), "rejected": len(rejected), "steps": steps,
            "loss_first": sum(losses[:3]) / 3, "loss_last": sum(losses[-3:]) / 3,
            "seconds": time.perf_counter() - started}


def _ask(model, processor, prompts: list[tuple[str, Image.Image | None]], max_new_tokens: int = 8) -> list[str]:
    out = []
    for start in range(0, len(prompts), 32):
        requests = [{"messages": [{"role": "user", "content": ([{"type": "image", "image": img}] if img else [])
                                   + [{"type": "text", "text": text}]}]} for text, img in prompts[start : start + 32]]
        out += [r.text.strip() for r in generate_batch(model, processor, requests, max_new_tokens=max_new_tokens,
                                                       temperature=0.0, top_p=1.0, stop=None, seed=0)]
    return out


def evaluate(model, processor, ds) -> dict:
    qa = [json.loads(line) for line in ds.shapes_qa.read_text().splitlines()]
    sqa = [json.loads(line) for line in ds.scienceqa.read_text().splitlines()]
    images = {p: Image.open(ds.root / p).convert("RGB") for p in {i["image"] for i in qa + sqa if i.get("image")}}
    blank = Image.new("RGB", next(iter(images.values())).size, "white")
    with torch.no_grad():
        real = score_shapes(qa, _ask(model, processor, [(i["question"], images[i["image"]]) for i in qa]))
        empty = score_shapes(qa, _ask(model, processor, [(i["question"], blank) for i in qa]))
        science = score_scienceqa(sqa, _ask(model, processor, [(build_prompt(i), images.get(i["image"]))
                                                                for i in sqa]))
    out = {"shapes": real["accuracy"], "shapes_blank": empty["accuracy"], "scienceqa": science["accuracy"],
           "scienceqa_image": science["image"]["accuracy"]}
    out.update({f"shapes.{t}": p["accuracy"] for t, p in real["per_type"].items()})
    out.update({f"majority.{t}": v for t, v in majority_baseline(real["rows"]).items()})
    return out


def run_seed(seed: int, variants: list[str], work: Path) -> list[dict]:
    pipe, stage1, stage2 = _yaml("pipeline_tiny.yaml"), _yaml("tiny_stage1.yaml"), _yaml("tiny_stage2.yaml")
    ds = write_shapes_dataset(work / f"seed{seed}" / "data", pipe["n_images"], seed=seed, image_size=pipe["image_size"])
    started = time.perf_counter()
    vision, lm = build_tiny_checkpoints(work / f"seed{seed}" / "base", corpus=_text_corpus(ds),
                                        pretrain_steps=pipe["lm_pretrain_steps"], clip_pairs=_image_captions(ds),
                                        clip_steps=pipe["clip_pretrain_steps"], image_size=pipe["image_size"], seed=seed)
    print(f"[ablations] seed {seed}: base checkpoints in {time.perf_counter() - started:.0f}s", flush=True)
    rows = []
    for name in variants:
        v = VARIANTS[name]
        torch.manual_seed(seed)
        model, processor = build_llava(vision, lm, projector=v["projector"], vision_feature_layer=v["layer"],
                                       template="plain")
        info = {}
        if v["stage1"]:
            info["stage1"] = train_stage(model, processor, json.loads(ds.stage1.read_text()), stage1, 1, ds.root, seed)
        processor.chat_template = get_template("vicuna_v1", eos_token=processor.tokenizer.eos_token).chat_template
        info["stage2"] = train_stage(model, processor, json.loads(ds.stage2.read_text()), stage2, 2, ds.root, seed)
        row = {"variant": name, "seed": seed, **evaluate(model, processor, ds), "train": info}
        print("[ablations] " + json.dumps({k: (round(x, 4) if isinstance(x, float) else x)
                                          for k, x in row.items() if k != "train"}), flush=True)
        rows.append(row)
    return rows


def summarise(rows: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per variant and metric: (mean, population standard deviation over seeds)."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        keys = [k for k in mine[0] if k not in ("variant", "seed", "train")]
        out[name] = {k: (statistics.fmean(r[k] for r in mine), statistics.pstdev(r[k] for r in mine)) for k in keys}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/llava-ablations"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (several seeds can run side by side)")
    parser.add_argument("--out", type=Path, default=None, help="write every row as JSON here")
    parser.add_argument("--merge", type=Path, nargs="*", default=[], help="summarise earlier --out files instead")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (recipe, variants, seeds) and exit")
    args = parser.parse_args(argv)
    if args.dry_run:
        pipe, stage1, stage2 = _yaml("pipeline_tiny.yaml"), _yaml("tiny_stage1.yaml"), _yaml("tiny_stage2.yaml")
        print(f"recipe: {pipe['n_images']} images of {pipe['image_size']} px, CLIP {pipe['clip_pretrain_steps']} "
              f"steps, LM {pipe['lm_pretrain_steps']} steps; stage 1 {stage1['optim']['max_steps']} steps at "
              f"{stage1['optim']['lr']}, stage 2 {stage2['optim']['max_steps']} steps at {stage2['optim']['lr']}, "
              f"global batch {stage2['optim']['global_batch']}")
        for name in args.variants:
            print(f"variant {name}: {VARIANTS[name]} x seeds {args.seeds}")
        return 0
    torch.set_num_threads(args.threads)
    if args.merge:
        rows = [r for path in args.merge for r in json.loads(path.read_text())]
    else:
        rows = [r for seed in args.seeds for r in run_seed(seed, args.variants, args.work)]
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1))
    summary = summarise(rows)
    metrics = ("shapes", "shapes.count", "shapes.color", "shapes.position", "shapes_blank", "scienceqa")
    print("| variant | seeds | " + " | ".join(metrics) + " |")
    print("|---|---:|" + "---:|" * len(metrics))
    for name, part in summary.items():
        n = sum(1 for r in rows if r["variant"] == name)
        cells = [f"{100 * part[m][0]:.1f} ± {100 * part[m][1]:.1f}" if m in part else "n/a" for m in metrics]
        print(f"| {name} | {n} | " + " | ".join(cells) + " |")
    print("RESULT " + " ".join(f"{name}.{m}={part[m][0]:.4f}" for name, part in summary.items()
                               for m in ("shapes", "scienceqa") if m in part))
    return 0


if __name__ == "__main__":
    sys.exit(main())
