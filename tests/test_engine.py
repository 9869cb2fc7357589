"""The generation engine (lm/inference/engine.py): continuous batching against a plain greedy
loop over the full forward pass, alone and among 15 others; chunked prefill; prompt and token
logprobs against log_softmax by hand; sliding-window, layer-scan, int8 and sharded models; stop
strings, cancellation, the queue limit and bad requests."""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.errors import QueueFull, RequestError
from lm.inference.engine import Engine, SamplingParams
from tests.test_attention_window import VOCAB, forward, make

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


class Ids:
    """A vocabulary whose text is space-separated ids (start id 1; no EOS: a random model
    would end early)."""

    bos_id, eos_id, start_id, vocab_size = 1, -1, 1, VOCAB

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return "".join(f"<{t}>" for t in ids)


def reference_greedy(model, prompt: list[int], new: int) -> list[int]:
    """Greedy continuation by re-running the full forward pass over the whole sequence (in a
    fixed 64-token buffer: causal attention keeps the zeros after position t out of it)."""
    buffer = np.zeros((1, 64), np.int32)
    buffer[0, : len(prompt)] = prompt
    positions, segments = jnp.arange(64)[None], jnp.ones((1, 64), jnp.int32)
    for t in range(len(prompt), len(prompt) + new):
        logits = forward(model, jnp.asarray(buffer), positions, segments)
        buffer[0, t] = int(jnp.argmax(logits[0, t - 1]))
    return buffer[0, len(prompt) : len(prompt) + new].tolist()


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1, *rng.integers(2, VOCAB, int(rng.integers(2, 40))).tolist()] for _ in range(count)]


def engine_for(model, mc, **kwargs) -> Engine:
    graphdef, params = nnx.split(model)
    return Engine(graphdef, params, mc, Ids(), **kwargs)


@pytest.fixture(scope="module")
def llama():
    return make("G", layers=2)


def test_greedy_alone_equals_among_15_others_equals_the_full_forward_loop(llama):
    mc, model = llama
    engine = engine_for(model, mc, slots=16, prefill_chunk=32)
    batch = prompts(16)
    alone = engine.generate([batch[5]], GREEDY)[0]
    together = engine.generate(batch, GREEDY)
    assert together[5].token_ids == alone.token_ids
    assert alone.finish_reason == "length" and len(alone.token_ids) == GREEDY.max_tokens
    # Prompts of 3 to 41 tokens; those over one 32-token chunk are prefilled over two engine
    # steps while others decode (the decode step must leave their half-filled rows alone).
    assert sum(len(p) > 32 for p in batch) >= 2
    for i in range(16):
        assert together[i].token_ids == reference_greedy(model, batch[i], GREEDY.max_tokens)
    assert len({tuple(r.token_ids) for r in together}) > 8  # the outputs depend on the prompt


def test_requests_join_and_leave_between_decode_steps(llama):
    """On the engine thread, requests of different lengths arrive while others decode; slots
    are reused (8 requests, 3 slots) and every output still equals its reference."""
    mc, model = llama
    engine = engine_for(model, mc, slots=3)
    engine.start()
    try:
        batch = prompts(8, seed=1)
        lengths = [3, 9, 5, 12, 2, 7, 4, 10]
        results = [None] * 8

        def run(i):
            params = SamplingParams(max_tokens=lengths[i], temperature=0.0)
            results[i] = engine.generate([batch[i]], params)[0]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
            time.sleep(0.01)
        for t in threads:
            t.join(60)
    finally:
        engine.shutdown()
    for i in range(8):
        assert results[i].token_ids == reference_greedy(model, batch[i], lengths[i])
    assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0


def test_chunked_prefill_and_prompt_logprobs_match_log_softmax(llama):
    mc, model = llama
    prompt = [1, *np.random.default_rng(2).integers(2, VOCAB, 44).tolist()]  # 3 chunks of 16
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, prompt_logprobs=2)
    chunked = engine_for(model, mc, slots=2, prefill_chunk=16).generate([prompt], params)[0]
    whole = engine_for(model, mc, slots=2, prefill_chunk=64).generate([prompt], params)[0]
    assert chunked.token_ids == whole.token_ids == reference_greedy(model, prompt, 4)
    x = jnp.asarray([prompt + chunked.token_ids], jnp.int32)
    logits = forward(model, x, jnp.arange(x.shape[1])[None], jnp.ones_like(x))
    logprobs = np.asarray(jax.nn.log_softmax(logits))
    n = len(prompt)
    expected = [logprobs[0, t - 1, prompt[t]] for t in range(1, n)]
    assert chunked.prompt_logprobs[0] is None and len(chunked.prompt_logprobs) == n
    np.testing.assert_allclose(chunked.prompt_logprobs[1:], expected, atol=1e-5)
    np.testing.assert_allclose(whole.prompt_logprobs[1:], expected, atol=1e-5)
    top = chunked.prompt_top_logprobs[7]
    assert list(top) == np.argsort(-logprobs[0, 6])[:2].tolist()
    generated = [logprobs[0, n - 1 + j, tok] for j, tok in enumerate(chunked.token_ids)]
    np.testing.assert_allclose(chunked.logprobs, generated, atol=1e-5)
    assert [max(t.values()) for t in chunked.top_logprobs] == pytest.approx(chunked.logprobs)


@pytest.mark.parametrize("pattern,scan", [("L", False), ("LG", True), ("G", True)])
def test_sliding_window_and_scanned_models_match_the_full_forward_loop(pattern, scan):
    """Ring-buffer caches of window 4 (prompts and completions far longer), a layer scan."""
    mc, model = make(pattern, layers=2, scan=scan)
    engine = engine_for(model, mc, slots=4, prefill_chunk=16)
    batch = prompts(4, seed=4)
    out = engine.generate(batch, GREEDY)
    for i in (0, 3):
        assert out[i].token_ids == reference_greedy(model, batch[i], GREEDY.max_tokens)


def test_int8_weights_run_through_the_engine(llama):
    from lm.quantize.weights import quantize_loaded

    mc, model = llama
    graphdef, params, qmc = quantize_loaded(*nnx.split(model), 8, 128)
    engine = Engine(graphdef, params, qmc, Ids(), slots=2)
    batch = prompts(2, seed=5)
    out = engine.generate(batch, GREEDY)
    qmodel = nnx.merge(graphdef, params)
    assert out[1].token_ids == reference_greedy(qmodel, batch[1], GREEDY.max_tokens)


def test_sharded_engine_equals_one_device(llama):
    """Params over a (data 2, fsdp 2, tensor 2) mesh of 8 CPU devices, the cache sharded too."""
    from lm import sharding
    from lm.config import get_config

    mc, model = llama
    cfg = get_config("tiny", ["--config.mesh.data=2", "--config.mesh.fsdp=2"])
    cfg.mesh.update(tensor=2)
    mesh = sharding.make_mesh(cfg.mesh)
    graphdef, params = nnx.split(model)
    rules = tuple(tuple(r) for r in cfg.mesh.rules)
    params = jax.device_put(params, sharding.state_shardings(params, mesh, rules))
    engine = Engine(graphdef, params, mc, Ids(), slots=4, rules=rules)
    assert len(jax.tree.leaves(engine._cache)[0].sharding.device_set) == 8
    batch = prompts(4, seed=6)
    sharded = engine.generate(batch, GREEDY)
    single = engine_for(model, mc, slots=4).generate(batch, GREEDY)
    assert [r.token_ids for r in sharded] == [r.token_ids for r in single]


def test_seeded_samples_do_not_depend_on_the_batch(llama):
    mc, model = llama
    engine = engine_for(model, mc, slots=8)
    params = SamplingParams(max_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    batch = prompts(6, seed=8)
    alone = engine.generate([batch[2]], params)[0].token_ids
    among = engine.generate(batch, params)[2].token_ids
    assert alone == among
    other = engine.generate([batch[2]], SamplingParams(max_tokens=10, temperature=1.0, seed=8))
    assert other[0].token_ids != alone


def test_top_k_one_is_greedy_and_stop_strings_are_held_back(llama):
    mc, model = llama
    engine = engine_for(model, mc, slots=2)
    prompt = prompts(1, seed=9)[0]
    greedy = engine.generate([prompt], GREEDY)[0]
    k1 = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=5.0, top_k=1))[0]
    assert k1.token_ids == greedy.token_ids
    # A stop string spanning the 4th token's text and the start of the 5th's: the 4th token's
    # text is held back (it could be the start of the stop string), the text is cut before it,
    # and no streamed delta ever showed a piece of it.
    stop = f"<{greedy.token_ids[3]}><{str(greedy.token_ids[4])[0]}"
    deltas = []
    params = SamplingParams(max_tokens=12, temperature=0.0, stop=(stop,))
    engine.submit(prompt, params, lambda out: deltas.append(out))
    while not deltas or not deltas[-1].finished:
        engine.step()
    text = "".join(d.text for d in deltas)
    assert deltas[-1].finish_reason == "stop"
    first = greedy.text.index(stop)
    assert text == greedy.text[:first] and stop not in text
    # EOS ends a completion with "stop" unless ignore_eos.
    eos = greedy.token_ids[2]
    ended = engine.generate(
        [prompt],
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=False, stop_token_ids=(eos,)),
    )[0]
    assert ended.finish_reason == "stop" and ended.token_ids == greedy.token_ids[:2]


def test_cancel_frees_the_slot_and_the_queue_has_a_limit(llama):
    mc, model = llama
    engine = engine_for(model, mc, slots=1, max_queue=2)
    outputs = []
    long = SamplingParams(max_tokens=20, temperature=0.0)
    first = engine.submit(prompts(1)[0], long, outputs.append)
    engine.submit(prompts(1)[0], long)
    with pytest.raises(QueueFull):
        engine.submit(prompts(1)[0], long)
    engine.step()
    engine.submit(prompts(1)[0], long)
    engine.step()
    assert engine.stats()["running"] == 1 and engine.stats()["waiting"] == 2
    engine.cancel(first)
    engine.step()
    assert outputs[-1].finished and outputs[-1].finish_reason == "abort"
    assert outputs[-1].completion_tokens < long.max_tokens  # cut short (blocks of 8 tokens)
    assert engine.stats() | {"generated_tokens": 0, "prompt_tokens": 0} == {
        "waiting": 1,
        "running": 1,
        "slots": 1,
        "generated_tokens": 0,
        "prompt_tokens": 0,
    }


@pytest.mark.parametrize(
    "prompt,params,message",
    [
        ([], SamplingParams(), "empty"),
        ([1, VOCAB], SamplingParams(), "outside the vocabulary"),
        ([1] * 60, SamplingParams(max_tokens=10), "exceeds the model's context of 64"),
        ([1, 2], SamplingParams(temperature=-1), "temperature"),
        ([1, 2], SamplingParams(top_p=0), "top_p"),
        ([1, 2], SamplingParams(logprobs=21), "logprobs"),
        ([1, 2], SamplingParams(max_tokens=0), "max_tokens"),
    ],
)
def test_bad_requests_are_one_line_errors(llama, prompt, params, message):
    mc, model = llama
    engine = engine_for(model, mc, slots=1)
    with pytest.raises(RequestError, match=message):
        engine.submit(prompt, params)


def test_a_failed_step_ends_the_requests_in_flight_and_serving_goes_on(llama, monkeypatch):
    """A decode step that raises (say, a device error) ends every running and waiting request
    with finish_reason "error" instead of leaving its caller waiting; the engine thread lives
    on and serves the next request from a fresh cache."""
    from lm.inference import steps

    mc, model = llama
    engine = engine_for(model, mc, slots=1)
    real, calls = steps.decode, []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated device failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(steps, "decode", failing_once)
    engine.start()
    try:
        batch = prompts(2, seed=10)
        failed = engine.generate(batch, GREEDY)
        assert [r.finish_reason for r in failed] == ["error", "error"]
        assert engine.running
        again = engine.generate([batch[0]], GREEDY)[0]
    finally:
        engine.shutdown()
    assert again.token_ids == reference_greedy(model, batch[0], GREEDY.max_tokens)
