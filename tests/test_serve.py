"""`lm serve`'s API against real clients: the official `openai` package, raw HTTP (httpx2, raw
sockets for disconnects) and lm-eval's remote tokenizer and logprob parser, on one server over
the trained `tiny` run.

References are independent of the server: greedy texts come from `Engine.generate` on the same
ids, logprobs from a plain forward pass of the restored model with a hand-written log-softmax,
metrics through prometheus_client's own text parser.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx2
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from flax import nnx
from prometheus_client.parser import text_string_to_metric_families

from lm.errors import QueueFull
from lm.inference.engine import Engine, SamplingParams
from lm.serve.app import STATIC_DIR, create_app
from lm.serve.runner import ServerThread
from lm.tokenizer import chat

KEY = "sk-test-serve"
# The params sit on a mesh over all 8 (fake) devices, whose data axis shards the cache's slot
# rows: the slot count must divide by it.
SLOTS = 8
AUTH = {"Authorization": f"Bearer {KEY}"}


class PacedEngine(Engine):
    """The engine with an adjustable pause before each step: the tiny model decodes a token in
    about a millisecond, too fast to see a request hold a slot; tests that need that set
    `pause_s` (the `paced` fixture)."""

    pause_s = 0.0

    def step(self) -> None:
        if self.pause_s:
            time.sleep(self.pause_s)
        super().step()


@pytest.fixture(scope="module")
def served(tiny_workdir):
    """One engine (SLOTS slots) behind two apps: the main one, and one that answers 429 as soon as
    a request waits (max_queue=1)."""
    engine = PacedEngine.from_workdir(tiny_workdir, slots=SLOTS)
    app = create_app(engine, model_name="tiny", api_key=KEY, owns_engine=False)
    busy = create_app(engine, model_name="tiny", api_key=KEY, max_queue=1, owns_engine=False)
    with ServerThread(app) as url, ServerThread(busy) as busy_url:
        http = httpx2.Client(base_url=url, headers=AUTH, timeout=60)
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        yield SimpleNamespace(
            url=url, busy_url=busy_url, engine=engine, vocab=engine.vocab, http=http, client=client
        )
        http.close()
    engine.shutdown()


@pytest.fixture
def paced(served):
    served.engine.pause_s = 0.02
    yield served
    served.engine.pause_s = 0.0


def greedy(served, ids: list[int], max_tokens: int, **kw) -> str:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)
    return served.engine.generate([ids], params)[0].text


def wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


# -- the openai client ---------------------------------------------------------------------------


def test_openai_completions_string_list_and_ids(served):
    c, vocab = served.client, served.vocab
    assert [m.id for m in c.models.list().data] == ["tiny"]
    prompts = ["The model", "data is"]
    ids = [served.engine.encode_prompt(p) for p in prompts]
    expected = [greedy(served, i, 6) for i in ids]
    one = c.completions.create(model="tiny", prompt=prompts[0], max_tokens=6, temperature=0)
    assert one.choices[0].text == expected[0]
    assert one.usage.prompt_tokens == len(ids[0])
    assert one.usage.completion_tokens == 6 or one.choices[0].finish_reason == "stop"
    both = c.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0)
    assert [ch.index for ch in both.choices] == [0, 1]
    assert [ch.text for ch in both.choices] == expected
    assert both.usage.prompt_tokens == len(ids[0]) + len(ids[1])
    by_ids = c.completions.create(model="tiny", prompt=ids[1], max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == expected[1]
    lists = c.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert [ch.text for ch in lists.choices] == expected
    assert vocab.decode(ids[0][1:]) == prompts[0]


def test_openai_chat(served):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the"}]
    ids = chat.apply_chat_template(served.vocab, messages)
    end = chat.chat_stop_token_ids(served.vocab)
    expected = greedy(served, ids, 10, stop_token_ids=end)
    reply = served.client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.total_tokens == len(ids) + reply.usage.completion_tokens


def test_openai_streaming_matches_plain(served):
    c = served.client
    plain = c.completions.create(model="tiny", prompt="the loss", max_tokens=12, temperature=0)
    chunks = list(
        c.completions.create(
            model="tiny", prompt="the loss", max_tokens=12, temperature=0, stream=True
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason

    messages = [{"role": "user", "content": "packed"}]
    plain = c.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    stream = c.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(ch.usage is None for ch in chunks[:-1])


def test_echo_logprobs_match_a_reference_forward_pass(served):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    ids = served.engine.encode_prompt("the model falls when data")
    out = served.client.completions.create(
        model="tiny", prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True
    )
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 == len(lp.tokens) == len(lp.top_logprobs)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None

    # The plain forward pass over the whole prompt (no cache, no chunks) with the same weights.
    graphdef = served.engine.graphdef

    @jax.jit
    def forward(params, tokens, positions):
        return nnx.merge(graphdef, params)(tokens, positions, jnp.ones_like(tokens))[0]

    tokens = jnp.asarray([ids], jnp.int32)
    positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
    logits = forward(served.engine.params, tokens, positions)
    x = np.asarray(logits[0], np.float64)
    shifted = x - x.max(-1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))  # log-softmax by hand
    expected = [logprobs[i - 1, ids[i]] for i in range(1, len(ids))]
    np.testing.assert_allclose(lp.token_logprobs[1 : len(ids)], expected, atol=1e-4)
    # The greedy new token: the most likely one after the prompt, and top-1 is itself.
    np.testing.assert_allclose(lp.token_logprobs[-1], logprobs[-1].max(), atol=1e-4)
    assert lp.tokens[-1] == served.vocab.decode([int(logprobs[-1].argmax())])
    for i in range(1, len(ids)):
        assert len(lp.top_logprobs[i]) == 1
        top = max(lp.top_logprobs[i].values())
        np.testing.assert_allclose(top, logprobs[i - 1].max(), atol=1e-4)

    # lm-eval's own parser on the raw JSON: the continuation's summed logprob and greediness.
    ctxlen = 3
    raw = served.http.post(
        "/v1/completions",
        json={"prompt": [ids], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True},
    ).json()
    [(total, is_greedy)] = LocalCompletionsAPI.parse_logprobs(raw, [ids], [ctxlen])
    np.testing.assert_allclose(total, sum(expected[ctxlen - 1 :]), atol=1e-3)
    greedy_path = all(
        logprobs[i - 1, ids[i]] >= logprobs[i - 1].max() - 1e-6 for i in range(ctxlen, len(ids))
    )
    assert is_greedy == greedy_path

    # A text prompt: the start token the server added is not echoed.
    text = served.client.completions.create(
        model="tiny", prompt="the model", max_tokens=2, temperature=0, logprobs=1, echo=True
    ).choices[0]
    assert text.text.startswith("the model")
    assert len(text.logprobs.token_logprobs) == len(served.vocab.encode("the model")) + 2
    np.testing.assert_allclose(text.logprobs.token_logprobs[0], expected[0], atol=1e-4)


def test_wrong_or_missing_key_is_401(served):
    bad = openai.OpenAI(base_url=served.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="x", max_tokens=1)
    r = httpx2.post(served.url + "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert httpx2.get(served.url + "/health").status_code == 200  # probes need no key


# -- raw HTTP ------------------------------------------------------------------------------------


def test_sse_framing_is_byte_exact(served):
    body = {"prompt": "the", "max_tokens": 5, "temperature": 0, "stream": True}
    with served.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_raw())
    assert re.fullmatch(rb"(data: \{[^\n]*\}\n\n)+data: \[DONE\]\n\n", raw), raw
    events = [json.loads(e[len(b"data: ") :]) for e in raw.split(b"\n\n")[:-2]]
    assert {e["object"] for e in events} == {"text_completion"}
    assert len({e["id"] for e in events}) == 1
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "".join(e["choices"][0]["text"] for e in events) == greedy(
        served, served.engine.encode_prompt("the"), 5
    )


BAD_REQUESTS = [
    ("/v1/completions", {"prompt": 5}, 422, "prompt"),
    ("/v1/completions", {"max_tokens": 3}, 422, "prompt"),
    ("/v1/completions", {"prompt": "x", "echo": "maybe"}, 422, "echo"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 200}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [[5, 99999]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": ["a"] * 17}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-9"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 422, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        400,
        "top_logprobs",
    ),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/tokenize", {}, 400, "prompt"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_requests_get_openai_error_shape(served, path, body, status, param):
    r = served.http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"] or "").split(".")[0] == param


def test_null_fields_take_their_defaults(served):
    body = {"prompt": "the", "max_tokens": None, "temperature": None, "top_p": None, "n": 1}
    r = served.http.post("/v1/completions", json={**body, "ignore_eos": True, "seed": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16
    # Chat without max_tokens may use the rest of the context.
    messages = [{"role": "user", "content": "the"}]
    r = served.http.post("/v1/chat/completions", json={"messages": messages, "temperature": 0})
    usage = r.json()["usage"]
    assert r.status_code == 200 and usage["total_tokens"] <= 128


def test_malformed_json_is_422(served):
    r = served.http.post(
        "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request_error"


def test_stop_strings_cut_the_text(served):
    full = greedy(served, served.engine.encode_prompt("the data"), 12)
    stop = full[2:4]
    r = served.http.post(
        "/v1/completions",
        json={"prompt": "the data", "max_tokens": 12, "temperature": 0, "stop": stop},
    ).json()
    assert r["choices"][0]["text"] == full[: full.index(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"


def test_seed_is_reproducible_and_n_gives_distinct_choices(served):
    def sample(n: int, seed: int) -> list[list[str]]:
        body = {"prompt": "the", "max_tokens": 8, "temperature": 1.0, "seed": seed, "n": n}
        r = served.http.post("/v1/completions", json={**body, "logprobs": 0}).json()
        assert [c["index"] for c in r["choices"]] == list(range(n))
        return [c["logprobs"]["tokens"] for c in r["choices"]]

    first = sample(2, 7)
    assert sample(2, 7) == first
    assert first[0] != first[1]
    assert sample(1, 7) == first[:1]
    assert sample(1, 8) != first[:1]


def test_tokenizer_endpoints(served):
    vocab, http = served.vocab, served.http
    tokens = http.post("/tokenize", json={"prompt": "the model"}).json()
    assert tokens["tokens"] == [3] + vocab.encode("the model")
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 128
    plain = http.post("/tokenize", json={"prompt": "the model", "add_special_tokens": False})
    assert plain.json()["tokens"] == vocab.encode("the model")
    messages = [{"role": "user", "content": "hi"}]
    by_chat = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    assert by_chat == [3, 5] + vocab.encode("hi") + [7, 6]
    back = http.post("/detokenize", json={"tokens": vocab.encode("the model")}).json()
    assert back == {"prompt": "the model"}
    info = http.get("/tokenizer_info").json()
    assert (info["eos_token"], info["bos_token"], info["pad_token"]) == ("</s>", "<s>", "<pad>")
    assert info["model_max_length"] == 128 and info["vocab_size"] == vocab.vocab_size
    assert info["chat_template"] == chat.chat_template_string(vocab)


def test_lm_eval_remote_tokenizer(served):
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    base = served.url + "/v1/completions"
    assert check_remote_tokenizer_support(base, auth_token=KEY)
    assert not check_remote_tokenizer_support(base, auth_token="sk-wrong", max_retries=1)
    remote = RemoteTokenizer(base, auth_token=KEY)
    vocab = served.vocab
    assert remote.eos_token_id == vocab.eos_id and remote.bos_token_id == 3
    assert remote.encode("the loss") == vocab.encode("the loss")
    assert remote.decode(vocab.encode("the loss")) == "the loss"
    messages = [{"role": "user", "content": "the"}, {"role": "assistant", "content": "loss"}]
    rendered = remote.apply_chat_template(messages, add_generation_prompt=True)
    assert remote.encode(rendered) == chat.apply_chat_template(vocab, messages)


def test_health_and_metrics_move(served):
    assert served.http.get("/health").json() == {"status": "ok"}

    def scrape() -> dict[str, float]:
        text = httpx2.get(served.url + "/metrics").text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    before = scrape()
    ids = served.engine.encode_prompt("the model")
    body = {"prompt": ids, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    assert served.http.post("/v1/completions", json=body).status_code == 200
    after = scrape()
    key = "lm_requests_total{endpoint=/v1/completions,status=200}"
    assert after[key] == before.get(key, 0) + 1
    assert after["lm_generated_tokens_total"] == before["lm_generated_tokens_total"] + 5
    assert after["lm_prompt_tokens_total"] == before["lm_prompt_tokens_total"] + len(ids)
    ttft = "lm_time_to_first_token_seconds_count"
    assert after[ttft] == before[ttft] + 1
    assert after["lm_generation_tokens_per_second"] > 0
    assert after["lm_queue_depth"] == 0 and after["lm_running_sequences"] == 0
    assert after["lm_slots"] == SLOTS


# -- queueing and disconnects --------------------------------------------------------------------


def _post_raw(url: str, path: str, body: dict) -> socket.socket:
    """A raw HTTP/1.1 POST left open, so the test decides when the client goes away."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def test_full_queue_is_429(paced):
    served = paced
    long = {"prompt": "the", "max_tokens": 60, "temperature": 0, "ignore_eos": True}
    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(served.http.post("/v1/completions", json=long))
        )
        for _ in range(SLOTS + 1)
    ]
    for t in threads:
        t.start()
    stats = served.engine.stats
    assert wait_for(lambda: stats()["running"] == SLOTS and stats()["waiting"] == 1, 10)
    r = httpx2.post(served.busy_url + "/v1/completions", json=long, headers=AUTH)
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "queue_full"
    busy = openai.OpenAI(base_url=served.busy_url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        busy.completions.create(model="tiny", prompt="the", max_tokens=2)
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200] * (SLOTS + 1)


class StubEngine:
    """The engine's interface without a model: `full` refuses every request as the engine does
    with a full queue; otherwise requests are taken and never answered, and `running` says
    whether the engine thread is alive."""

    max_len, start_id = 128, 3

    def __init__(self, vocab, full: bool, running: bool):
        self.vocab, self.full, self.running = vocab, full, running
        self.cancelled = []

    def encode_prompt(self, text):
        return [3] + self.vocab.encode(text)

    def submit(self, prompt, params, callback):
        if self.full:
            raise QueueFull("256 requests are waiting; retry later")
        return 17

    def cancel(self, request_id):
        self.cancelled.append(request_id)

    def stats(self):
        return dict(waiting=256, running=8, slots=8, generated_tokens=0, prompt_tokens=0)

    def start(self):
        pass


def test_engine_refusals_are_429_and_a_dead_engine_503(served):
    chat_body = {"messages": [{"role": "user"}]}
    full = StubEngine(served.vocab, full=True, running=True)
    with ServerThread(create_app(full, model_name="tiny", owns_engine=False)) as url:
        r = httpx2.post(url + "/v1/chat/completions", json=chat_body)
    assert r.status_code == 429 and "retry later" in r.json()["error"]["message"]

    dead = StubEngine(served.vocab, full=False, running=False)
    with ServerThread(create_app(dead, model_name="tiny", owns_engine=False)) as url:
        assert httpx2.get(url + "/health").status_code == 503
        r = httpx2.post(url + "/v1/chat/completions", json=chat_body, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped"
        body = {"prompt": "x", "stream": True}
        r = httpx2.post(url + "/v1/completions", json=body, timeout=10)
        events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e]
        assert events[-1]["error"]["code"] == "engine_stopped"


def test_disconnect_frees_the_slot_for_a_waiting_request(paced):
    served = paced
    stats = served.engine.stats
    long = {"prompt": "the", "max_tokens": 110, "temperature": 0, "ignore_eos": True}
    body = {**long, "stream": True}
    streams = [_post_raw(served.url, "/v1/completions", body) for _ in range(SLOTS)]
    try:
        first = streams[0].recv(65536)
        assert b"200 OK" in first
        assert wait_for(lambda: stats()["running"] == SLOTS, 10)
        # One more request waits for a slot: each stream holds one for >= 110 * 20 ms.
        short = {"prompt": "the", "max_tokens": 3, "temperature": 0}
        answer = []
        waiting = threading.Thread(
            target=lambda: answer.append(served.http.post("/v1/completions", json=short))
        )
        waiting.start()
        assert wait_for(lambda: stats()["waiting"] == 1, 10)
        started = time.monotonic()
        streams[0].close()  # the client goes away mid-stream
        waiting.join(timeout=30)
        assert answer and answer[0].status_code == 200
        assert time.monotonic() - started < 1.5  # well before 110 * 20 ms
    finally:
        for s in streams:
            s.close()
    assert wait_for(lambda: stats()["running"] == 0, 2)

    # A plain (non-streamed) request whose client goes away is cancelled too.
    generated = stats()["generated_tokens"]
    sock = _post_raw(served.url, "/v1/completions", long)
    assert wait_for(lambda: stats()["running"] == 1, 10)
    sock.close()
    assert wait_for(lambda: stats()["running"] == 0, 1.0)
    assert stats()["generated_tokens"] - generated < 110


# -- the command and the pages -------------------------------------------------------------------


def test_openapi_and_page(served):
    schema = httpx2.get(served.url + "/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/tokenizer_info"):
        assert path in schema["paths"]
    responses = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert {"200", "400", "401", "422", "429"} <= set(responses)
    page = httpx2.get(served.url + "/")
    if (STATIC_DIR / "index.html").is_file():
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    else:
        assert page.status_code == 404 and "chat page" in page.json()["error"]["message"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    from lm.cli import main

    assert main(["serve", f"--workdir={tmp_path / 'missing'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --workdir") and "does not exist" in err and "Traceback" not in err
    assert main(["serve", f"--workdir={tmp_path}", "--slots=0"]) == 2
    assert "--slots must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_serves_a_workdir(tiny_workdir):
    """`lm serve` as a process: loads, warms up, prints its URL, takes the key from LM_API_KEY."""
    env = {**os.environ, "LM_API_KEY": "sk-env", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "lm.cli", "serve", f"--workdir={tiny_workdir}", "--port=0"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stderr:  # "serving 'run' at http://127.0.0.1:PORT (...)"
            if line.startswith("serving"):
                url = re.search(r"http://\S+", line).group(0)
                break
        else:
            pytest.fail(f"lm serve exited with {process.wait()}")
        assert wait_for(lambda: _up(url), 60)
        models = httpx2.get(url + "/v1/models", headers={"Authorization": "Bearer sk-env"})
        assert models.json()["data"][0]["id"] == "run"
        assert httpx2.get(url + "/v1/models").status_code == 401
        process.send_signal(signal.SIGINT)  # Ctrl-C: the usual way to stop a server
        assert process.wait(timeout=60) == 130
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


def _up(url: str) -> bool:
    try:
        return httpx2.get(url + "/health").status_code == 200
    except httpx2.TransportError:
        return False
