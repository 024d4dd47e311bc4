"""The OpenAI-compatible HTTP API (FastAPI) over the decode loop (``Scheduler``).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream``, as
server-sent events ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health`` (503 once the
decode loop has failed), ``GET /metrics`` (Prometheus, ``hire.serve.metrics``). Chat takes
``response_format`` json_object / json_schema (a grammar per request, hire.serve.grammar) and ``tools``
(hire.serve.tools: calls parsed into ``tool_calls``); both endpoints take ``logprobs``
(hire.engine.logprobs). With an API key
(``create_app(api_key=)``) every route but ``/health`` needs ``Authorization: Bearer <key>``, else
a 401 as OpenAI's (code ``invalid_api_key``); past the scheduler's ``max_waiting`` a request gets a
429 with ``Retry-After``. Errors are
OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx for what the client
sent: malformed JSON, unknown fields, wrong types, ``max_tokens`` < 1, a prompt past the context.
A client that disconnects, streaming or not, has its request cancelled: its batch slot is freed
before the next decode step (a non-streamed request's connection is checked every
``DISCONNECT_POLL_S``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import psutil
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hire.serve.grammar import GrammarError, Grammars
from hire.serve.metrics import ServeMetrics
from hire.serve.protocol import APIError, ChatRequest, CompletionRequest, error_body
from hire.serve.scheduler import QueueFull, Sampling, Scheduler, SchedulerStopped, Sequence
from hire.serve.text import TextStream, TokenText, chat_prompt, completion_prompt, stop_list
from hire.serve.tools import ToolText, calls_grammar, markers_are_tokens


ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")  # others count as "other"
DISCONNECT_POLL_S = 0.1  # how often a non-streamed request checks that its client is still there
RETRY_AFTER_S = 1  # seconds a client turned away with a 429 is told to wait (a decode step is milliseconds)


@dataclass
class Service:
    """What the app serves: one model under one name, its tokenizer and its decode loop."""

    name: str
    tokenizer: object
    scheduler: Scheduler
    stop_ids: frozenset[int]
    context: int  # the longest prompt + completion, in tokens
    info: dict = field(default_factory=dict)  # weights, config, kernels: shown by /health and /v1/models
    created: int = field(default_factory=lambda: int(time.time()))
    token_text: TokenText | None = None  # each token's text and bytes, for logprobs (made on first use)
    grammars: Grammars | None = None  # structured output's grammar engine (made on first use)
    background: object | None = None  # hire.serve.background.BackgroundHead: the head fitted while serving dense

    def _grammar_engine(self) -> Grammars:
        if self.grammars is None:
            self.grammars = Grammars(self.tokenizer, self.scheduler.decoder.vocab_size, self.stop_ids)
        return self.grammars

    def warm_grammars(self) -> None:
        """Wrap the tokenizer for the grammar engine now (``hire serve`` does it on a thread at start:
        1 s for SmolLM2, several for Gemma-3's 262,144 tokens), so that the first structured request
        does not wait for it; a tokenizer it cannot use stays for that request's 400 to name."""
        try:
            self._grammar_engine().lltokenizer()
        except GrammarError:
            pass

    def constraint(self, body: ChatRequest):
        """The grammar of a chat request: its ``response_format``'s, or the calls its ``tool_choice``
        forces (None: free text); a 400 when it cannot be enforced."""
        forced = body.forced
        fmt = body.response_format
        if not forced and (not fmt or fmt.get("type", "text") == "text"):
            return None
        grammars = self._grammar_engine()
        param = "tool_choice" if forced else "response_format"
        try:
            if forced:
                return grammars.calls(calls_grammar(forced, parallel=body.parallel_tool_calls is not False,
                                                         marker_tokens=markers_are_tokens(self.tokenizer)))
            return grammars.compile(fmt)
        except GrammarError as exc:
            raise APIError(400, f"{param}: {exc}", param=param) from None

    def token(self, token: int) -> tuple[str, list[int]]:
        if self.token_text is None:
            self.token_text = TokenText(self.tokenizer)
        return self.token_text(token)


class _Authorize:
    """Every route but /health needs ``Authorization: Bearer <api_key>``, else OpenAI's 401."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = ("You didn't provide an API key: send it as 'Authorization: Bearer <key>'" if not given else
                           "Incorrect API key provided")
                response = JSONResponse(error_body(message, code="invalid_api_key"), status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class _CountRequests:
    """Each HTTP request into ``metrics.requests`` by route and status code."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {}

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.requests.labels(route, str(status.get("code", 500))).inc()


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if err.get("type") == "json_invalid":
        return "the request body is not valid JSON: " + str(err.get("ctx", {}).get("error", err.get("msg"))), None
    if err.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if err.get("type") == "missing":
        return f"Missing required parameter: {param}", param
    return f"Invalid value for {param}: {err.get('msg')}", param


def create_app(service: Service, *, start_loop: bool = True, api_key: str | None = None) -> FastAPI:
    """The ASGI app; it stops the decode loop on shutdown, and starts it on a thread of its own on
    startup unless ``start_loop`` is False (``serve`` runs it in the main thread). ``api_key``: the
    bearer token every route but ``/health`` requires (None or empty: none)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_loop:
            service.scheduler.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, service.scheduler.stop)

    app = FastAPI(title="HiRE", lifespan=lifespan)
    process = psutil.Process()
    metrics = app.state.metrics = ServeMetrics(service.scheduler)

    # plain ASGI middleware (Starlette's BaseHTTPMiddleware would hide a client's disconnect from the
    # routes); the last added is the outermost, so refused requests are counted too
    if api_key:
        app.add_middleware(_Authorize, api_key=api_key)
    app.add_middleware(_CountRequests, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, kind=kind), status_code=exc.status_code)

    @app.get("/health")
    async def health():
        load = service.scheduler.load()
        s = service.scheduler
        body = {"status": "ok" if s.error is None else "failed", "model": service.name, **load,
                "rss_mb": process.memory_info().rss / 2**20, "loop": s.stats.summary(),
                "union": s.decoder.stats.summary(s.decoder.vocab_size), **service.info}
        if s.error is not None:  # a supervisor or load balancer routes around it (or restarts it)
            body["error"] = repr(s.error)
            return JSONResponse(body, status_code=503)
        return body

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": service.created,
                                            "owned_by": "hire"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        body.check()
        prompt = completion_prompt(service.tokenizer, body.text)
        return await _respond(service, body, prompt, chat=False, request=request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        body.check()
        prompt = chat_prompt(service.tokenizer, [m.plain() for m in body.messages], body.functions)
        # the first compiles the tokenizer for the grammar engine (~1 s): off the event loop
        constraint = await asyncio.get_running_loop().run_in_executor(None, service.constraint, body)
        return await _respond(service, body, prompt, chat=True, request=request, constraint=constraint)

    return app


def _sequence(service: Service, body, prompt: torch.Tensor, emit) -> Sequence:
    if body.model != service.name:
        raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{service.name}'",
                       param="model", code="model_not_found")
    room = service.context - prompt.numel()
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {service.context} tokens; the prompt has "
                       f"{prompt.numel()}. Shorten it, or start the server with a larger --context.",
                       param="messages" if isinstance(body, ChatRequest) else "prompt", code="context_length_exceeded")
    max_tokens = room if body.max_tokens is None else body.max_tokens
    if max_tokens > room:
        raise APIError(400, f"This model's maximum context length is {service.context} tokens; the prompt has "
                       f"{prompt.numel()} and max_tokens asks for {max_tokens} more ({room} fit).",
                       param="max_tokens", code="context_length_exceeded")
    greedy = body.temperature == 0
    sampling = Sampling(temperature=body.temperature, top_k=None if greedy else body.top_k,
                        top_p=None if greedy or body.top_p >= 1 else body.top_p, seed=body.seed)
    if isinstance(body, ChatRequest):
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    else:
        logprobs = body.logprobs
    return Sequence(prompt=prompt, max_tokens=max_tokens, sampling=sampling, stop_ids=service.stop_ids, emit=emit,
                    logprobs=logprobs)


def _chat_logprobs(service: Service, entries: list) -> dict:
    """OpenAI's chat ``logprobs``: one entry per token, with its alternatives."""
    def item(token: int, logprob: float) -> dict:
        text, data = service.token(token)
        return {"token": text, "logprob": logprob, "bytes": data}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def _completion_logprobs(service: Service, entries: list, offset: int) -> dict:
    """OpenAI's (legacy) completions ``logprobs``; ``offset``: the characters of the completion before
    these tokens (``text_offset`` counts each token's own text)."""
    tokens, offsets = [], []
    for e in entries:
        text = service.token(e.token)[0]
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{service.token(t)[0]: lp for t, lp in e.top} for e in entries], "text_offset": offsets}


async def _events(service: Service, seq: Sequence, queue: asyncio.Queue, stream: TextStream, metrics: ServeMetrics,
                  arrived: float):
    """(text piece, finish reason or None, the TokenLogprobs of the tokens since the last piece) as
    the decode loop delivers; cancels the sequence if the consumer goes away (a disconnected client)
    before it ends. Each token's time goes to ``metrics`` (the first from ``arrived``, a
    ``time.perf_counter()``)."""
    last = None
    held: list = []  # the log-probabilities of tokens whose text is not given out yet

    def taken() -> list:
        out = held[:]
        held.clear()
        return out

    try:
        while True:
            event = await queue.get()
            if event[0] == "token":
                now = time.perf_counter()
                if last is None:
                    metrics.ttft.observe(now - arrived)
                else:
                    metrics.itl.observe(now - last)
                last = now
                if len(event) > 2:
                    held.append(event[2])
                piece = stream.add(event[1])
                if stream.stopped:
                    service.scheduler.cancel(seq)
                    yield piece, "stop", taken()
                    return
                if piece:
                    yield piece, None, taken()
                continue
            _, reason, message = event
            if reason == "error" or (reason == "cancelled" and message):
                raise APIError(503 if reason == "cancelled" else 500, message or "generation failed",
                               kind="server_error")
            yield stream.flush(), reason, taken()
            return
    finally:
        if not seq.finished:
            service.scheduler.cancel(seq)


async def _cancel_when_gone(service: Service, seq: Sequence, request: Request) -> None:
    """Cancel ``seq`` once ``request``'s client has disconnected (a non-streamed request: nothing is
    written until it ends, so the server would not notice otherwise)."""
    while not seq.finished:
        if await request.is_disconnected():
            service.scheduler.cancel(seq)
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


async def _respond(service: Service, body, prompt: torch.Tensor, *, chat: bool, request: Request, constraint=None):
    arrived = time.perf_counter()
    metrics: ServeMetrics = request.app.state.metrics
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    seq = _sequence(service, body, prompt, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
    seq.constraint = constraint
    stream = TextStream(service.tokenizer, stop_list(body.stop))
    try:
        service.scheduler.submit(seq)
    except SchedulerStopped as exc:
        raise APIError(503, str(exc), kind="server_error") from None
    except QueueFull as exc:  # OpenAI's rate-limit answer: clients back off and retry
        raise APIError(429, str(exc), code="rate_limit_exceeded", kind="rate_limit_error",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    functions = body.functions if chat else []
    tools = ToolText({f["name"] for f in functions}) if functions else None  # content and calls, split

    def usage() -> dict:
        n = len(seq.tokens)
        return {"prompt_tokens": prompt.numel(), "completion_tokens": n, "total_tokens": prompt.numel() + n}

    if not body.stream:
        parts, reason, entries = [], None, []
        watch = asyncio.ensure_future(_cancel_when_gone(service, seq, request))
        try:
            async for piece, reason, got in _events(service, seq, queue, stream, metrics, arrived):
                parts.append(piece)
                entries += got
        finally:
            watch.cancel()
        text = "".join(parts)
        logprobs = None if seq.logprobs is None else (_chat_logprobs(service, entries) if chat else
                                                      _completion_logprobs(service, entries, 0))
        message = {"role": "assistant", "content": text}
        if tools is not None:
            content, calls = tools.split(text)
            if calls:
                message = {"role": "assistant", "content": content or None, "tool_calls": calls}
                reason = "tool_calls"
        choice = ({"index": 0, "message": message, "logprobs": logprobs, "finish_reason": reason} if chat else
                  {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": service.name, "choices": [choice], "usage": usage()}

    include_usage = body.stream_options is not None and body.stream_options.include_usage
    kind = "chat.completion.chunk" if chat else "text_completion"

    offset = 0  # completions' text_offset: characters of the text given out so far

    def chunk(piece: str | None, reason: str | None, first: bool = False, entries: list | None = None,
              calls: list | None = None) -> str:
        nonlocal offset
        logprobs = None
        if seq.logprobs is not None and entries:
            logprobs = _chat_logprobs(service, entries) if chat else _completion_logprobs(service, entries, offset)
        if chat:
            delta = ({"role": "assistant", "content": ""} if first else
                     {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]} if calls else
                     {} if piece is None else {"content": piece})
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        else:
            offset += len(piece or "")
            choice = {"index": 0, "text": piece or "", "logprobs": logprobs, "finish_reason": reason}
        data = {"id": rid, "object": kind, "created": created, "model": service.name, "choices": [choice]}
        if include_usage:
            data["usage"] = None
        return f"data: {json.dumps(data)}\n\n"

    async def sse():
        try:
            if chat:
                yield chunk(None, None, first=True)
            async for piece, reason, entries in _events(service, seq, queue, stream, metrics, arrived):
                if tools is not None:  # content as it comes; from the first "<tool_call>" on, held
                    piece = tools.add(piece)
                if piece or entries:
                    yield chunk(piece, None, entries=entries)
                if reason is not None:
                    if tools is not None:
                        rest, calls = tools.end()
                        if rest:
                            yield chunk(rest, None)
                        if calls:
                            yield chunk(None, None, calls=calls)
                            reason = "tool_calls"
                    yield chunk(None, reason)
            if include_usage:
                data = {"id": rid, "object": kind, "created": created, "model": service.name, "choices": [],
                        "usage": usage()}
                yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"
        except APIError as exc:  # the stream has begun: the error goes in it, as OpenAI's does
            yield f"data: {json.dumps(exc.body())}\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
