"""Multimodal packing: per-sample losses are the same packed and unpacked (the proof that attention,
positions, labels and image order never cross a sample boundary), and the bin-packing contract."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llava.data.collate import collate_padded
from llava.data.encode import IGNORE_INDEX, EncodedSample, encode_record
from llava.train.packing import (
    PackingError,
    attention_break_even,
    attention_implementation,
    balance_rows,
    build_micro_batch,
    check_packable,
    expected_bos,
    pack_samples,
    plan_rows,
)

TEXT_RECORDS = [
    {"id": "text_short", "conversations": [{"from": "human", "value": "What is a circle?"},
                                           {"from": "gpt", "value": "A round shape."}]},
    {"id": "text_long", "conversations": [
        {"from": "human", "value": "Describe a square and a triangle."},
        {"from": "gpt", "value": "A square has four equal sides; a triangle has three sides."},
        {"from": "human", "value": "Which one has more corners?"},
        {"from": "gpt", "value": "The square has more corners than the triangle."}]},
]


@pytest.fixture(scope="module")
def processor(tiny_llava_dir):
    return AutoProcessor.from_pretrained(tiny_llava_dir)


@pytest.fixture(scope="module")
def samples(processor, shapes_data) -> list[EncodedSample]:
    """Image samples of different lengths (and different images) interleaved with text-only ones."""
    records = json.loads(shapes_data.stage2.read_text())
    picked = [records[0], records[1], TEXT_RECORDS[0], records[5], records[7], TEXT_RECORDS[1], records[10]]
    out = [encode_record(r, processor, "vicuna_v1", max_length=512, image_root=shapes_data.image_root)
           for r in picked]
    assert {s.modality for s in out} == {"image", "text"}
    assert len({s.length for s in out}) >= 5, "the samples should differ in length"
    return out


def load_model(path, attn: str) -> LlavaForConditionalGeneration:
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation=attn, dtype=torch.float32)
    return model.eval()


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies of one sample: logits[t] scores labels[t + 1]."""
    return torch.nn.functional.cross_entropy(logits[:-1].double(), labels[1:], ignore_index=IGNORE_INDEX,
                                             reduction="sum")


def unpacked_losses(model, processor, samples) -> list[float]:
    out = []
    for s in samples:
        batch = collate_padded([s], processor.tokenizer.pad_token_id, processor.image_processor)
        labels = batch.pop("labels")
        with torch.no_grad():
            logits = model(**batch).logits
        out.append(token_loss_sum(logits[0], labels[0]).item())
    return out


def packed_losses(model, packed) -> list[float]:
    inputs = dict(packed.inputs)
    labels = inputs.pop("labels")
    with torch.no_grad():
        logits = model(**inputs).logits
    return [token_loss_sum(logits[sp.row, sp.start : sp.start + sp.length],
                           labels[sp.row, sp.start : sp.start + sp.length]).item() for sp in packed.spans]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_per_sample_losses_match_packed_and_unpacked(tiny_llava_dir, processor, samples, attn):
    model = load_model(tiny_llava_dir, attn)
    assert attention_implementation(model) == attn
    reference = unpacked_losses(model, processor, samples)
    packed = pack_samples(samples, pad_id=processor.tokenizer.pad_token_id,
                          image_processor=processor.image_processor, max_length=400,
                          attn_implementation=attention_implementation(model),
                          bos_token_id=processor.tokenizer.bos_token_id)
    rows = packed.inputs["input_ids"].shape[0]
    assert 1 < rows < len(samples), "the case must pack several samples per row over several rows"
    assert packed.inputs["attention_mask"].shape == (rows, 1, packed.inputs["input_ids"].shape[1],
                                                     packed.inputs["input_ids"].shape[1])
    got = packed_losses(model, packed)
    assert got == pytest.approx(reference, rel=1e-5, abs=1e-4)
    # The whole micro-batch loss (mean over supervised tokens) is the padded batch's too.
    padded = collate_padded(samples, processor.tokenizer.pad_token_id, processor.image_processor)
    with torch.no_grad():
        assert model(**packed.inputs).loss.item() == pytest.approx(model(**padded).loss.item(), rel=1e-5)


def test_losses_differ_when_samples_see_each_other(tiny_llava_dir, processor, samples):
    """Control: the same packed rows with a plain causal mask and running positions leak context
    across samples, and the comparison above detects it."""
    model = load_model(tiny_llava_dir, "sdpa")
    reference = unpacked_losses(model, processor, samples)
    packed = pack_samples(samples, pad_id=processor.tokenizer.pad_token_id,
                          image_processor=processor.image_processor, max_length=400, attn_implementation="sdpa")
    ids = packed.inputs["input_ids"]
    leaky = dict(packed.inputs, attention_mask=torch.ones_like(ids),
                 position_ids=torch.arange(ids.shape[1]).expand_as(ids))
    got = packed_losses(model, type(packed)(leaky, packed.spans, packed.real_tokens, packed.positions))
    later = [i for i, sp in enumerate(packed.spans) if sp.start > 0]
    assert later
    assert all(abs(got[i] - reference[i]) > 1e-3 for i in later)


def test_images_follow_the_packed_order(processor, samples):
    packed = pack_samples(samples, pad_id=processor.tokenizer.pad_token_id,
                          image_processor=processor.image_processor, max_length=400, attn_implementation="sdpa")
    order = sorted((sp.row, sp.start, sp.index) for sp in packed.spans)
    with_images = [i for _, _, i in order if samples[i].images]
    expected = processor.image_processor([samples[i].images[0] for i in with_images],
                                         return_tensors="pt")["pixel_values"]
    assert with_images != sorted(with_images), "packing should have reordered the image samples"
    torch.testing.assert_close(packed.inputs["pixel_values"], expected)
    # Positions restart at 0 for each sample; ids and labels are the sample's own.
    for sp in packed.spans:
        cut = slice(sp.start, sp.start + sp.length)
        assert packed.inputs["position_ids"][sp.row, cut].tolist() == list(range(sp.length))
        assert packed.inputs["input_ids"][sp.row, cut].tolist() == samples[sp.index].input_ids
        assert packed.inputs["labels"][sp.row, cut].tolist() == samples[sp.index].labels


def test_block_mask_is_block_diagonal_causal(processor, samples):
    packed = pack_samples(samples[:3], pad_id=processor.tokenizer.pad_token_id,
                          image_processor=processor.image_processor, max_length=512, attn_implementation="eager",
                          mask_dtype=torch.float32)
    mask = packed.inputs["attention_mask"][0, 0]
    seg = torch.full((mask.shape[0],), -1)
    for sp in packed.spans:
        seg[sp.start : sp.start + sp.length] = sp.index
    q, k = torch.meshgrid(torch.arange(len(seg)), torch.arange(len(seg)), indexing="ij")
    allowed = (seg[q] == seg[k]) & (k <= q)
    assert torch.equal(mask == 0, allowed)
    assert (mask[~allowed] == torch.finfo(torch.float32).min).all()


def test_flash_layout_is_one_varlen_row(processor, samples):
    """Flash-attention path (no GPU here): one row, no mask, restarts that transformers turns into
    the cumulative sequence lengths of the varlen kernel."""
    from transformers.modeling_flash_attention_utils import (
        _is_packed_sequence,
        prepare_fa_kwargs_from_position_ids,
    )

    packed = pack_samples(samples, pad_id=processor.tokenizer.pad_token_id,
                          image_processor=processor.image_processor, max_length=400,
                          attn_implementation="flash_attention_2")
    assert "attention_mask" not in packed.inputs and packed.padding_fraction == 0.0
    pos = packed.inputs["position_ids"]
    assert pos.shape == (1, sum(s.length for s in samples))
    assert _is_packed_sequence(pos, batch_size=1)
    (cu_q, _), (max_q, _) = prepare_fa_kwargs_from_position_ids(pos)
    lengths = [sp.length for sp in sorted(packed.spans, key=lambda sp: sp.start)]
    assert cu_q.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert max_q == max(lengths)


def test_unsafe_boundaries_are_refused(processor, samples):
    good = samples[0]
    supervised_first = EncodedSample("bad1", good.input_ids, [good.input_ids[0], *good.labels[1:]])
    no_bos = EncodedSample("bad2", good.input_ids[1:], good.labels[1:])
    bos = processor.tokenizer.bos_token_id
    with pytest.raises(PackingError, match="first_label_supervised: bad1"):
        check_packable([good, supervised_first], max_length=512, bos_token_id=bos)
    with pytest.raises(PackingError, match="missing_bos: bad2"):
        pack_samples([no_bos, good], pad_id=0, image_processor=processor.image_processor, max_length=512,
                     bos_token_id=bos)
    with pytest.raises(PackingError, match="too_long"):
        check_packable([good], max_length=good.length - 1, bos_token_id=bos)
    with pytest.raises(PackingError, match="unsupported_attention"):
        pack_samples([good], pad_id=0, image_processor=processor.image_processor, max_length=512,
                     attn_implementation="flex_attention")


def test_expected_bos_follows_the_tokenizer(processor):
    tok = processor.tokenizer
    assert expected_bos(tok) == tok.bos_token_id  # the tiny Llama tokenizer prepends <s>

    class NoBos:
        bos_token_id = None

    assert expected_bos(NoBos()) is None


def test_micro_batch_stats_packed_and_padded(processor, samples):
    common = dict(pad_id=processor.tokenizer.pad_token_id, image_processor=processor.image_processor,
                  max_length=512, bos_token_id=processor.tokenizer.bos_token_id)
    padded = build_micro_batch(samples, packing=False, **common)
    packed = build_micro_batch(samples, packing=True, **common)
    total = sum(s.length for s in samples)
    assert padded.real_tokens == packed.real_tokens == total
    assert padded.padding_fraction == pytest.approx(1 - total / (len(samples) * max(s.length for s in samples)))
    rows, width = packed.inputs["input_ids"].shape
    assert packed.padding_fraction == pytest.approx(1 - total / (rows * width))
    assert packed.padding_fraction < padded.padding_fraction


@pytest.mark.parametrize("seed", range(5))
def test_plan_rows_contract(seed):
    rng = random.Random(seed)
    max_length = rng.choice([64, 300, 2048])
    lengths = [rng.randint(1, max_length) for _ in range(rng.randint(1, 60))]
    rows = plan_rows(lengths, max_length)
    flat = [i for row in rows for i in row]
    assert sorted(flat) == list(range(len(lengths)))  # every item exactly once, none split
    assert all(sum(lengths[i] for i in row) <= max_length for row in rows)
    assert plan_rows(list(lengths), max_length) == rows  # deterministic
    # First fit: the item that opened row j did not fit in any earlier row i, so every pair of rows
    # holds more than max_length together (no two rows could have been one).
    fill = [sum(lengths[i] for i in row) for row in rows]
    assert all(fill[i] + fill[j] > max_length for i in range(len(fill)) for j in range(i + 1, len(fill)))
    # Decreasing: each row's items are in non-increasing length order of placement.
    assert all(lengths[a] >= lengths[b] for row in rows for a, b in zip(row, row[1:]))


@pytest.mark.parametrize("seed", range(5))
def test_balance_rows_keeps_the_contract_and_never_widens(seed):
    rng = random.Random(100 + seed)
    lengths = [rng.randint(20, 300) for _ in range(rng.randint(2, 12))]
    rows = plan_rows(lengths, 512)
    balanced = balance_rows(rows, lengths, 512)
    assert len(balanced) == len(rows)
    assert sorted(i for row in balanced for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 for row in balanced)
    widest = max(sum(lengths[i] for i in row) for row in rows)
    assert max(sum(lengths[i] for i in row) for row in balanced) <= widest
    assert balance_rows(rows, lengths, 512) == balanced


def test_balance_rows_evens_out_first_fit():
    lengths = [200, 190, 180, 170]
    rows = plan_rows(lengths, 512)
    assert rows == [[0, 1], [2, 3]]  # 390 + 350 tokens, padded to 390
    assert balance_rows(rows, lengths, 512) == [[0, 3], [1, 2]]  # 370 + 370


def test_masked_layout_weighs_padding_against_quadratic_attention(processor, samples):
    common = dict(pad_id=processor.tokenizer.pad_token_id, image_processor=processor.image_processor,
                  max_length=1024, attn_implementation="sdpa")
    longest = max(s.length for s in samples)
    dense = pack_samples(samples, **common)  # no cost model: as few rows of max_length as fit
    assert dense.inputs["input_ids"].shape[0] == 1
    # Attention-dominated (tiny break-even): rows no wider than the longest sample.
    tight = pack_samples(samples, **common, break_even_width=1.0)
    rows, width = tight.inputs["input_ids"].shape
    assert width == longest and 1 < rows < len(samples)
    # Matmul-dominated (7B-like break-even): back to the fewest padded positions.
    wide = pack_samples(samples, **common, break_even_width=25_000.0)
    assert wide.inputs["input_ids"].shape == dense.inputs["input_ids"].shape


def test_attention_break_even_from_config(tiny_llava_dir):
    from transformers import AutoConfig, LlamaConfig

    tiny = attention_break_even(AutoConfig.from_pretrained(tiny_llava_dir))
    llama7b = attention_break_even(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                               vocab_size=32000))
    assert 500 < tiny < 3000 and 20_000 < llama7b < 30_000


def test_plan_rows_fills_rows_and_rejects_oversize():
    assert plan_rows([5, 3, 2, 5, 5], 10) == [[0, 3], [4, 1, 2]]
    with pytest.raises(PackingError, match="bad_length: item 1"):
        plan_rows([3, 11], 10)
