"""Is what the shapes questions ask in the frozen tiny CLIP's image tokens? A linear probe per patch.

    python benchmarks/vision_probe.py --workdir .llava        # after `llavactl run` / `make run`

For each training image, every patch token of the vision layers 0 (embeddings), -2 (the one LLaVA
reads) and -1 is labelled with the colour and the shape of the shape whose centre lies in that
patch's cell ("none" for empty cells), and with that cell's column and row (what "left of" and
"above" questions need: the LM's rotary positions never reach a token's value, so where a patch
lies must be in its features); a linear classifier is fitted on 80% of the patches and
scored on the rest. With the preset's 3x3 patch grid = the layout's 3x3 cells, a probe near 100%
means the feature the LM needs for a question about that cell is there, linearly, and a failure
to answer lies downstream (projector, LM); a low probe means the tower itself must learn it.
Also prints how the tiny tokenizer splits the colour and relation answers (one token each
makes an answer one decision). Last line: `RESULT key=value ...` (held-out probe accuracy over occupied
cells per layer and label).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "platform")]

from llava.data.images import prepare_image  # noqa: E402
from llava.data.synthetic import COLORS, GRID, SHAPES  # noqa: E402

LAYERS = (0, -2, -1)
# Colour and relation answers; the count answers are digits, which the byte-level BPE splits
# into the space and the digit (two tokens; counting is learned regardless).
ANSWER_WORDS = (*COLORS, "left", "right", "above", "below")


def cell_labels(record: dict) -> tuple[list[int], list[int]]:
    """Per grid cell (row-major): colour index and shape index, 0 = empty."""
    colours, shapes = [0] * GRID * GRID, [0] * GRID * GRID
    for inst in record["instances"]:
        colour, shape = inst["category"].split(" ")
        x1, y1, x2, y2 = inst["bbox"]
        cell = int((y1 + y2) / 2 * GRID) * GRID + int((x1 + x2) / 2 * GRID)
        colours[cell], shapes[cell] = list(COLORS).index(colour) + 1, SHAPES.index(shape) + 1
    return colours, shapes


def probe(features: torch.Tensor, labels: torch.Tensor, classes: int, steps: int = 300) -> float:
    """Held-out accuracy of a linear classifier over the occupied cells (empty cells are trivial)."""
    x = (features - features.mean(0)) / (features.std(0) + 1e-5)
    n = len(x) * 4 // 5
    lin = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(lin(x[:n]), labels[:n])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        right = lin(x[n:]).argmax(1) == labels[n:]
    occupied = labels[n:] > 0
    return right[occupied].float().mean().item()


def run(base: Path, data: Path, limit: int) -> dict[str, float]:
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel

    vision = CLIPVisionModel.from_pretrained(base / "tiny-clip-vision").eval()
    processor = CLIPImageProcessor.from_pretrained(base / "tiny-clip-vision")
    side = vision.config.image_size // vision.config.patch_size
    if side != GRID:
        raise SystemExit(f"the tower's patch grid is {side}x{side}, the layout's {GRID}x{GRID}: "
                         "per-cell labels need one patch per cell (image_size = 3 x patch_size)")
    tokenizer = AutoTokenizer.from_pretrained(base / "tiny-llama")
    split = {w: tokenizer.tokenize(" " + w) for w in ANSWER_WORDS}
    print("answer tokens: " + ", ".join(f"{w}={'|'.join(t)}" for w, t in split.items()))
    records = [json.loads(line) for line in (data / "captions.jsonl").read_text().splitlines()][:limit]
    images = [prepare_image(Image.open(data / r["image"]).convert("RGB"), processor) for r in records]
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = vision(pixel_values=pixels, output_hidden_states=True).hidden_states
    labels = [cell_labels(r) for r in records]
    colours = torch.tensor([c for cs, _ in labels for c in cs])
    shapes = torch.tensor([s for _, ss in labels for s in ss])
    cells = torch.arange(GRID * GRID).repeat(len(records))
    columns = torch.where(shapes > 0, cells % GRID + 1, 0)
    rows = torch.where(shapes > 0, cells // GRID + 1, 0)
    out = {"multi_token_answers": float(sum(len(t) > 1 for t in split.values()))}
    for layer in LAYERS:
        feats = hidden[layer][:, 1:].reshape(-1, hidden[layer].shape[-1])  # CLS dropped, as LLaVA does
        out[f"layer{layer}.colour"] = probe(feats, colours, len(COLORS) + 1)
        out[f"layer{layer}.shape"] = probe(feats, shapes, len(SHAPES) + 1)
        out[f"layer{layer}.column"] = probe(feats, columns, GRID + 1)
        out[f"layer{layer}.row"] = probe(feats, rows, GRID + 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".llava"),
                        help="a `llavactl run` workdir (reads base/ and data/)")
    parser.add_argument("--limit", type=int, default=1000, help="training images probed")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    result = run(args.workdir / "base", args.workdir / "data", args.limit)
    print("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
