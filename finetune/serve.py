"""`finetune serve`: an OpenAI-compatible HTTP server for a (fine-tuned) model, on Starlette and uvicorn.

Endpoints: GET /v1/models (and /v1/models/{id}), POST /v1/chat/completions (the conversation is prompted with the
model's template, through `prompt_ids`) and POST /v1/completions (raw text continuation: BOS + the prompt's tokens).
Both stream server-sent events in OpenAI's chunk format with `"stream": true`, ending with `data: [DONE]`.

One worker thread runs the model. Requests wait in a bounded queue (a prompt that finds `max_queue` prompts waiting
gets a 429 at once); the worker takes the oldest waiting prompt and up to `max_batch - 1` more that can share its
`stream_generate` call (same sampling settings and stop strings; sampling with a seed runs alone, so that the seed
reproduces its answer), and passes each row's tokens to its request as the batch produces them. A prompt that
arrives while a batch runs waits for the next batch. A client that goes away only cancels its own rows.

Requests are validated strictly (finetune.serve_requests): a bad one gets OpenAI's error shape, {"error":
{"message", "type", "param", "code"}}, and a 4xx status; 500 is only for a failure inside the server, which keeps
running.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from llama_core.generate import stream_generate

from .chat import TextStream
from .errors import UserError
from .serve_requests import (ApiError, Sampling, Settings, completion_prompts, json_type, option, parse_messages,
                             parse_settings, unique)

log = logging.getLogger("finetune.serve")

MAX_BODY_BYTES = 32 * 1024 * 1024

# ------------------------------------------------------------------------------------------------------- batching

@dataclass(eq=False)
class Job:
    """One prompt waiting for, or in, a batch. `deliver` (thread-safe) passes ("tokens", ids), ("done", reason)
    or ("error", message) to the request; "done" and "error" come once, last."""
    prompt: list[int]
    limit: int  # new tokens at most: max_tokens, within the context
    sampling: Sampling
    deliver: Callable[[tuple], None]
    cancelled: bool = False  # set by the request (its client went away); the worker drops the row
    finished: bool = False

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share one `stream_generate` call and get the tokens they would get alone.
        A seeded sample runs alone (its draws depend on the batch); with stop strings, `stream_generate` holds
        back tokens that a row cut short by its own limit would lose, so rows share a batch only with rows of
        the same limit then."""
        s = self.sampling
        alone = self if s.temperature > 0 and s.seed is not None else None
        return s, self.limit if s.stop else None, alone

    def finish(self, reason: str) -> None:
        self.finished = True
        if not self.cancelled:
            self.deliver(("done", reason))

    def fail(self, message: str) -> None:
        self.finished = True
        if not self.cancelled:
            self.deliver(("error", message))


class Batcher:
    """The worker thread: takes batches of waiting jobs and generates them; a bounded queue."""

    def __init__(self, model, tokenizer, *, max_batch: int, max_queue: int, stop_ids: Sequence[int] = ()):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.stop_ids = max_batch, max_queue, frozenset(stop_ids)
        self.cond = threading.Condition()
        self.pending: list[Job] = []
        self.stats = {"batches": 0, "rows": 0}  # generation calls and rows run (for tests and monitoring)
        self.thread: threading.Thread | None = None
        self.stopping = False

    def start(self) -> None:
        with self.cond:
            if self.thread is None:
                self.stopping = False
                self.thread = threading.Thread(target=self._run, name="finetune-serve-worker", daemon=True)
                self.thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Fail the waiting jobs, end the running batch after its current step, and join the thread."""
        with self.cond:
            self.stopping, thread, self.thread = True, self.thread, None
            self.cond.notify_all()
        if thread is not None:
            thread.join(timeout)

    def submit(self, jobs: list[Job]) -> None:
        with self.cond:
            if self.stopping:
                raise ApiError(503, "the server is shutting down", type="server_error")
            self.pending = [j for j in self.pending if not j.cancelled]
            if len(self.pending) + len(jobs) > self.max_queue:
                raise ApiError(429, f"server busy: {len(self.pending)} prompts are waiting (at most "
                                    f"{self.max_queue}); retry later", type="rate_limit_error", code="server_busy",
                               headers={"Retry-After": "1"})
            self.pending.extend(jobs)
            self.cond.notify()
        self.start()  # in case the app runs without its lifespan

    def waiting(self) -> int:
        with self.cond:
            return sum(not j.cancelled for j in self.pending)

    def _run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.stopping or any(not j.cancelled for j in self.pending))
                if self.stopping:
                    for job in self.pending:
                        job.fail("the server is shutting down")
                    self.pending = []
                    return
                batch = self._take()
                if not batch:  # its client went away since the wait (cancel() does not take the lock)
                    continue
                self.stats["batches"] += 1
                self.stats["rows"] += len(batch)
            try:
                self._generate(batch)
            except Exception as e:  # a failure inside generation (e.g. out of memory) fails this batch only
                log.exception("generation failed for a batch of %d", len(batch))
                for job in batch:
                    if not job.finished:
                        job.fail(f"generation failed: {type(e).__name__}: {e}")

    def _take(self) -> list[Job]:
        """The oldest waiting job and, in order, the waiting jobs that can join it (same key, and the batch's
        longest prompt leaves room for every row's limit: `stream_generate` stops all rows at the context); empty
        when every waiting job was cancelled."""
        live = [j for j in self.pending if not j.cancelled]
        if not live:
            self.pending = []
            return []
        batch, context = [live[0]], self.model.config.max_seq_len
        for job in live[1:]:
            if len(batch) == self.max_batch:
                break
            rows = batch + [job]
            if job.key == batch[0].key and max(len(j.prompt) for j in rows) + max(j.limit for j in rows) <= context:
                batch.append(job)
        taken = set(map(id, batch))
        self.pending = [j for j in live if id(j) not in taken]
        return batch

    def _generate(self, batch: list[Job]) -> None:
        s, reasons = batch[0].sampling, []
        generator = None
        if s.temperature > 0 and s.seed is not None:
            generator = torch.Generator(next(self.model.parameters()).device).manual_seed(s.seed)
        steps = stream_generate(
            self.model, [j.prompt for j in batch], max_new_tokens=max(j.limit for j in batch),
            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, eos_id={self.tokenizer.eos_id, *self.stop_ids},
            pad_id=self.tokenizer.pad_id, stop=list(s.stop) or None, tokenizer=self.tokenizer if s.stop else None,
            generator=generator, finish_reasons=reasons)
        counts = [0] * len(batch)
        try:
            for step in steps:
                for i, (job, new) in enumerate(zip(batch, step)):
                    if not (job.finished or job.cancelled):
                        counts[i] += self._pass_on(job, new, counts[i], ended=reasons[i] != "length")
                if self.stopping or all(j.finished or j.cancelled for j in batch):
                    break
        finally:
            steps.close()
        for job in batch:
            if job.finished:
                continue
            if self.stopping:
                job.fail("the server is shutting down")
            else:
                job.finish("length")

    def _pass_on(self, job: Job, new: list[int], count: int, ended: bool) -> int:
        """Deliver a row's new tokens within its own limit; finish it when it is done. `ended`: `stream_generate`
        ended the row (EOS, a stop id or a stop string). Returns the number delivered."""
        if len(new) > job.limit - count:  # the batch runs to its longest limit: cut this row at its own
            new, ended = new[:job.limit - count], False
        if new:
            job.deliver(("tokens", new))
        if ended:
            job.finish("stop")
        elif count + len(new) >= job.limit:
            job.finish("length")
        return len(new)


class Submission:
    """The jobs of one HTTP request and the asyncio queue the worker fills for them."""

    def __init__(self, batcher: Batcher, prompts: list[list[int]], limits: list[int], sampling: Sampling):
        loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()

        def deliverer(index: int) -> Callable[[tuple], None]:
            def deliver(item: tuple) -> None:
                with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is listening
                    loop.call_soon_threadsafe(self.queue.put_nowait, (index, *item))
            return deliver

        self.jobs = [Job(p, n, sampling, deliverer(i)) for i, (p, n) in enumerate(zip(prompts, limits))]
        batcher.submit(self.jobs)

    async def events(self):
        """(index, kind, value) as the worker produces them, until every job is done or failed."""
        remaining = len(self.jobs)
        while remaining:
            item = await self.queue.get()
            remaining -= item[1] != "tokens"
            yield item

    async def results(self) -> list[tuple[list[int], str]]:
        """Each job's tokens and finish reason ("eos" and stop strings: "stop"); a 500 if generation failed."""
        tokens: list[list[int]] = [[] for _ in self.jobs]
        reasons = [""] * len(self.jobs)
        async for index, kind, value in self.events():
            if kind == "error":
                raise ApiError(500, value, type="server_error")
            if kind == "tokens":
                tokens[index] += value
            else:
                reasons[index] = value
        return list(zip(tokens, reasons))

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled = True


# ---------------------------------------------------------------------------------------------------------- the app

@dataclass
class _Server:
    model: object
    tokenizer: object
    prompt_ids: Callable[[list[dict]], list[int]]
    model_name: str
    batcher: Batcher
    default_max_tokens: int
    chat_stop: tuple[str, ...]
    created: int = field(default_factory=lambda: int(time.time()))

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llama-finetune"}

    async def list_models(self, request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def get_model(self, request) -> JSONResponse:
        self.check_model(request.path_params["model"])
        return JSONResponse(self.model_card())

    def check_model(self, name) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"the model {json.dumps(name)[:100]} does not exist; this server has "
                                f"{self.model_name!r}", "model", code="model_not_found")

    async def read_body(self, request) -> dict:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as e:  # malformed JSON, or not UTF-8
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {json_type(body)}")
        self.check_model(option(body, "model", lambda v: isinstance(v, str), "a string"))
        return body

    def limits(self, prompts: list[list[int]], max_tokens: int, param: str) -> list[int]:
        context = self.model.config.max_seq_len
        for p in prompts:
            if len(p) >= context:
                raise ApiError(400, f"this model's maximum context length is {context} tokens, and the prompt has "
                                    f"{len(p)}: shorten it (it needs room for at least one new token)", param,
                               code="context_length_exceeded")
        return [min(max_tokens, context - len(p)) for p in prompts]

    async def chat(self, request):
        body = await self.read_body(request)
        messages = parse_messages(body.get("messages"))
        settings = parse_settings(body, self.default_max_tokens, self.chat_stop)
        try:
            ids = self.prompt_ids(messages)
        except (ValueError, KeyError, UserError) as e:  # a conversation the template cannot render
            raise ApiError(400, f"the template cannot render these messages: {e}", "messages") from None
        return await self.respond(request, [ids], settings, "messages", _ChatFormat(self.model_name))

    async def completions(self, request):
        body = await self.read_body(request)
        prompts = completion_prompts(body.get("prompt"), self.tokenizer)
        settings = parse_settings(body, self.default_max_tokens)
        return await self.respond(request, prompts, settings, "prompt", _CompletionFormat(self.model_name))

    async def respond(self, request, prompts, settings: Settings, param: str, fmt):
        limits = self.limits(prompts, settings.max_tokens, param)
        sub = Submission(self.batcher, prompts, limits, settings.sampling)
        usage = {"prompt_tokens": sum(map(len, prompts))}
        if settings.stream:
            return _EventStream(self.stream(sub, fmt, usage, settings.include_usage), sub)
        try:
            results = await sub.results()
        finally:
            sub.cancel()  # no-op when done; else (the handler was cancelled) frees the rows
        texts = [TextStream(self.tokenizer, fmt.strip).push(ids, final=True) for ids, _ in results]
        usage["completion_tokens"] = sum(len(ids) for ids, _ in results)
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return JSONResponse(fmt.response(texts, [_FINISH[r] for _, r in results], usage))

    async def stream(self, sub: Submission, fmt, usage: dict, include_usage: bool):
        decoders = [TextStream(self.tokenizer, fmt.strip) for _ in sub.jobs]
        for index in range(len(sub.jobs)):
            if (first := fmt.start(index)) is not None:
                yield _sse(first)
        async for index, kind, value in sub.events():
            if kind == "error":
                yield _sse(ApiError(500, value, type="server_error").body())
                return
            text = decoders[index].push(value if kind == "tokens" else [], final=kind == "done")
            if text:
                yield _sse(fmt.chunk(index, text, None))
            if kind == "done":
                yield _sse(fmt.chunk(index, None, _FINISH[value]))
        if include_usage:
            usage["completion_tokens"] = sum(len(d.tokens) for d in decoders)
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            yield _sse(fmt.usage_chunk(usage))
        yield "data: [DONE]\n\n"


_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class _ChatFormat:
    """The JSON of /v1/chat/completions: a response, or stream chunks."""
    strip = True  # the answer follows the template's header: drop the space before its first word

    def __init__(self, model_name: str):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model_name

    def _envelope(self, kind: str, choices: list) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def response(self, texts: list[str], reasons: list[str], usage: dict) -> dict:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                    "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
        return {**self._envelope("chat.completion", choices), "usage": usage}

    def start(self, index: int) -> dict:
        return self.chunk(index, "", None, role=True)

    def chunk(self, index: int, text: str | None, reason: str | None, role: bool = False) -> dict:
        delta = ({"role": "assistant"} if role else {}) | ({} if text is None else {"content": text})
        return self._envelope("chat.completion.chunk", [{"index": index, "delta": delta, "logprobs": None,
                                                         "finish_reason": reason}])

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._envelope("chat.completion.chunk", []), "usage": usage}


class _CompletionFormat:
    """The JSON of /v1/completions: a response, or stream chunks."""
    strip = False  # raw continuation: the text as it continues the prompt, leading space included

    def __init__(self, model_name: str):
        self.id, self.created, self.model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), model_name

    def _envelope(self, choices: list) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def response(self, texts: list[str], reasons: list[str], usage: dict) -> dict:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return {**self._envelope(choices), "usage": usage}

    def start(self, index: int) -> None:
        return None

    def chunk(self, index: int, text: str | None, reason: str | None) -> dict:
        return self._envelope([{"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}])

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._envelope([]), "usage": usage}


class _EventStream(StreamingResponse):
    """Server-sent events; the request's rows are cancelled however the stream ends (e.g. the client left)."""

    def __init__(self, events, submission: Submission):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.submission = submission

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.submission.cancel()


def _endpoint(handler):
    """A route handler whose refusals become OpenAI error responses, and whose bugs a logged 500."""
    async def run(request):
        try:
            return await handler(request)
        except ApiError as e:
            return e.response()
        except Exception:
            log.exception("internal error in %s %s", request.method, request.url.path)
            return ApiError(500, "internal server error (see the server's log)", type="server_error").response()
    return run


async def _http_error(request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors (unknown path, wrong method) in OpenAI's shape."""
    message = {404: f"unknown path {request.url.path}", 405: f"method {request.method} not allowed for "
               f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
    return ApiError(exc.status_code, message, headers=exc.headers).response()


def create_app(model, tokenizer, prompt_ids: Callable[[list[dict]], list[int]], *, model_name: str,
               max_batch: int = 8, max_queue: int = 64, stop_ids: Sequence[int] = (),
               default_max_tokens: int = 256, chat_stop: Sequence[str] = ()) -> Starlette:
    """The OpenAI-compatible app serving `model` (put in eval mode).

    `prompt_ids(messages)`: the prompt's token ids of a conversation (a list of {"role", "content"} ending with a
    user message); it raises ValueError (or UserError) for one its template cannot render (a 400). `tokenizer`:
    encode(text, bos=...), decode(ids, continuation=...), eos_id, pad_id, vocab_size. `stop_ids`: token ids that
    end an answer besides EOS (not returned). `chat_stop`: stop strings added to every chat request (`finetune
    chat` stops at the start of the template's next user turn). `app.state.batcher.stats` counts batches and rows.
    """
    if max_batch < 1 or max_queue < 0 or default_max_tokens < 1:
        raise ValueError(f"need max_batch >= 1, max_queue >= 0 and default_max_tokens >= 1; got {max_batch}, "
                         f"{max_queue}, {default_max_tokens}")
    model.eval()
    batcher = Batcher(model, tokenizer, max_batch=max_batch, max_queue=max_queue, stop_ids=stop_ids)
    server = _Server(model, tokenizer, prompt_ids, model_name, batcher, default_max_tokens, unique(chat_stop))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop)

    routes = [Route("/v1/models", _endpoint(server.list_models), methods=["GET"]),
              Route("/v1/models/{model:path}", _endpoint(server.get_model), methods=["GET"]),
              Route("/v1/chat/completions", _endpoint(server.chat), methods=["POST"]),
              Route("/v1/completions", _endpoint(server.completions), methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error}, lifespan=lifespan)
    app.state.batcher = batcher
    return app


def serve(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run `app` with uvicorn until interrupted (Ctrl-C); localhost only unless `host` says otherwise."""
    import uvicorn

    uvicorn.run(app, host=host, port=port)
