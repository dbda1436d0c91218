"""Multimodal sequence packing: several encoded samples share one row of at most `max_length`
tokens, and no token ever sees (or is trained to predict) a token of another sample.

Why it is exact, not an approximation:
- attention: every sample is its own causal block. With sdpa/eager attention (CPU, and GPU without
  flash-attention) a 4D block-diagonal causal mask is passed; transformers hands a 4D mask to the
  attention kernels as-is (masking_utils: "If the mask is already 4D, simply return as-is"). With
  flash-attention the rows are laid end to end in one row without a mask and `position_ids` restart
  at 0 per sample; transformers then derives `cu_seqlens` from the restarts and calls the varlen
  kernel (modeling_flash_attention_utils: `_is_packed_sequence` needs batch size 1).
- positions: `position_ids` restart at 0 for every sample, so rotary embeddings match the unpacked run.
- labels: the causal-LM loss shifts labels by one, so the last token of sample A is scored against
  the first label of sample B. That label must be -100 (the encoder gives every sample a BOS whose
  label is -100); samples that break this are refused with a reason instead of leaking a target.
- images: LLaVA scatters image features into the image-token positions in row-major order, so
  `pixel_values` are stacked in the order the samples occur in the packed rows.

Bin packing is first-fit decreasing by length (ties by input position): deterministic, never splits
a sample, and within 11/9 OPT + 6/9 rows of the optimum. For the padded (masked) layout the FFD rows
are then re-balanced at the same row count, since every row is padded to the longest one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llava.data.collate import collate_padded, padding_fraction, pixel_values
from llava.data.encode import IGNORE_INDEX

# Attention implementations that take the explicit 4D block mask; the flash family uses varlen.
MASKED_ATTENTION = ("sdpa", "eager")


class PackingError(ValueError):
    """A sample that cannot be packed safely. `reason` starts with a short code, like SampleRejected."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def packing_problem(sample, *, max_length: int, bos_token_id: int | None) -> str | None:
    """Why `sample` cannot share a row with others, or None when it can.

    The first label must be -100: in a packed row the previous sample's last logit is scored against
    it (in an unpacked batch it is never scored, so packing would add a cross-sample target). When the
    tokenizer has a BOS token, the sample must start with it, as the encoder guarantees; a sample that
    does not was produced by something else and its boundary cannot be trusted.
    """
    if not sample.input_ids:
        return f"empty_sample: {sample.id} has no tokens"
    if len(sample.input_ids) != len(sample.labels):
        return f"label_length: {sample.id} has {len(sample.input_ids)} ids but {len(sample.labels)} labels"
    if len(sample.input_ids) > max_length:
        return f"too_long: {sample.id} has {len(sample.input_ids)} tokens > max_length {max_length}"
    if bos_token_id is not None and sample.input_ids[0] != bos_token_id:
        return f"missing_bos: {sample.id} starts with token {sample.input_ids[0]}, not BOS {bos_token_id}"
    if sample.labels[0] != IGNORE_INDEX:
        return f"first_label_supervised: {sample.id} has label {sample.labels[0]} at position 0"
    return None


def expected_bos(tokenizer) -> int | None:
    """The BOS id every encoded sample starts with, or None when the tokenizer adds none (Qwen-style
    tokenizers have no BOS; then only the first-label rule guards the boundary)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    return bos if tokenizer("a")["input_ids"][:1] == [bos] else None


def check_packable(samples: Sequence, *, max_length: int, bos_token_id: int | None) -> None:
    """Raise PackingError naming the first offending sample (and how many there are)."""
    problems = [p for s in samples if (p := packing_problem(s, max_length=max_length, bos_token_id=bos_token_id))]
    if problems:
        raise PackingError(f"{problems[0]} ({len(problems)} of {len(samples)} samples cannot be packed)")


def plan_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """First-fit decreasing: indices of `lengths` grouped into rows whose sums are <= max_length.

    Deterministic (a stable sort on length, ties keep input order; rows are tried in creation order),
    every index appears exactly once and no item is split.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        n = lengths[i]
        if n <= 0 or n > max_length:
            raise PackingError(f"bad_length: item {i} has length {n}, allowed 1..{max_length}")
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(max_length - n)
    return rows


def balance_rows(rows: list[list[int]], lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Same number of rows as `rows`, re-dealt longest-first onto the least-filled row (LPT), kept
    only when every row still fits and the longest row got shorter.

    Why: the masked (sdpa/eager) layout pads every row to the longest one, and first-fit leaves the
    last rows nearly empty (4 samples of 200/190/180/170 in 512: rows 390 + 350 vs 370 + 370).
    """
    if len(rows) < 2:
        return rows
    loads = [0] * len(rows)
    dealt: list[list[int]] = [[] for _ in rows]
    for i in sorted((i for row in rows for i in row), key=lambda k: (-lengths[k], k)):
        r = min(range(len(rows)), key=lambda k: (loads[k], k))
        dealt[r].append(i)
        loads[r] += lengths[i]
    before = max(sum(lengths[i] for i in row) for row in rows)
    return dealt if max(loads) <= max_length and max(loads) < before else rows


def attention_break_even(model_or_config) -> float:
    """Row width W at which the dense masked attention of a row costs as much per token as the
    matmuls. Forward FLOPs per token: attention 4*W*d per layer (sdpa/eager compute the masked-out
    blocks too); matmuls 2*(4*d^2 + 3*d*I) per layer (MHA approximated) + 2*d*V for the LM head.
    About 1e3 for the tiny test model, 2.5e4 for a 7B Llama."""
    config = getattr(model_or_config, "config", model_or_config)
    text = getattr(config, "text_config", None) or config
    d, layers = text.hidden_size, text.num_hidden_layers
    inter = getattr(text, "intermediate_size", None) or 4 * d
    return 2 * d + 1.5 * inter + text.vocab_size / (2 * layers)


def _masked_rows(lengths: list[int], max_length: int, break_even_width: float | None) -> list[list[int]]:
    """Rows for the masked layout. FFD at max_length (re-balanced) removes the most padding, but a
    dense masked row costs ~W^2 in attention; with `break_even_width` the plan packed no wider than
    the longest sample (never costlier than padding) is taken instead when the cost model
    rows * W * (break_even_width + W) says it is cheaper."""
    rows = balance_rows(plan_rows(lengths, max_length), lengths, max_length)
    if break_even_width is None:
        return rows
    longest = max(lengths)
    tight = balance_rows(plan_rows(lengths, longest), lengths, longest)

    def cost(plan: list[list[int]]) -> float:
        width = max(sum(lengths[i] for i in row) for row in plan)
        return len(plan) * width * (break_even_width + width)

    return tight if cost(tight) < cost(rows) else rows


@dataclass(frozen=True)
class SampleSpan:
    """Where sample `index` (position in the input list) sits: row, first column, token count."""

    index: int
    row: int
    start: int
    length: int


@dataclass
class PackedBatch:
    inputs: dict[str, torch.Tensor]  # keyword arguments for the model's forward
    spans: list[SampleSpan]  # in input order: spans[i] is samples[i]
    real_tokens: int  # tokens that belong to a sample
    positions: int  # token slots the forward pass computes (rows x width)

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.positions


def attention_implementation(model) -> str:
    """The language model's attention implementation (it is the LM that sees the packed rows)."""
    config = getattr(model, "config", model)
    text = getattr(config, "text_config", None) or config
    impl = getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None)
    return impl or "eager"


def uses_varlen(attn_implementation: str) -> bool:
    """flash_attention_2/3 and hub flash kernels: packed sequences via position_ids, no mask."""
    return "flash" in attn_implementation


def block_causal_mask(segments: torch.Tensor, *, dtype: torch.dtype | None) -> torch.Tensor:
    """(rows, 1, width, width) mask from per-token segment ids: a query sees a key iff both are in
    the same segment and the key is not after it. `dtype=None` gives the boolean form sdpa takes
    (True = attend); a float dtype gives eager's additive form (0 or the dtype's minimum).
    Padding forms its own segment so that no query row is fully masked (which would give NaNs)."""
    width = segments.shape[1]
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (same & causal)[:, None]
    if dtype is None:
        return allowed
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def _layout(samples: Sequence, rows: list[list[int]], width: int, pad_id: int):
    n_rows = len(rows)
    ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((n_rows, width), dtype=torch.long)
    segments = torch.full((n_rows, width), -1, dtype=torch.long)
    spans: dict[int, SampleSpan] = {}
    images = []
    for r, members in enumerate(rows):
        col = 0
        for seg, i in enumerate(members):
            s = samples[i]
            n = len(s.input_ids)
            ids[r, col : col + n] = torch.tensor(s.input_ids)
            labels[r, col : col + n] = torch.tensor(s.labels)
            positions[r, col : col + n] = torch.arange(n)
            segments[r, col : col + n] = seg
            spans[i] = SampleSpan(i, r, col, n)
            images.extend(s.images)  # row-major order = the order LLaVA fills image tokens
            col += n
        # Padding tail: positions keep counting so it is a well-formed causal block of its own.
        positions[r, col:] = torch.arange(width - col)
    return ids, labels, positions, segments, [spans[i] for i in range(len(samples))], images


def pack_samples(samples: Sequence, *, pad_id: int, image_processor, max_length: int,
                 attn_implementation: str = "sdpa", bos_token_id: int | None = None,
                 mask_dtype: torch.dtype = torch.float32, break_even_width: float | None = None) -> PackedBatch:
    """Pack encoded samples (objects with id, input_ids, labels, images) into as few rows as fit.

    sdpa/eager: rows of the longest row's width with a 4D block-diagonal causal mask (bool for
    sdpa, additive `mask_dtype` for eager); `break_even_width` (see `attention_break_even`) lets it
    trade fewer padded positions against quadratic masked attention. flash: one row of all samples
    back to back, no mask.
    """
    if not samples:
        raise ValueError("pack_samples needs at least one sample")
    check_packable(samples, max_length=max_length, bos_token_id=bos_token_id)
    lengths = [len(s.input_ids) for s in samples]
    rows = plan_rows(lengths, max_length)
    real = sum(len(s.input_ids) for s in samples)
    if uses_varlen(attn_implementation):
        # Varlen kernels need no padding at all: the rows laid end to end make one sequence.
        rows = [[i for row in rows for i in row]]
        width = real
    elif attn_implementation in MASKED_ATTENTION:
        rows = _masked_rows(lengths, max_length, break_even_width)
        width = max(sum(lengths[i] for i in row) for row in rows)
    else:
        raise PackingError(f"unsupported_attention: packing supports {', '.join(MASKED_ATTENTION)} and "
                           f"flash-attention, not {attn_implementation!r}")
    ids, labels, positions, segments, spans, images = _layout(samples, rows, width, pad_id)
    inputs = {"input_ids": ids, "labels": labels, "position_ids": positions}
    if not uses_varlen(attn_implementation):
        dtype = None if attn_implementation == "sdpa" else mask_dtype
        inputs["attention_mask"] = block_causal_mask(segments, dtype=dtype)
    pv = pixel_values(images, image_processor)
    if pv is not None:
        inputs["pixel_values"] = pv
    return PackedBatch(inputs, spans, real, ids.numel())


@dataclass
class MicroBatch:
    inputs: dict[str, torch.Tensor]
    real_tokens: int
    padding_fraction: float


def build_micro_batch(samples: Sequence, *, packing: bool, pad_id: int, image_processor, max_length: int,
                      attn_implementation: str = "sdpa", bos_token_id: int | None = None,
                      mask_dtype: torch.dtype = torch.float32, break_even_width: float | None = None) -> MicroBatch:
    """One micro-batch of the training loop: the same samples, packed or right-padded, with the
    token counts the throughput metrics need (a 4D mask cannot be summed into a token count)."""
    if packing:
        packed = pack_samples(samples, pad_id=pad_id, image_processor=image_processor, max_length=max_length,
                              attn_implementation=attn_implementation, bos_token_id=bos_token_id,
                              mask_dtype=mask_dtype, break_even_width=break_even_width)
        return MicroBatch(packed.inputs, packed.real_tokens, packed.padding_fraction)
    batch = collate_padded(list(samples), pad_id, image_processor)
    return MicroBatch(batch, int(batch["attention_mask"].sum()), padding_fraction(batch))
