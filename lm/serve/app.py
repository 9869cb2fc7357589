"""The OpenAI-compatible HTTP API over a generation `Engine` (FastAPI).

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (JSON, or Server-Sent
Events with `stream`), POST /tokenize, POST /detokenize, GET /tokenizer_info (vLLM's shapes, which
lm-eval's remote tokenizer reads), GET /health, GET /metrics (Prometheus), GET / and /static/...
(the chat page), GET /openapi.json.

How a call runs: each choice (prompt x n) is one engine request; the engine thread's callbacks
hand every Output to the server's event loop (`loop.call_soon_threadsafe`), onto one queue per
call. A client that goes away cancels its requests at once: a stream's generator is cancelled by
Starlette when the client disconnects, and a plain request races its outputs against the
connection's `http.disconnect`; either way `engine.cancel` frees the slots before the next
decode step.

Lifecycle: the app's lifespan starts the engine (`Engine.start` is idempotent) and, when
`owns_engine`, shuts it down when the server stops; pass owns_engine=False to share one engine
between apps. The API key is `api_key`, else the LM_API_KEY environment variable; with one set,
/v1/*, /tokenize, /detokenize and /tokenizer_info need `Authorization: Bearer KEY` (401
otherwise); /health, /metrics and the page stay open for probes and scrapers.

Prompts: token ids are used as given; a text prompt runs as [start id] + its tokens, and its echo
(completions' `echo`) leaves that added start token out, so the first echoed logprob of a text
prompt is the first text token's given the start token (a token-id prompt's first is null).
Prompts are tokenized off the event loop, after a bound that refuses one too long for the
context untokenized (lm/serve/prompts.py); role-token strings in chat content are text
(lm/tokenizer/chat.py). The checks every request passes are in lm/serve/checks.py; the limits
on each connection (body size, head and body deadlines) in lm/serve/limits.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from lm.errors import LMError, QueueFull
from lm.inference.engine import SamplingParams
from lm.serve import protocol as p
from lm.serve.checks import RequestChecks
from lm.serve.jobs import EngineStopped, Job, JobChoice, TokenStrings
from lm.serve.limits import BodyLimit, Limits
from lm.serve.metrics import CountRequests, ServerMetrics
from lm.serve.prompts import Prompts
from lm.serve.protocol import APIError
from lm.tokenizer import chat

STATIC_DIR = Path(__file__).parent / "static"
_ERRORS = {
    status: {"model": p.ErrorResponse, "description": what}
    for status, what in (
        (400, "a value out of range, or a request the model cannot run"),
        (401, "a missing or wrong API key"),
        (404, "an unknown model name"),
        (408, "the request body did not arrive in time"),
        (413, "the request body is over the size limit"),
        (422, "a malformed request body"),
        (429, "the engine's queue is full; retry later"),
        (503, "the engine has stopped"),
    )
}
_SSE = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream"}}


def _sampling(body, seed_index: int, max_tokens: int, **extra) -> SamplingParams:
    """The engine's parameters for one choice of a completions or chat request."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(body.top_k or 0, 0),
        seed=p.choice_seed(body.seed, seed_index),
        ignore_eos=body.ignore_eos,
        **extra,
    )


class Server:
    """The endpoints' logic over one engine; `create_app` routes requests to it."""

    def __init__(self, engine, model_name: str, api_key: str | None, max_queue: int | None):
        self.engine, self.vocab = engine, engine.vocab
        self.model_name, self.max_queue = model_name, max_queue
        self.max_len = int(engine.max_len)
        # The most engine requests one call may need: what the queues can ever hold.
        limits = [q for q in (max_queue, getattr(engine, "max_queue", None)) if q is not None]
        capacity = min(limits) if limits else None
        self.checks = RequestChecks(
            model_name, api_key, self.vocab.vocab_size, self.max_len, capacity
        )
        self.prompts = Prompts(engine, self.checks)
        self.metrics = ServerMetrics(engine)
        self.strings = TokenStrings(self.vocab)
        self.created = int(time.time())

    # -- running requests ------------------------------------------------------------------

    def start_job(
        self, choices: list[JobChoice], params: list[SamplingParams], kind: str, body
    ) -> Job:
        """Submits every choice; 429 (nothing left running) when the queue cannot take them."""
        if self.max_queue is not None:
            waiting = self.engine.stats()["waiting"]
            if waiting + len(choices) > self.max_queue:
                raise APIError(
                    429, f"{waiting} requests are waiting (at most {self.max_queue}); retry later",
                    code="queue_full",
                )  # fmt: skip
        options = body.stream_options
        job = Job(
            self.engine,
            asyncio.get_running_loop(),
            self.metrics,
            self.strings,
            kind=kind,
            model=self.model_name,
            include_usage=bool(body.stream and options is not None and options.include_usage),
            logprobs=params[0].logprobs,
        )
        try:
            job.submit(choices, params)
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full") from None
        except LMError as e:
            raise APIError(400, str(e)) from None
        return job

    async def finish(self, request: Request, job: Job) -> None:
        """Waits for every choice to finish; cancels them all if the client disconnects."""

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        done = asyncio.ensure_future(job.run())
        gone = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not done.done():
                done.cancel()
                job.cancel()
        if not done.cancelled():
            try:
                done.result()
            except EngineStopped as e:
                raise APIError(503, str(e), code="engine_stopped") from None

    async def stream(self, job: Job, chunks) -> AsyncIterator[str]:
        """SSE text of `chunks(choice, delta)` for every output, then usage and [DONE]; the
        requests are cancelled when the generator is closed early (client gone)."""
        try:
            for first in job.opening_chunks():
                yield p.sse(first)
            try:
                async for choice, delta in job.deltas():
                    for chunk in chunks(choice, delta):
                        yield p.sse(chunk)
            except EngineStopped as e:  # the status line is sent: an error event, as OpenAI's
                error = {"message": str(e), "type": "server_error", "code": "engine_stopped"}
                yield p.sse({"error": {**error, "param": None}})
                return
            if job.include_usage:
                yield p.sse(job.chunk(choices=[], usage=job.usage()))
            yield p.sse("[DONE]")
        finally:
            job.cancel()

    # -- completions -----------------------------------------------------------------------

    async def completions(self, body: p.CompletionRequest, request: Request):
        self.checks.body(body)
        stops = p.stop_strings(body.stop)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        self.checks.count(p.prompt_count(body.prompt) * body.n, body.n)
        prompts = await self.prompts.run(self.prompts.completion, body.prompt, max_tokens)
        echo_logprobs = body.logprobs if body.echo else None
        sampling = dict(stop=stops, logprobs=body.logprobs, prompt_logprobs=echo_logprobs)
        choices, params = [], []
        for ids, text in prompts:
            start = self.engine.start_id
            hidden = 1 if text is not None and start is not None else 0
            echo_text = None
            if body.echo:
                echo_text = text
                if text is None:  # special tokens written out, as their logprob entries are
                    echo_text = chat.decode_with_special_tokens(self.vocab, ids)
            for j in range(body.n):
                choices.append(JobChoice(len(choices), ids, echo_text, hidden))
                params.append(_sampling(body, j, max_tokens, **sampling))
        job = self.start_job(choices, params, "completion", body)
        job.prompt_tokens = sum(len(ids) for ids, _ in prompts)
        if body.stream:
            return StreamingResponse(
                self.stream(job, job.completion_chunks), media_type="text/event-stream"
            )
        await self.finish(request, job)
        return job.completion_response()

    # -- chat ------------------------------------------------------------------------------

    async def chat_completions(self, body: p.ChatCompletionRequest, request: Request):
        self.checks.body(body)
        stops = p.stop_strings(body.stop) + chat.chat_stop_strings(self.vocab)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        self.checks.count(body.n, body.n)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        asked = body.max_completion_tokens or body.max_tokens
        ids, max_tokens = await self.prompts.run(self.prompts.chat, messages, asked)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        choices = [JobChoice(j, ids, None, 0) for j in range(body.n)]
        end = chat.chat_stop_token_ids(self.vocab)
        params = [
            _sampling(body, j, max_tokens, stop=stops, stop_token_ids=end, logprobs=logprobs)
            for j in range(body.n)
        ]
        job = self.start_job(choices, params, "chat", body)
        job.prompt_tokens = len(ids)
        if body.stream:
            return StreamingResponse(
                self.stream(job, job.chat_chunks), media_type="text/event-stream"
            )
        await self.finish(request, job)
        return job.chat_response()

    # -- tokenizer -------------------------------------------------------------------------

    async def tokenize(self, body: p.TokenizeRequest) -> dict:
        self.checks.body(body)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of prompt and messages", "prompt")
        run = self.prompts.run
        if body.messages is not None:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            ids = await run(self.prompts.template, messages, body.add_generation_prompt)
        else:
            ids = await run(self.prompts.text, body.prompt, body.add_special_tokens is not False)
        out = {"tokens": ids, "count": len(ids), "max_model_len": self.max_len}
        if body.return_token_strs:
            out["token_strs"] = [self.strings.text(t) for t in ids]
        return out

    def detokenize(self, body: p.DetokenizeRequest) -> dict:
        self.checks.body(body)
        self.checks.ids(body.tokens, "tokens")
        return {"prompt": chat.decode_with_special_tokens(self.vocab, body.tokens)}

    def tokenizer_info(self) -> dict:
        vocab = self.vocab
        text = lambda token_id: chat.special_token_text(vocab, token_id)  # noqa: E731
        return {
            "tokenizer_class": type(vocab).__name__,
            "eos_token": text(vocab.eos_id),
            "bos_token": text(chat.start_token_id(vocab)),
            "pad_token": text(vocab.pad_id),
            "eos_token_id": vocab.eos_id,
            "bos_token_id": chat.start_token_id(vocab),
            "pad_token_id": vocab.pad_id,
            "chat_template": chat.chat_template_string(vocab),
            "model_max_length": self.max_len,
            "vocab_size": vocab.vocab_size,
        }


def create_app(
    engine,
    *,
    model_name: str,
    api_key: str | None = None,
    max_queue: int | None = None,
    owns_engine: bool = True,
    limits: Limits | None = None,
) -> FastAPI:
    """The API over `engine` (see the module docstring for lifecycle, auth and prompts);
    `max_queue` answers 429 once that many requests wait (besides the engine's own limit);
    `limits` bounds each connection (`app.state.limits`; the server's uvicorn settings come
    from it, `limits.uvicorn_options`)."""
    api_key = api_key if api_key is not None else os.environ.get("LM_API_KEY") or None
    server = Server(engine, model_name, api_key, max_queue)
    limits = limits or Limits()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            server.prompts.close()
            if owns_engine:
                await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="lm", version="1", lifespan=lifespan)
    app.state.server, app.state.limits = server, limits
    keyed = [Depends(server.checks.key)]

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return p.error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        return p.validation_error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        return p.error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal_error(_request, exc: Exception):
        return p.error_response(500, f"internal error: {type(exc).__name__}", "server_error")

    @app.get("/v1/models", response_model=p.ModelList, dependencies=keyed, responses=_ERRORS)
    async def models():
        card = {"id": model_name, "created": server.created, "max_model_len": server.max_len}
        return {"object": "list", "data": [card]}

    @app.post(
        "/v1/completions",
        response_model=p.Completion,
        dependencies=keyed,
        responses={**_ERRORS, **_SSE},
    )
    async def completions(body: p.CompletionRequest, request: Request):
        return await server.completions(body, request)

    @app.post(
        "/v1/chat/completions",
        response_model=p.ChatCompletion,
        dependencies=keyed,
        responses={**_ERRORS, **_SSE},
    )
    async def chat_completions(body: p.ChatCompletionRequest, request: Request):
        return await server.chat_completions(body, request)

    @app.post("/tokenize", response_model=p.TokenizeResponse, dependencies=keyed, responses=_ERRORS)
    async def tokenize(body: p.TokenizeRequest):
        return await server.tokenize(body)

    @app.post(
        "/detokenize", response_model=p.DetokenizeResponse, dependencies=keyed, responses=_ERRORS
    )
    async def detokenize(body: p.DetokenizeRequest):
        return server.detokenize(body)

    @app.get(
        "/tokenizer_info", response_model=p.TokenizerInfo, dependencies=keyed, responses=_ERRORS
    )
    async def tokenizer_info():
        return server.tokenizer_info()

    @app.get("/health", response_model=p.Health, responses={503: {"model": p.Health}})
    async def health():
        if engine.running:
            return {"status": "ok"}
        return JSONResponse({"status": "engine stopped"}, status_code=503)

    @app.get("/metrics", response_class=Response)
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def index():
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            raise APIError(404, "the chat page is not installed (lm/serve/static/index.html)")
        return FileResponse(page)

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    api_paths = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize"}
    app.add_middleware(BodyLimit, limits=limits)  # inside CountRequests: refusals are counted
    app.add_middleware(
        CountRequests,
        metrics=server.metrics,
        paths=frozenset(api_paths | {"/detokenize", "/tokenizer_info"}),
    )
    return app
