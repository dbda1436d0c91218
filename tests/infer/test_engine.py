"""The continuous-batching engine on the tiny llava-hf model: rows that join and leave a running batch
answer exactly as they would alone; streaming, stop strings, cancellation, failures, closing."""

from __future__ import annotations

import copy
import json
import time
from concurrent.futures import Future

import pytest
import torch._dynamo
from PIL import Image
from transformers import DynamicCache

from llava.infer.engine import ContinuousEngine, DecodeRequest, EngineClosed, SequentialEngine
from llava.infer.engines import make_engine
from llava.infer.generate import GenerationResult, encode_prompts, generate_batch, render_prompt
from llava.infer.load import load_for_inference


@pytest.fixture(scope="module")
def tiny(tiny_llava_dir):
    return load_for_inference(str(tiny_llava_dir), device="cpu")


def _messages(text: str, colour=None, size=(64, 40)) -> list[dict]:
    content: list[dict] = [{"type": "text", "text": text}]
    if colour is not None:
        content.insert(0, {"type": "image", "image": Image.new("RGB", size, colour)})
    return [{"role": "user", "content": content}]


PROMPTS = [
    _messages("What colour is the shape?", (200, 30, 30)),
    _messages("how many circles are there"),
    _messages("describe the picture in detail", (10, 200, 40), (32, 96)),
    _messages("where is the blue square?", (20, 20, 220), (90, 30)),
]


def _request(processor, messages, budget: int, **kw) -> tuple[DecodeRequest, Future]:
    done: Future = Future()
    prompt = render_prompt(processor, messages)
    req = DecodeRequest(prompt=prompt, encoded=encode_prompts(processor, [prompt]), max_new_tokens=budget,
                        on_done=done.set_result, **kw)
    return req, done


def _alone(model, processor, messages, budget: int, **kw) -> GenerationResult:
    return generate_batch(model, processor, [{"messages": messages}], max_new_tokens=budget, **kw)[0]


def _wait_steps(engine: ContinuousEngine, n: int) -> None:
    deadline = time.monotonic() + 60
    while len(engine.batch_sizes) < n:
        assert time.monotonic() < deadline, "engine made no progress"
        time.sleep(0.001)


def test_rows_joining_and_leaving_answer_as_alone(tiny):
    """Rows arrive while others decode (cache splicing with left padding) and leave at different
    steps (row removal, column trimming); every row's tokens must equal decoding it alone."""
    model, processor = tiny
    budgets = [24, 6, 30, 12]
    engine = ContinuousEngine(model, processor, max_rows=8)
    try:
        futures = []
        for i, (messages, budget) in enumerate(zip(PROMPTS, budgets, strict=True)):
            req, fut = _request(processor, messages, budget)
            engine.submit(req)
            futures.append(fut)
            _wait_steps(engine, 4 * (i + 1))  # the next row joins a batch that is already decoding
        results = [f.result(timeout=120) for f in futures]
    finally:
        engine.close()
    expected = [_alone(model, processor, m, b) for m, b in zip(PROMPTS, budgets, strict=True)]
    assert [r.text for r in results] == [e.text for e in expected]
    assert [r.completion_tokens for r in results] == [e.completion_tokens for e in expected]
    assert [r.prompt_tokens for r in results] == [e.prompt_tokens for e in expected]
    assert [r.finish_reason for r in results] == [e.finish_reason for e in expected]
    assert max(engine.batch_sizes) > 1, "the rows never shared a step"
    assert engine.load == 0


def test_max_rows_caps_the_batch_and_queues_the_rest(tiny):
    model, processor = tiny
    engine = ContinuousEngine(model, processor, max_rows=2)
    try:
        pairs = [_request(processor, m, 8) for m in PROMPTS]
        for req, _ in pairs:
            engine.submit(req)
        results = [fut.result(timeout=120) for _, fut in pairs]
    finally:
        engine.close()
    assert max(engine.batch_sizes) == 2
    assert [r.text for r in results] == [_alone(model, processor, m, 8).text for m in PROMPTS]


def test_streaming_deltas_and_stop_strings(tiny):
    model, processor = tiny
    full = _alone(model, processor, PROMPTS[0], 20)
    assert len(full.text) > 6, "need some text to pick a stop string from"
    stop = full.text[3:6]
    engine = ContinuousEngine(model, processor, max_rows=4)
    try:
        pieces: list[str] = []
        streamed, s_done = _request(processor, PROMPTS[0], 20, on_text=lambda d: pieces.append(d.text))
        stopped, t_done = _request(processor, PROMPTS[0], 20, stops=[stop])
        engine.submit(streamed)
        engine.submit(stopped)
        whole, cut = s_done.result(timeout=120), t_done.result(timeout=120)
    finally:
        engine.close()
    assert whole.text == full.text
    # The deltas stream a prefix; the last step's text travels with the result (and its finish reason).
    assert full.text.startswith("".join(pieces)) and len("".join(pieces)) < len(full.text)
    assert len(pieces) > 1, "the answer came in one piece, not streamed"
    assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason == "stop"
    assert cut.completion_tokens < full.completion_tokens


def test_seeded_sampling_ignores_neighbours(tiny):
    model, processor = tiny
    engine = ContinuousEngine(model, processor, max_rows=8)
    try:
        alone, a_done = _request(processor, PROMPTS[1], 16, temperature=1.0, top_p=0.9, seed=7)
        engine.submit(alone)
        first = a_done.result(timeout=120)
        crowd = [_request(processor, m, 16, temperature=1.0, seed=i) for i, m in enumerate(PROMPTS)]
        again, b_done = _request(processor, PROMPTS[1], 16, temperature=1.0, top_p=0.9, seed=7)
        for req, _ in crowd[:2]:
            engine.submit(req)
        engine.submit(again)
        for req, _ in crowd[2:]:
            engine.submit(req)
        second = b_done.result(timeout=120)
        for _, fut in crowd:
            fut.result(timeout=120)
    finally:
        engine.close()
    assert first.text == second.text


def test_cancelled_row_leaves_and_others_finish(tiny):
    model, processor = tiny
    engine = ContinuousEngine(model, processor, max_rows=8)
    try:
        doomed, d_done = _request(processor, PROMPTS[2], 200)
        survivor, s_done = _request(processor, PROMPTS[0], 12)
        engine.submit(doomed)
        engine.submit(survivor)
        _wait_steps(engine, 3)
        doomed.cancel()
        result = s_done.result(timeout=120)
        deadline = time.monotonic() + 30
        while engine.load and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.close()
    assert result.text == _alone(model, processor, PROMPTS[0], 12).text
    assert engine.load == 0 and not d_done.done(), "a cancelled request must leave without an answer"
    assert doomed.steps < 200


def _fail_then_recover(engine, processor, messages, budget: int) -> tuple:
    """Two requests one after the other (the first meets the injected failure); the engine is closed after."""
    try:
        results = []
        for _ in range(2):
            req, fut = _request(processor, messages, budget)
            engine.submit(req)
            results.append(fut.result(timeout=120))
    finally:
        engine.close()
    return results[0], results[1]


def test_a_failing_decode_forward_is_retried_on_the_kept_cache(tiny):
    """One failing forward: the columns it appended are cut and the step retried, so the row's
    answer is exactly its answer alone. Two in a row: that step's rows fail, the engine lives on."""
    model, processor = tiny
    calls = {"n": 0}
    failing = {3}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        out = model(*args, **kwargs)  # the forward runs (and appends to the cache) before failing
        if calls["n"] in failing:
            raise RuntimeError("simulated device error")
        return out

    expected = _alone(model, processor, PROMPTS[0], 10).text
    engine = ContinuousEngine(_CallThrough(model, flaky), processor, max_rows=4)
    retried, again = _fail_then_recover(engine, processor, PROMPTS[0], 10)
    assert retried.text == again.text == expected
    assert engine.failures["decode"] == 1
    calls["n"], failing = 0, {3, 4}
    engine = ContinuousEngine(_CallThrough(model, flaky), processor, max_rows=4)
    failed, recovered = _fail_then_recover(engine, processor, PROMPTS[0], 10)
    assert isinstance(failed, RuntimeError) and "simulated" in str(failed)
    assert recovered.text == expected


class _CallThrough:
    """A model stand-in whose call goes through `fn` and everything else to the real model."""

    def __init__(self, model, fn):
        self._model, self._fn = model, fn

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def test_close_drains_then_refuses(tiny):
    model, processor = tiny
    engine = ContinuousEngine(model, processor, max_rows=4)
    req, fut = _request(processor, PROMPTS[1], 8)
    engine.submit(req)
    engine.close(timeout=120)
    assert isinstance(fut.result(timeout=0), GenerationResult), "in-flight work must finish on close"
    with pytest.raises(EngineClosed):
        engine.submit(_request(processor, PROMPTS[1], 8)[0])


def test_models_with_logit_rules_get_the_sequential_engine(tiny):
    model, processor = tiny
    penalised = copy.deepcopy(model)
    penalised.generation_config.repetition_penalty = 1.5
    engine = make_engine(penalised, processor, max_rows=8)
    try:
        assert isinstance(engine, SequentialEngine)
        pieces: list[str] = []
        plain, p_done = _request(processor, PROMPTS[0], 12)
        streamed, s_done = _request(processor, PROMPTS[0], 12, on_text=lambda d: pieces.append(d.text))
        engine.submit(plain)
        engine.submit(streamed)
        a, b = p_done.result(timeout=120), s_done.result(timeout=120)
    finally:
        engine.close()
    expected = _alone(penalised, processor, PROMPTS[0], 12)
    assert a.text == b.text == expected.text and expected.text.startswith("".join(pieces))
    plain_engine = make_engine(model, processor, max_rows=8)
    plain_engine.close()
    assert isinstance(plain_engine, ContinuousEngine)


def test_a_lone_arrival_waits_to_share_its_prefill(tiny):
    """With rows decoding, one arrival waits (up to admit_wait_s) for others before its prefill;
    as many arrivals as rows running are admitted at once."""
    model, processor = tiny
    engine = ContinuousEngine(model, processor, max_rows=8, admit_wait_s=3600)
    try:
        running = [_request(processor, m, 150) for m in PROMPTS[:2]]
        for req, _ in running:
            engine.submit(req)
        _wait_steps(engine, 3)
        late, l_done = _request(processor, PROMPTS[2], 4)
        engine.submit(late)
        time.sleep(0.05)
        assert engine.load == 3 and late.steps == 0, "a lone arrival joined at once"
        pair = [_request(processor, m, 4) for m in PROMPTS[2:]]
        for req, _ in pair:
            engine.submit(req)
        for _, fut in [*running, *pair, (late, l_done)]:
            fut.result(timeout=120)
    finally:
        engine.close()
    assert max(engine.batch_sizes) == 5, "three arrivals behind two running rows are admitted together"
    assert l_done.result().text == _alone(model, processor, PROMPTS[2], 4).text


def test_compiled_decode_matches_eager_and_serves_any_batch(tiny):
    from llava.infer.engine import compiled_decode_step

    model, processor = tiny
    torch._dynamo.reset()
    engine = ContinuousEngine(model, processor, max_rows=8, compile_decode=True)
    try:
        assert engine.compiled_fn is not None, "compiling fell back to eager on this machine"
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        # Rows join and leave: batch sizes 1..4 and growing cache lengths, none may recompile.
        pairs = []
        for i, messages in enumerate(PROMPTS):
            pairs.append(_request(processor, messages, 6 + 4 * i))
            engine.submit(pairs[-1][0])
            _wait_steps(engine, 3 * (i + 1))
        results = [fut.result(timeout=300) for _, fut in pairs]
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "a batch shape recompiled"
    finally:
        engine.close()
    assert [r.completion_tokens for r in results] == [
        _alone(model, processor, m, 6 + 4 * i).completion_tokens for i, m in enumerate(PROMPTS)]
    # Same logits as the eager step (the compiler may reorder float sums, nothing more).
    prompt = render_prompt(processor, PROMPTS[0])
    inputs = encode_prompts(processor, [prompt])
    with torch.inference_mode():
        eager_cache, compiled_cache = DynamicCache(), DynamicCache()
        model(**inputs, past_key_values=eager_cache, use_cache=True)
        model(**inputs, past_key_values=compiled_cache, use_cache=True)
        attn = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(1, 1)], dim=1)
        pos = torch.tensor([[attn.shape[1] - 1]])
        token = torch.tensor([[5]])
        eager = model(input_ids=token, attention_mask=attn, position_ids=pos, past_key_values=eager_cache).logits
        step = compiled_decode_step(model, 0)
        compiled = step(input_ids=token, attention_mask=attn, position_ids=pos, past_key_values=compiled_cache).logits
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


def test_a_failing_compiled_step_cools_down_eagerly_then_is_tried_again(tiny):
    model, processor = tiny
    engine = ContinuousEngine(model, processor, max_rows=4)
    engine._cooldown = 3  # steps of eager decoding after the first failure (doubling after each)
    calls = {"n": 0}

    def broken_compiled_step(**kwargs):
        calls["n"] += 1
        raise RuntimeError("compiled kernel failed")

    engine.compiled_fn = broken_compiled_step  # what compiled_decode_step returned, gone bad mid-serving
    first, second = _fail_then_recover(engine, processor, PROMPTS[1], 8)
    expected = _alone(model, processor, PROMPTS[1], 8).text
    assert first.text == second.text == expected, "the eager retry must answer the request"
    # 16 decode steps: failure at step 0 -> eager for 3, retry at 3 -> eager for 6, retry at 9 -> eager for 12.
    assert engine.failures["compiled_decode"] == calls["n"] == 3
    assert engine.decoding_eagerly


def test_a_failing_generate_answers_its_request_in_the_sequential_engine(tiny):
    model, processor = tiny
    penalised = copy.deepcopy(model)
    penalised.generation_config.repetition_penalty = 1.5
    calls = {"n": 0}

    class FailsOnce(_CallThrough):
        def generate(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("simulated device error")
            return penalised.generate(*args, **kwargs)

    engine = make_engine(FailsOnce(penalised, penalised), processor, max_rows=4)
    assert isinstance(engine, SequentialEngine)
    failed, recovered = _fail_then_recover(engine, processor, PROMPTS[0], 8)
    assert isinstance(failed, RuntimeError) and "simulated" in str(failed)
    assert recovered.text == _alone(penalised, processor, PROMPTS[0], 8).text


def test_json_object_rows_answer_one_json_object(tiny):
    model, processor = tiny
    engine = ContinuousEngine(model, processor, max_rows=4)
    try:
        pairs = [_request(processor, PROMPTS[1], 120, json_object=True),
                 _request(processor, PROMPTS[0], 120, json_object=True, temperature=0.9, seed=3)]
        for req, _ in pairs:
            engine.submit(req)
        results = [fut.result(timeout=120) for _, fut in pairs]
    finally:
        engine.close()
    for res in results:
        if res.finish_reason == "stop":
            assert isinstance(json.loads(res.text), dict), res.text
        else:  # out of budget: still a prefix of an object
            assert res.text.lstrip().startswith("{"), res.text


def test_shared_prompts_prefill_once_and_the_budget_splits_prefills(tiny):
    """Rows sharing one encoded prompt (the n answers of a request) take one prefill row; a prefill
    budget of one prompt's tokens admits the other prompt in a prefill of its own."""
    model, processor = tiny
    prefills: list[int] = []

    def counting(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            prefills.append(kwargs["input_ids"].shape[0])
        return model(*args, **kwargs)

    shared, first = _request(processor, PROMPTS[0], 6)
    twin, second = _request(processor, PROMPTS[0], 6)
    twin.encoded = shared.encoded
    other, third = _request(processor, PROMPTS[1], 6)
    engine = ContinuousEngine(_CallThrough(model, counting), processor, max_rows=4,
                              prefill_tokens=shared.prompt_tokens)
    try:
        with engine._wake:  # queue all three before the engine looks
            for req in (shared, twin, other):
                req.submitted = time.monotonic()
                engine._pending.append(req)
            engine._wake.notify()
        results = [f.result(timeout=120) for f in (first, second, third)]
    finally:
        engine.close()
    assert prefills == [1, 1], "one prefill row for the twins, the other prompt in a second prefill"
    assert results[0].text == results[1].text == _alone(model, processor, PROMPTS[0], 6).text
    assert results[2].text == _alone(model, processor, PROMPTS[1], 6).text


def test_a_row_whose_sampling_fails_leaves_alone(tiny):
    """A row whose token choice throws (here a bias on a token id outside the vocabulary) gets the
    error; the rows decoding beside it answer exactly as they would alone."""
    model, processor = tiny
    engine = ContinuousEngine(model, processor, max_rows=4)
    try:
        healthy = [_request(processor, m, 10) for m in PROMPTS[:2]]
        poisoned, p_done = _request(processor, PROMPTS[2], 10, logit_bias={10**6: 1.0})
        for req, _ in (*healthy, (poisoned, p_done)):
            engine.submit(req)
        results = [fut.result(timeout=120) for _, fut in healthy]
        failure = p_done.result(timeout=120)
    finally:
        engine.close()
    assert isinstance(failure, Exception) and engine.failures["sampling"] == 1
    assert [r.text for r in results] == [_alone(model, processor, m, 10).text for m in PROMPTS[:2]]
