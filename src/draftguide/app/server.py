"""`draftguide serve`: an OpenAI-compatible chat endpoint over a `DraftGuide` (FastAPI + uvicorn).

    POST /v1/chat/completions   non-streaming, or SSE chunks with "stream": true
    GET  /v1/models             the one model served

OpenAI fields supported: `model`, `messages` (text content), `max_tokens` / `max_completion_tokens`,
`temperature` (default 0: greedy; below 1e-5 greedy too), `top_p`, `n` (1), `stop`, `seed` (none: fresh
randomness per request; the seed used is returned), `stream`, `stream_options.include_usage`, `logprobs` and
`top_logprobs` (non-streamed: the target's own log-probabilities), `user` (accepted, no effect), and
`frequency_penalty` / `presence_penalty` (0 only), `logit_bias` (empty only), `response_format` (type text
only), `tools` (empty only), `tool_choice` ("none"/"auto" without tools), `parallel_tool_calls` (no effect
without tools). Any other field is refused with 400, never silently ignored (`SUPPORTED_FIELDS`).

Extra body fields: `beta` (guidance weight), `method` (greedy | speculative | guided), `speculative`,
`top_k`, `ttt` (true or ttt_adapt options: the draft is adapted on this request's prompt, then reset),
`beta_schedule`, `mix`, `guard_top_k` (guided decoding's options),
passed by `openai` clients through `extra_body`. The server's `defaults` fill what a request leaves out,
so a client that sends only `model` and `messages` (CL-bench's `infer.py`) gets guided decoding unchanged.

Each reply's `draftguide` field: method, seconds, tau, n_flips, ttt, the `seed` used, and with logprobs
`logprobs_from` ("target": the target's raw distribution, also when guidance chose the tokens).

`chat_template_kwargs` (an object, as vLLM accepts): extra chat-template variables for this request, e.g.
{"enable_thinking": false} for Qwen3, over the server's `--chat-template-kwargs`.

One model, one worker thread, micro-batching: requests that are waiting when the model becomes free are
decoded together, up to `max_batch` (`DraftGuide.generate_jobs`: greedy, sampling and guided decoding with
the same guidance settings share a batch, each with its own sampling parameters, seed, length, stop strings
and stream; speculative decoding and ttt run alone; a request alone in its batch takes the batch-1 loop).
At most `max_pending` wait (more get 503); the event loop stays free for accepting, streaming and rejecting.
Malformed requests get 400, a failure inside one request 500, both
as OpenAI-style JSON errors; neither stops the server.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from draftguide.app.pipeline import METHODS, Cancelled, DraftGuide, Generation, Job, check_generate
from draftguide.errors import DraftGuideError

log = logging.getLogger("draftguide.app.server")


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = ""

    def text(self) -> str:
        """OpenAI content parts -> plain text (only text parts are understood)."""
        if isinstance(self.content, list):
            bad = [p.get("type") for p in self.content if p.get("type") != "text"]
            if bad:
                raise DraftGuideError(f"only text content parts are supported, got {bad}")
            return "".join(str(p.get("text", "")) for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = False


class ChatRequest(BaseModel):
    # an unknown field is a 400 naming it, never silently ignored; NaN/Infinity (Python's json accepts them) too
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)  # None (or absent): 0, greedy
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int | None = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    user: str | None = None  # an end-user id for the caller's logs: no effect here
    # accepted only at the value that means "off", so a client sending its defaults is served
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # draftguide extras
    beta: float = Field(default=0.0, ge=0.0, le=1.0)
    method: str | None = None
    speculative: bool = False
    top_k: int = Field(default=0, ge=-1)
    ttt: bool | dict[str, Any] | None = None
    beta_schedule: Literal["fixed", "adaptive"] | None = None  # guided only, as the three below
    mix: Literal["logits", "probs"] | None = None
    guard_top_k: int | None = Field(default=None, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only n = 1 is supported")
        return v

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v not in (None, 0):
            raise ValueError("penalties are not supported (only 0)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported (only an empty map)")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v):
        if v is not None and v.get("type") != "text":
            raise ValueError(f"only response_format type 'text' is supported, got {v.get('type')!r}")
        return v

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v):
        if v:
            raise ValueError("tools are not supported")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, v):
        if v not in (None, "none", "auto"):
            raise ValueError("tool_choice is not supported (no tools)")
        return v

    @model_validator(mode="after")
    def _combinations(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.logprobs and self.stream:
            raise ValueError("logprobs are not supported with stream: true (ask without streaming)")
        return self

    @field_validator("mix", mode="before")
    @classmethod
    def _removed_mix(cls, v):
        from draftguide.decode.guided import REMOVED_MIXES

        if v in REMOVED_MIXES:
            raise ValueError(REMOVED_MIXES[v])
        return v

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str | None) -> str | None:
        if v is not None and v not in METHODS:
            raise ValueError(f"unknown method {v!r} (expected one of {', '.join(METHODS)})")
        return v

    def generate_kwargs(self, defaults: dict) -> dict:
        """`DraftGuide.generate` options: the request's, and the server's `defaults` for what it leaves out."""
        kw = dict(
            max_new_tokens=self.max_completion_tokens or self.max_tokens,
            method=self.method,
            beta=self.beta,
            speculative=self.speculative,
            temperature=0.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k,
            stop=self.stop,
            seed=self.seed,
            ttt=self.ttt,
            logprobs=bool(self.logprobs),
            top_logprobs=self.top_logprobs or 0,
        )
        kw |= {k: getattr(self, k) for k in ("beta_schedule", "mix", "guard_top_k") if getattr(self, k) is not None}
        if self.chat_template_kwargs is not None:
            kw["chat_template_kwargs"] = self.chat_template_kwargs
        for key, value in defaults.items():
            if not set(REQUEST_FIELDS.get(key, (key,))) & self.model_fields_set:
                kw[key] = value
        return kw


# generate() option -> the request fields that set it; the decoding method's three fields go together, so a
# request's own `beta` is never combined with a default `method`, say
_METHOD = ("method", "beta", "speculative")
REQUEST_FIELDS = {"max_new_tokens": ("max_tokens", "max_completion_tokens"), **dict.fromkeys(_METHOD, _METHOD)}
SUPPORTED_FIELDS = tuple(ChatRequest.model_fields)


def _error(status: int, message: str, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "param": None, "code": None}}
    )


def _json(body: dict):
    """A reply through the package's one encoder: NaN/Infinity become null (a strict client rejects them)."""
    from fastapi.responses import Response

    from draftguide.reporting.runs import dumps

    return Response(dumps(body), media_type="application/json")


def _problem(e: dict) -> str:
    """One validation error of a request body as a line naming the field (messages[0].content, temperature)."""
    loc = [
        x
        for x in e.get("loc", ())[1:]
        if not (isinstance(x, str) and x in ("str", "list[dict[str,any]]", "function-after"))
    ]
    where = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".") or "body"
    if e.get("type") == "extra_forbidden":
        return f"{where}: unsupported field (this server takes {', '.join(SUPPORTED_FIELDS)})"
    msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{where}: {msg}"


class Worker:
    """One model thread that decodes the requests waiting for it together (up to `max_batch`, in arrival
    order), and a bound on how many may wait."""

    def __init__(self, dg: DraftGuide, max_pending: int, max_batch: int = 8):
        if max_batch < 1:
            raise DraftGuideError(f"max_batch must be >= 1, got {max_batch}")
        self.dg, self.max_pending, self.max_batch, self.pending = dg, max_pending, max_batch, 0
        self.jobs: queue.Queue = queue.Queue()
        self.batches: list[int] = []  # the size of every batch decoded (for tests and logs)
        threading.Thread(target=self._loop, daemon=True, name="draftguide-model").start()

    def admit(self) -> bool:
        if self.pending >= self.max_pending:
            return False
        self.pending += 1  # only touched on the event loop thread
        return True

    async def generate(self, prompt, kw: dict, on_text=None) -> Generation | None:
        """The request's Generation (None when its stream was cancelled); its exception if it failed."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.jobs.put((Job(prompt, kw, on_text), loop, fut))
        try:
            return await fut
        finally:
            self.pending -= 1

    def _loop(self) -> None:
        while True:
            batch = [self.jobs.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            self.batches.append(len(batch))
            try:
                results = self.dg.generate_jobs([j for j, _, _ in batch])
            except BaseException as e:  # noqa: BLE001  (every request of the batch gets it)
                results = [e] * len(batch)
            for (_, loop, fut), r in zip(batch, results):
                loop.call_soon_threadsafe(_settle, fut, r)


def _settle(fut: asyncio.Future, r) -> None:
    if fut.done():
        return
    if isinstance(r, Cancelled):
        fut.set_result(None)
    elif isinstance(r, BaseException):
        fut.set_exception(r)
    else:
        fut.set_result(r)


def create_app(
    dg: DraftGuide,
    model_name: str | None = None,
    *,
    max_pending: int = 64,
    defaults: dict | None = None,
    max_batch: int = 8,
):
    """`defaults`: generate() options for requests that do not set them (e.g. method/beta/ttt, so that a
    client sending only model and messages gets guided decoding); max_new_tokens defaults to 512. `max_batch`:
    the most waiting requests decoded together (1: one at a time)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import StreamingResponse
    from starlette.exceptions import HTTPException

    name = model_name or dg.name
    defaults = {"max_new_tokens": 512} | (defaults or {})
    check_generate(**defaults)  # a bad default fails at start, not on every request
    worker = Worker(dg, max_pending, max_batch)
    app = FastAPI(title="draftguide", version=__import__("draftguide").__version__)
    app.state.worker = worker

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        msgs = list(dict.fromkeys(_problem(e) for e in exc.errors()))
        return _error(400, "; ".join(msgs) or "malformed request")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return _error(
            exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        )

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "draftguide"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        from draftguide.modeling.prompts import check_length, max_positions

        try:  # everything checkable is checked before a stream starts: its errors can only be in-band
            messages = []
            for i, m in enumerate(req.messages):
                try:
                    messages.append({"role": m.role, "content": m.text()})
                except DraftGuideError as e:
                    raise DraftGuideError(f"messages[{i}].content: {e}") from None
            kw = req.generate_kwargs(defaults)
            check_generate(**kw)
            ids = dg.encode(messages, where="request", chat_template_kwargs=kw.get("chat_template_kwargs"))
            kw.pop("chat_template_kwargs", None)  # applied: the ids go to the worker
            limit = max_positions(dg.target)
            if limit is not None and not {"max_tokens", "max_completion_tokens"} & req.model_fields_set:
                # the default length (not the client's) shrinks to what fits, as in vLLM; an explicit one is refused
                kw["max_new_tokens"] = max(1, min(kw["max_new_tokens"], limit - ids.shape[1]))
            check_length(dg.target, ids.shape[1], kw["max_new_tokens"], "request", "prompt (messages)")
        except DraftGuideError as e:
            return _error(400, str(e))
        if not worker.admit():
            return _error(503, f"server busy: {worker.max_pending} requests already waiting", "server_busy")
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _sse(StreamJob(worker, ids, kw), cid, created, name, usage), media_type="text/event-stream"
            )
        try:
            g: Generation = await worker.generate(ids, kw)
        except DraftGuideError as e:
            return _error(400, str(e))
        except Exception as e:  # handled here, not by a Starlette handler, which re-raises and drops the connection
            log.exception("request failed")
            return _error(500, f"{type(e).__name__}: {e}", "server_error")
        return _json(_completion(g, cid, created, name))

    return app


def _usage(g: Generation) -> dict:
    return {
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": len(g.tokens),
        "total_tokens": g.prompt_tokens + len(g.tokens),
    }


def _extras(g: Generation) -> dict:
    """The `draftguide` field: how the reply was made, the seed that reproduces it, where logprobs come from."""
    extra = {
        "method": g.method,
        "seconds": g.stats.get("seconds"),
        "tau": g.stats.get("tau"),
        "n_flips": g.stats.get("n_flips"),
        "ttt": g.ttt,
        "seed": g.seed,
        "batch_size": g.stats.get("batch_size", 1),
    }
    if g.logprobs is not None:
        extra["logprobs_from"] = "target"  # the target's raw distribution, also when guidance chose the tokens
    return extra


def _completion(g: Generation, cid: str, created: int, model: str) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": g.text},
                "finish_reason": g.finish_reason,
                "logprobs": None if g.logprobs is None else {"content": g.logprobs, "refusal": None},
            }
        ],
        "usage": _usage(g),
        "draftguide": _extras(g),
    }


def _chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None, usage: bool = False) -> str:
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage:
        body["usage"] = None  # OpenAI: every chunk carries usage null, the last one (no choices) the counts
    return f"data: {_dumps(body)}\n\n"


def _dumps(obj) -> str:
    from draftguide.reporting.runs import dumps

    return dumps(obj)


class StreamJob:
    """A generation queued on the worker as soon as the request is admitted (so the pending count is
    released even if the response is never iterated); its text pieces arrive on the event loop."""

    def __init__(self, worker: Worker, messages, kw: dict):
        loop = asyncio.get_running_loop()
        self.pieces: asyncio.Queue = asyncio.Queue()
        self.gone = False  # the client went away: the worker stops its row at the next token

        def on_text(delta: str) -> None:  # worker thread
            if self.gone:
                raise Cancelled
            loop.call_soon_threadsafe(self.pieces.put_nowait, delta)

        self.task = asyncio.ensure_future(worker.generate(messages, kw, on_text))


async def _sse(job: StreamJob, cid: str, created: int, model: str, usage: bool = False):
    """SSE chunks as the worker decodes; a failure becomes an in-band `error` event (headers are sent).
    `usage` (stream_options.include_usage): a last chunk with no choices and the token counts."""
    try:
        yield _chunk(cid, created, model, {"role": "assistant", "content": ""}, usage=usage)
        while True:
            getter = asyncio.ensure_future(job.pieces.get())
            await asyncio.wait({getter, job.task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield _chunk(cid, created, model, {"content": getter.result()}, usage=usage)
                continue
            getter.cancel()
            while not job.pieces.empty():  # pieces queued before the task finished come first
                yield _chunk(cid, created, model, {"content": job.pieces.get_nowait()}, usage=usage)
            break
        try:
            g = job.task.result()
        except Exception as e:
            kind = "invalid_request_error" if isinstance(e, DraftGuideError) else "server_error"
            if kind == "server_error":
                log.exception("streaming request failed")
            msg = str(e) if kind == "invalid_request_error" else f"{type(e).__name__}: {e}"
            yield f"data: {_dumps({'error': {'message': msg, 'type': kind}})}\n\n"
        else:
            yield _chunk(cid, created, model, {}, g.finish_reason if g else "stop", usage=usage)
            if usage and g is not None:
                body = {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage(g),
                    "draftguide": _extras(g),
                }
                yield f"data: {_dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.gone = True


def serve(
    dg: DraftGuide,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    model_name: str | None = None,
    max_pending: int = 64,
    defaults: dict | None = None,
    log_level: str = "info",
    max_batch: int = 8,
) -> None:
    import uvicorn

    app = create_app(dg, model_name, max_pending=max_pending, defaults=defaults, max_batch=max_batch)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["ChatRequest", "create_app", "serve"]
