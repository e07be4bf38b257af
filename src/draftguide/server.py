"""`draftguide serve`: an OpenAI-compatible chat endpoint over a `DraftGuide` (FastAPI + uvicorn).

    POST /v1/chat/completions   non-streaming, or SSE chunks with "stream": true
    GET  /v1/models             the one model served

Extra body fields: `beta` (guidance weight), `method` (greedy | speculative | guided), `speculative`,
`top_k`, `ttt` (true or ttt_adapt options: the draft is adapted on this request's prompt, then reset),
`beta_schedule`, `mix`, `guard_top_k` (guided decoding's options),
passed by `openai` clients through `extra_body`. The server's `defaults` fill what a request leaves out,
so a client that sends only `model` and `messages` (CL-bench's `infer.py`) gets guided decoding unchanged.

One model, one worker thread: requests run one at a time in arrival order (the model and an adapted
draft are shared state), at most `max_pending` wait (more get 503); the event loop stays free for
accepting, streaming and rejecting. Malformed requests get 400, a failure inside one request 500, both
as OpenAI-style JSON errors; neither stops the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import DraftGuideError
from .pipeline import METHODS, Cancelled, DraftGuide, Generation, check_generate

log = logging.getLogger("draftguide.server")


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


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI options (logprobs, penalties, ...) are ignored
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    # draftguide extras
    beta: float = Field(default=0.0, ge=0.0, le=1.0)
    method: str | None = None
    speculative: bool = False
    top_k: int = Field(default=0, ge=0)
    ttt: bool | dict[str, Any] | None = None
    beta_schedule: Literal["fixed", "adaptive"] | None = None  # guided only, as the three below
    mix: Literal["logits", "probs"] | None = None
    guard_top_k: int | None = Field(default=None, ge=1)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n = 1 is supported")
        return v

    @field_validator("mix", mode="before")
    @classmethod
    def _removed_mix(cls, v):
        from .guided import REMOVED_MIXES

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
        kw = dict(max_new_tokens=self.max_completion_tokens or self.max_tokens, method=self.method, beta=self.beta,
                  speculative=self.speculative, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                  stop=self.stop, seed=self.seed or 0, ttt=self.ttt)
        kw |= {k: getattr(self, k) for k in ("beta_schedule", "mix", "guard_top_k") if getattr(self, k) is not None}
        for key, value in defaults.items():
            if not set(REQUEST_FIELDS.get(key, (key,))) & self.model_fields_set:
                kw[key] = value
        return kw


# generate() option -> the request fields that set it; the decoding method's three fields go together, so a
# request's own `beta` is never combined with a default `method`, say
_METHOD = ("method", "beta", "speculative")
REQUEST_FIELDS = {"max_new_tokens": ("max_tokens", "max_completion_tokens"), **dict.fromkeys(_METHOD, _METHOD)}


def _error(status: int, message: str, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": None, "code": None}})


class Worker:
    """One thread that runs generations in arrival order, and a bound on how many may wait."""

    def __init__(self, dg: DraftGuide, max_pending: int):
        self.dg, self.max_pending, self.pending = dg, max_pending, 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draftguide-model")

    def admit(self) -> bool:
        if self.pending >= self.max_pending:
            return False
        self.pending += 1  # only touched on the event loop thread
        return True

    async def run(self, fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        finally:
            self.pending -= 1


def create_app(dg: DraftGuide, model_name: str | None = None, *, max_pending: int = 64, defaults: dict | None = None):
    """`defaults`: generate() options for requests that do not set them (e.g. method/beta/ttt, so that a
    client sending only model and messages gets guided decoding); max_new_tokens defaults to 512."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import StreamingResponse
    from starlette.exceptions import HTTPException

    name = model_name or dg.name
    defaults = {"max_new_tokens": 512} | (defaults or {})
    check_generate(**defaults)  # a bad default fails at start, not on every request
    worker = Worker(dg, max_pending)
    app = FastAPI(title="draftguide", version=__import__("draftguide").__version__)
    app.state.worker = worker

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        msgs = [f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}" for e in exc.errors()]
        return _error(400, "; ".join(msgs) or "malformed request")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else "invalid_request_error")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "draftguide"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        try:  # everything checkable is checked before a stream starts: its errors can only be in-band
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            kw = req.generate_kwargs(defaults)
            check_generate(**kw)
        except DraftGuideError as e:
            return _error(400, str(e))
        if not worker.admit():
            return _error(503, f"server busy: {worker.max_pending} requests already waiting", "server_busy")
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return StreamingResponse(_sse(StreamJob(worker, messages, kw), cid, created, name), media_type="text/event-stream")
        try:
            g: Generation = await worker.run(lambda: dg.generate(messages, **kw))
        except DraftGuideError as e:
            return _error(400, str(e))
        except Exception as e:  # handled here, not by a Starlette handler, which re-raises and drops the connection
            log.exception("request failed")
            return _error(500, f"{type(e).__name__}: {e}", "server_error")
        return _completion(g, cid, created, name)

    return app


def _completion(g: Generation, cid: str, created: int, model: str) -> dict:
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text}, "finish_reason": g.finish_reason}],
        "usage": {"prompt_tokens": g.prompt_tokens, "completion_tokens": len(g.tokens),
                  "total_tokens": g.prompt_tokens + len(g.tokens)},
        "draftguide": {"method": g.method, "seconds": g.stats.get("seconds"), "tau": g.stats.get("tau"),
                       "n_flips": g.stats.get("n_flips"), "ttt": g.ttt},
    }


def _chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None) -> str:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n"


class StreamJob:
    """A generation queued on the worker as soon as the request is admitted (so the pending count is
    released even if the response is never iterated); its text pieces arrive on the event loop."""

    def __init__(self, worker: Worker, messages: list[dict], kw: dict):
        loop = asyncio.get_running_loop()
        self.pieces: asyncio.Queue = asyncio.Queue()
        self.gone = False  # the client went away: the worker stops at its next token

        def on_text(delta: str) -> None:  # worker thread
            if self.gone:
                raise Cancelled
            loop.call_soon_threadsafe(self.pieces.put_nowait, delta)

        def work() -> Generation | None:
            try:
                return worker.dg.generate(messages, on_text=on_text, **kw)
            except Cancelled:
                return None

        self.task = asyncio.ensure_future(worker.run(work))


async def _sse(job: StreamJob, cid: str, created: int, model: str):
    """SSE chunks as the worker decodes; a failure becomes an in-band `error` event (headers are sent)."""
    try:
        yield _chunk(cid, created, model, {"role": "assistant", "content": ""})
        while True:
            getter = asyncio.ensure_future(job.pieces.get())
            await asyncio.wait({getter, job.task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield _chunk(cid, created, model, {"content": getter.result()})
                continue
            getter.cancel()
            while not job.pieces.empty():  # pieces queued before the task finished come first
                yield _chunk(cid, created, model, {"content": job.pieces.get_nowait()})
            break
        try:
            g = job.task.result()
        except Exception as e:
            kind = "invalid_request_error" if isinstance(e, DraftGuideError) else "server_error"
            if kind == "server_error":
                log.exception("streaming request failed")
            msg = str(e) if kind == "invalid_request_error" else f"{type(e).__name__}: {e}"
            yield f"data: {json.dumps({'error': {'message': msg, 'type': kind}})}\n\n"
        else:
            yield _chunk(cid, created, model, {}, g.finish_reason if g else "stop")
        yield "data: [DONE]\n\n"
    finally:
        job.gone = True


def serve(dg: DraftGuide, host: str = "127.0.0.1", port: int = 8000, *, model_name: str | None = None,
          max_pending: int = 64, defaults: dict | None = None, log_level: str = "info") -> None:
    import uvicorn

    app = create_app(dg, model_name, max_pending=max_pending, defaults=defaults)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["ChatRequest", "create_app", "serve"]
