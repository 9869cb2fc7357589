"""A bounded load test: 64 concurrent streaming chat clients against one server on 127.0.0.1.

Why: continuous batching, the per-request queues and SSE streaming only show their races under
many concurrent streams. Every stream must succeed and be complete: HTTP 200, well-formed
`data:` events of one completion id, exactly one finish reason, a usage chunk, and `data: [DONE]`
last. Each client samples with its own seed, and the engine promises the same seed gives the same
sample whatever else runs; so each stream's text (its content deltas joined) must equal the text
of the same request answered without streaming, in a second wave of 64 concurrent requests
that the engine batches differently.

The clients are asyncio tasks over aiohttp (raw SSE lines, so the test sees exactly what a client
gets). Prints requests/s, completion tokens/s and time to first content.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import aiohttp
import pytest

from lm.inference.engine import Engine
from lm.serve.app import create_app
from lm.serve.runner import ServerThread

CLIENTS = 64
SLOTS = 16
MAX_TOKENS = 16
WALL_LIMIT_S = 120


@pytest.fixture(scope="module")
def server(tiny_workdir):
    engine = Engine.from_workdir(tiny_workdir, slots=SLOTS, max_queue=4 * CLIENTS)
    with ServerThread(create_app(engine, model_name="tiny")) as url:
        yield url, engine


def _request(client: int, stream: bool) -> dict:
    body = {
        "model": "tiny",
        "messages": [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": f"Client {client} asks: what is {client} plus {client}?"},
        ],
        "max_tokens": MAX_TOKENS,
        "temperature": 0.9,
        "seed": 1000 + client,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def _stream(session: aiohttp.ClientSession, url: str, client: int) -> dict:
    """One streaming client: its parsed events, text, usage, time to first content."""
    start = time.perf_counter()
    first_content = None
    events: list[str] = []
    data: list[str] = []
    async with session.post(url + "/v1/chat/completions", json=_request(client, True)) as resp:
        assert resp.status == 200, f"client {client}: HTTP {resp.status}: {await resp.text()}"
        assert resp.headers["content-type"].startswith("text/event-stream")
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            elif line == "" and data:
                events.append("\n".join(data))
                data = []
                if first_content is None and '"content":"' in events[-1]:
                    if json.loads(events[-1])["choices"][0]["delta"].get("content"):
                        first_content = time.perf_counter() - start
    assert not data, f"client {client}: the stream ended inside an event"
    assert events and events[-1] == "[DONE]", f"client {client}: no data: [DONE] at the end"
    assert events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    ids = {chunk["id"] for chunk in chunks}
    assert len(ids) == 1, f"client {client}: chunks of several completions {ids}"
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert choices[0]["delta"].get("role") == "assistant"
    reasons = [c["finish_reason"] for c in choices if c["finish_reason"] is not None]
    assert len(reasons) == 1 and reasons[0] in ("stop", "length"), (client, reasons)
    usage = chunks[-1]["usage"]  # include_usage: the last chunk, with no choices
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] <= MAX_TOKENS
    text = "".join(c["delta"].get("content") or "" for c in choices)
    return {"text": text, "reason": reasons[0], "usage": usage, "first_content": first_content}


async def _plain(session: aiohttp.ClientSession, url: str, client: int) -> dict:
    async with session.post(url + "/v1/chat/completions", json=_request(client, False)) as resp:
        assert resp.status == 200, f"client {client}: HTTP {resp.status}: {await resp.text()}"
        return await resp.json()


async def _run(url: str) -> tuple[list[dict], list[dict], float]:
    timeout = aiohttp.ClientTimeout(total=WALL_LIMIT_S)
    connector = aiohttp.TCPConnector(limit=0)  # no client-side cap: all 64 at once
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await _plain(session, url, CLIENTS)  # warm-up: the engine compiles its steps
        start = time.perf_counter()
        streams = await asyncio.gather(*(_stream(session, url, c) for c in range(CLIENTS)))
        wall = time.perf_counter() - start
        plains = await asyncio.gather(*(_plain(session, url, c) for c in range(CLIENTS)))
    return streams, plains, wall


def test_64_concurrent_streams_complete_and_match(server):
    url, engine = server
    before = engine.stats()["generated_tokens"]
    streams, plains, wall = asyncio.run(asyncio.wait_for(_run(url), 2 * WALL_LIMIT_S))

    tokens = sum(s["usage"]["completion_tokens"] for s in streams)
    first = sorted(s["first_content"] for s in streams if s["first_content"] is not None)
    print(
        f"\n{CLIENTS} streams in {wall:.2f} s: {CLIENTS / wall:.1f} requests/s, "
        f"{tokens / wall:.0f} completion tokens/s; first content p50 "
        f"{statistics.median(first):.2f} s, max {first[-1]:.2f} s"
    )
    assert wall < WALL_LIMIT_S
    for client, (stream, plain) in enumerate(zip(streams, plains, strict=True)):
        choice = plain["choices"][0]
        assert stream["text"] == choice["message"]["content"], f"client {client}"
        assert stream["reason"] == choice["finish_reason"], f"client {client}"
        assert stream["usage"] == plain["usage"], f"client {client}"
    assert sum(s["reason"] == "length" for s in streams) > 0  # some ran the full MAX_TOKENS
    generated = engine.stats()["generated_tokens"] - before
    assert generated >= 2 * tokens  # the streams' and the plain wave's tokens (plus warm-up)
    stats = engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0
