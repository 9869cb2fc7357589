"""Serving speed: single-stream greedy decode against Hugging Face `generate` on the same
weights, and aggregate tokens/s of `lm serve` at 1, 4, 16 and 64 concurrent clients.

Same weights: each shape is a `transformers` model built offline from its config with seeded
random weights (saved with a tiny BPE tokenizer, which `lm convert` wants), then imported with
`lm convert`'s `import_hf`; both sides run float32 on this CPU. Prompts are random token ids, so
no tokenizer work is timed and the two sides see exactly the same ids.

Single stream (one request, 32 prompt ids, greedy, EOS ignored: ours `ignore_eos`, theirs
`min_new_tokens`), after a short warm-up that compiles (ours) or warms torch's allocator:
- TTFT: from submit / the `generate` call to the first new token on the host.
- decode tokens/s: (new tokens - 1) / (time of the last token - time of the first), so the
  prompt's prefill is left out. Ours is timed in the Output callbacks of `Engine.step` (an
  engine with one slot, stepped on this thread); transformers' in a streamer's `put` (called
  once with the prompt, then once per new token).
- the two sides run interleaved REPEATS times; a row keeps each side's fastest decode and
  lowest TTFT (the CPU is shared: slower runs are other processes' doing).
- torch runs both at its default thread count and at one thread, and the faster is the
  baseline (on a loaded 2-core machine torch's two OpenMP threads can wait on each other for
  20x the work, and the one-thread runs then win).
- agreement: how many leading greedy tokens the two sides share (fp32 on both: an early split
  would be two near-ties rounded differently, or a conversion bug).

Concurrency goes through the real HTTP server (`create_app` + `ServerThread`, in this process)
on the small Llama with 16 decode slots: c asyncio clients each stream `POST /v1/completions`
requests back to back (32 random prompt ids, 64 new tokens, greedy, `ignore_eos`). Clients ask
for `logprobs=0` so that every token arrives in its own SSE chunk (random ids often decode to no
text, and a chunk without text or logprobs is not sent): TTFT is the time to the first chunk
that carries a token, and tokens come from the stream's `usage`. Aggregate tokens/s = all
completion tokens / wall time of the level. The clients, the server's event loop and the engine
thread share one Python process (and its GIL) and the machine's cores.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

PROMPT_LEN = 32
NEW_TOKENS = 128
GPT2_NEW_TOKENS = 128
SERVE_NEW_TOKENS = 64
WARMUP_TOKENS = 4
REPEATS = 2
LEVELS = (1, 4, 16, 64)
SLOTS = 16
MIN_REQUESTS = 8  # per level: at least this many requests, and 2 per client
MODEL_NAME = "bench"

# name -> (transformers config class, its kwargs, model class, new tokens single-stream)
SHAPES = {
    "llama 4L d256 (vocab 2048, ctx 512)": (
        "LlamaConfig",
        dict(
            vocab_size=2048,
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        ),
        "LlamaForCausalLM",
        NEW_TOKENS,
    ),
    "gpt2 124M (vocab 50257, ctx 1024)": ("GPT2Config", {}, "GPT2LMHeadModel", GPT2_NEW_TOKENS),
}


@dataclasses.dataclass
class Stream:
    """One timed greedy generation: its new ids and when each reached the host."""

    tokens: list[int]
    ttft_s: float
    decode_tokens_per_s: float


def _stream_from(start: float, times: list[float], tokens: list[int]) -> Stream:
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return Stream(tokens, times[0] - start, decode)


def build_hf_model(config_class: str, kwargs: dict, model_class: str, out_dir: str):
    """A float32 transformers model with seeded random weights, saved (safetensors, config,
    tokenizer.json) into `out_dir`; returned in eval mode."""
    import torch
    import transformers

    from lm.convert import parity

    bos, eos = parity.tiny_tokenizer(out_dir)
    ids = dict(bos_token_id=bos, eos_token_id=eos)
    if config_class == "GPT2Config":  # <|endoftext|> is both
        ids = dict(bos_token_id=eos, eos_token_id=eos)
    config = getattr(transformers, config_class)(**kwargs, **ids)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    model.save_pretrained(out_dir)
    return model


def random_prompt(vocab_size: int, seed: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab_size, PROMPT_LEN).tolist()


# -- single stream ---------------------------------------------------------------------------


def lm_stream(engine, prompt: list[int], new_tokens: int) -> Stream:
    """One greedy request stepped on this thread, timed in its Output callbacks."""
    from lm.inference.engine import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    times, tokens, done = [], [], []

    def on_output(out) -> None:
        if out.token_ids:
            times.append(time.perf_counter())
            tokens.extend(out.token_ids)
        if out.finished:
            done.append(out.finish_reason)

    start = time.perf_counter()
    engine.submit(prompt, params, on_output)
    while not done:
        engine.step()
    return _stream_from(start, times, tokens)


def hf_stream(model, prompt: list[int], new_tokens: int) -> Stream:
    """transformers' greedy `generate`, each new token timed by a streamer."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class TokenTimes(BaseStreamer):
        def __init__(self):
            self.times, self.tokens, self.seen_prompt = [], [], False

        def put(self, value) -> None:
            if not self.seen_prompt:  # the first put is the prompt itself
                self.seen_prompt = True
                return
            self.times.append(time.perf_counter())
            self.tokens += [int(t) for t in value.reshape(-1)]

        def end(self) -> None:
            pass

    streamer = TokenTimes()
    input_ids = torch.tensor([prompt], dtype=torch.long)
    eos = model.generation_config.eos_token_id
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=eos,
            streamer=streamer,
        )
    return _stream_from(start, streamer.times, streamer.tokens)


def leading_matches(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _best(streams: list[Stream]) -> Stream:
    """The fastest decode of repeated runs (the CPU is shared: slower runs are interference)."""
    return max(streams, key=lambda s: s.decode_tokens_per_s)


def single_stream_row(name: str, spec: tuple, tmp: str) -> tuple[dict, str]:
    """The row of one shape, and the converted workdir (for the server levels); the notes
    give both thread counts' best speeds."""
    import jax
    import torch

    from lm.convert.workdir import import_hf
    from lm.inference.engine import Engine

    config_class, kwargs, model_class, new_tokens = spec
    slug = name.split()[0] + str(len(os.listdir(tmp)))
    hf_dir, workdir = os.path.join(tmp, f"{slug}-hf"), os.path.join(tmp, f"{slug}-run")
    hf_model = build_hf_model(config_class, kwargs, model_class, hf_dir)
    import_hf(hf_dir, workdir)
    prompt = random_prompt(hf_model.config.vocab_size, seed=0)
    load = os.getloadavg()[0]
    default_threads = torch.get_num_threads()

    def hf_run(model, threads: int, tokens: int) -> Stream:
        torch.set_num_threads(threads)
        try:
            return hf_stream(model, prompt, tokens)
        finally:
            torch.set_num_threads(default_threads)

    engine = Engine.from_workdir(workdir, slots=1)
    lm_stream(engine, prompt, WARMUP_TOKENS)  # compiles the prefill bucket and the decode step
    thread_counts = sorted({default_threads, 1}, reverse=True)
    for threads in thread_counts:
        hf_run(hf_model, threads, WARMUP_TOKENS)
    ours, theirs = [], {threads: [] for threads in thread_counts}
    for _ in range(REPEATS):  # interleaved, so a busy spell on the machine hits both sides
        ours.append(lm_stream(engine, prompt, new_tokens))
        for threads in thread_counts:
            theirs[threads].append(hf_run(hf_model, threads, new_tokens))
    del engine
    params = sum(p.numel() for p in hf_model.parameters())
    del hf_model
    best_by_threads = {threads: _best(runs) for threads, runs in theirs.items()}
    threads = max(best_by_threads, key=lambda t: best_by_threads[t].decode_tokens_per_s)
    best_ours, baseline = _best(ours), best_by_threads[threads]
    agree = leading_matches(best_ours.tokens, baseline.tokens)
    speeds = ", ".join(f"{s.decode_tokens_per_s:.1f} at {t}" for t, s in best_by_threads.items())
    row = {
        "case": f"single stream: {name}",
        "tokens/s": best_ours.decode_tokens_per_s,
        "baseline tokens/s": baseline.decode_tokens_per_s,
        "vs baseline": f"{best_ours.decode_tokens_per_s / baseline.decode_tokens_per_s:.2f}x",
        "TTFT ms": round(min(s.ttft_s for s in ours) * 1e3, 1),
        "baseline TTFT ms": round(min(s.ttft_s for s in theirs[threads]) * 1e3, 1),
        "TTFT p50 / p90 ms": "",
        "requests": 1,
        "notes": (
            f"baseline = HF generate at {threads} torch thread(s) (default {default_threads}; "
            f"best tok/s by threads: {speeds}); {params / 1e6:.1f}M "
            f"params, {PROMPT_LEN} prompt + {new_tokens} new ids, best of {REPEATS}, lowest "
            f"TTFT; greedy agreement {agree}/{new_tokens} leading tokens; jax devices "
            f"{jax.device_count()}; load {load:.1f}"
        ),
    }
    return row, workdir


# -- concurrency through the server ----------------------------------------------------------


async def _client(http, url: str, prompts: list[list[int]], results: list) -> None:
    """Sends each prompt as one streamed completion after the previous one ends; appends
    (ttft_s, completion_tokens) per request."""
    for prompt in prompts:
        body = {
            "model": MODEL_NAME,
            "prompt": prompt,
            "max_tokens": SERVE_NEW_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "logprobs": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start, first, tokens = time.perf_counter(), None, 0
        async with http.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                for choice in chunk["choices"]:
                    if first is None and (choice.get("logprobs") or {}).get("tokens"):
                        first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        results.append((first - start if first is not None else float("nan"), tokens))


async def _level(url: str, clients: int, per_client: int, vocab_size: int) -> dict:
    import httpx2

    limits = httpx2.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    results: list[tuple[float, int]] = []
    async with httpx2.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(
            *(
                _client(
                    http,
                    url,
                    [random_prompt(vocab_size, seed=1000 * c + i) for i in range(per_client)],
                    results,
                )
                for c in range(clients)
            )
        )
        wall = time.perf_counter() - start
    ttfts = sorted(t for t, _ in results)
    return {
        "tokens": sum(n for _, n in results),
        "wall_s": wall,
        "ttft_mean": statistics.fmean(ttfts),
        "ttft_p50": ttfts[len(ttfts) // 2],
        "ttft_p90": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
        "requests": len(results),
    }


def concurrency_rows(workdir: str, levels: tuple[int, ...] = LEVELS) -> list[dict]:
    """One row per concurrency level on an engine with SLOTS slots behind the HTTP server."""
    from lm.inference.engine import Engine
    from lm.serve.app import create_app
    from lm.serve.runner import ServerThread

    engine = Engine.from_workdir(workdir, slots=SLOTS, max_queue=256)
    vocab_size = int(engine.model_cfg.vocab_size)
    rows = []
    with ServerThread(create_app(engine, model_name=MODEL_NAME)) as url:
        # Warm-up: compiles the 32-id prefill bucket and the decode step (one shape for all).
        asyncio.run(_level(url, SLOTS, 1, vocab_size))
        for clients in levels:
            per_client = max(2, -(-MIN_REQUESTS // clients))
            load = os.getloadavg()[0]
            r = asyncio.run(_level(url, clients, per_client, vocab_size))
            rows.append(
                {
                    "case": f"server, {clients} concurrent",
                    "tokens/s": r["tokens"] / r["wall_s"],
                    "baseline tokens/s": None,
                    "vs baseline": "",
                    "TTFT ms": round(r["ttft_mean"] * 1e3),
                    "baseline TTFT ms": "",
                    "TTFT p50 / p90 ms": f"{r['ttft_p50'] * 1e3:.0f} / {r['ttft_p90'] * 1e3:.0f}",
                    "requests": r["requests"],
                    "notes": (
                        f"{SLOTS} slots, {PROMPT_LEN} prompt + {SERVE_NEW_TOKENS} new ids each, "
                        f"{r['tokens']} tokens in {r['wall_s']:.1f} s; load {load:.1f}"
                    ),
                }
            )
    base = rows[0]["tokens/s"] if rows and rows[0]["case"].endswith(" 1 concurrent") else None
    for row in rows:
        if base:
            row["baseline tokens/s"] = base
            row["vs baseline"] = f"{row['tokens/s'] / base:.2f}x (vs 1 concurrent)"
        else:
            row["baseline tokens/s"] = ""
    return rows


def serve_rows(tmp: str) -> list[dict]:
    """Single-stream rows (ours vs transformers) per shape, then the server's levels on the
    small Llama."""
    rows, workdirs = [], []
    for name, spec in SHAPES.items():
        row, workdir = single_stream_row(name, spec, tmp)
        print(f"serve: {json.dumps(row)}", file=sys.stderr, flush=True)
        rows.append(row)
        workdirs.append(workdir)
    return rows + concurrency_rows(workdirs[0])


def main() -> int:
    import tempfile

    from benchmarks.run import markdown_table

    with tempfile.TemporaryDirectory() as tmp:
        rows = serve_rows(tmp)
    for row in rows:
        print(json.dumps(row))
    print("\n".join(markdown_table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
