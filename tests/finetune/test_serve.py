"""`finetune serve`: the OpenAI-compatible server on a real uvicorn server, called with the official `openai`
client: greedy answers equal `generate`'s, streaming equals non-streaming, stop strings and stop ids, seeds, OpenAI
error shapes and statuses, concurrent requests batched with the same answers as alone, a bounded queue (429), a
client leaving mid-stream, an internal failure (500), and a server that keeps answering after each error."""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from finetune.chat import TextStream
from finetune.templates import load_template, tokenize
from llama_core.config import get_config
from llama_core.generate import generate
from llama_core.model import Transformer

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
serve = pytest.importorskip("finetune.serve")

TIMEOUT = 30  # seconds: every wait in these tests is bounded by it
NAME = "tiny-test"
HELLO = [{"role": "user", "content": "It was a long day."}]
ERROR_KEYS = {"message", "type", "param", "code"}


class Gate:
    """The model, wrapped: while `open` is clear the worker blocks in the forward pass (holding its batch), so
    requests sent meanwhile wait in the queue; `fail` makes the forward pass raise; `calls` counts passes."""

    def __init__(self, model):
        self.model, self.fail, self.calls = model, False, 0
        self.open, self.entered = threading.Event(), threading.Event()
        self.open.set()

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.entered.set()
        if not self.open.wait(TIMEOUT):
            raise RuntimeError("the test never opened the gate")
        if self.fail:
            raise RuntimeError("simulated failure")
        return self.model(*args, **kwargs)


def make_model() -> Transformer:
    model = Transformer(get_config("tiny"))
    model.reset_parameters(seed=0)
    return model.float().eval()


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@contextmanager
def running(app):
    """`app` on a real uvicorn server on a free local port, in a thread; yields the API's base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), "the server to start")
    assert server.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def srv(tokenizer):
    model, template = make_model(), load_template("alpaca")

    def prompt_ids(messages):
        return tokenize(template.prompt(messages), tokenizer)

    gate = Gate(model)
    app = serve.create_app(gate, tokenizer, prompt_ids, model_name=NAME, max_batch=4, max_queue=2,
                           default_max_tokens=16)
    clients = []

    def client():  # a new client (its own connections) for each call: separate clients, as separate users
        clients.append(openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=TIMEOUT))
        return clients[-1]

    with running(app) as url, ThreadPoolExecutor(4) as pool:
        yield SimpleNamespace(url=url, model=model, gate=gate, batcher=app.state.batcher, prompt_ids=prompt_ids,
                              pool=pool, client=client)
        gate.open.set()
    for c in clients:
        c.close()


def greedy(srv, tokenizer, ids, max_new_tokens, strip=True, **kwargs) -> tuple[str, str]:
    """Our own `generate` on the same prompt ids alone: (text, OpenAI finish reason)."""
    reasons = []
    out = generate(srv.model, [ids], max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                   finish_reasons=reasons, tokenizer=tokenizer, **kwargs)[0]
    text = tokenizer.decode(out, continuation=True)
    return text.lstrip() if strip else text, {"eos": "stop", "stop": "stop", "length": "length"}[reasons[0]]


def chat(srv, messages=HELLO, **kwargs):
    return srv.client().chat.completions.create(model=NAME, messages=messages, **kwargs)


def post(srv, path: str, data: bytes, method: str = "POST") -> tuple[int, dict]:
    """A raw request (for bodies the openai client cannot send): (status, JSON body)."""
    request = urllib.request.Request(srv.url + path, data=data if method == "POST" else None, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


def assert_still_answers(srv, tokenizer) -> None:
    expected, _ = greedy(srv, tokenizer, srv.prompt_ids(HELLO), 4)
    assert chat(srv, temperature=0, max_tokens=4).choices[0].message.content == expected


@contextmanager
def held_worker(srv):
    """The worker blocked inside a batch (a blocker request's): requests sent meanwhile wait in the queue."""
    srv.gate.open.clear()
    srv.gate.entered.clear()
    blocker = srv.pool.submit(lambda: srv.client().completions.create(model=NAME, prompt="x", max_tokens=2,
                                                                      temperature=0))
    try:
        assert srv.gate.entered.wait(TIMEOUT), "the blocker request never reached the model"
        yield
    finally:
        srv.gate.open.set()
        blocker.result(TIMEOUT)


def test_models_and_chat_equal_greedy_generate(srv, tokenizer):
    client = srv.client()
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    ids = srv.prompt_ids(HELLO)
    expected, reason = greedy(srv, tokenizer, ids, 12)
    assert expected.strip()
    response = chat(srv, temperature=0, max_tokens=12)
    assert response.object == "chat.completion" and response.model == NAME
    choice = response.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", expected, reason)
    assert response.usage.prompt_tokens == len(ids)
    assert 0 < response.usage.completion_tokens <= 12
    assert response.usage.total_tokens == len(ids) + response.usage.completion_tokens
    # max_completion_tokens wins over max_tokens; content parts are joined; the default is default_max_tokens.
    parts = [{"role": "user", "content": [{"type": "text", "text": "It was"}, {"type": "text", "text": "a day."}]}]
    expected_parts, _ = greedy(srv, tokenizer, srv.prompt_ids([{"role": "user", "content": "It was\na day."}]), 5)
    assert chat(srv, parts, temperature=0, max_tokens=50, max_completion_tokens=5).choices[0].message.content \
        == expected_parts
    assert chat(srv, temperature=0).usage.completion_tokens == 16


def test_stream_equals_non_stream(srv, tokenizer):
    expected, reason = greedy(srv, tokenizer, srv.prompt_ids(HELLO), 20)
    chunks = list(chat(srv, temperature=0, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    *answer, usage = chunks
    assert answer[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in answer) == expected
    assert [c.choices[0].finish_reason for c in answer] == [None] * (len(answer) - 1) + [reason]
    assert len(answer) > 3  # streamed in pieces, not in one chunk
    assert usage.choices == [] and usage.usage.completion_tokens == 20
    assert chat(srv, temperature=0, max_tokens=20).choices[0].message.content == expected


def test_completions(srv, tokenizer):
    client = srv.client()
    prompts = ["The model of water", "It was the first day"]
    expected = [greedy(srv, tokenizer, tokenizer.encode(p, bos=True), 10, strip=False) for p in prompts]
    one = client.completions.create(model=NAME, prompt=prompts[0], max_tokens=10, temperature=0)
    assert one.object == "text_completion"
    assert (one.choices[0].text, one.choices[0].finish_reason) == expected[0]
    both = client.completions.create(model=NAME, prompt=prompts, max_tokens=10, temperature=0)
    assert [(c.index, c.text, c.finish_reason) for c in both.choices] == [(i, *e) for i, e in enumerate(expected)]
    ids = client.completions.create(model=NAME, prompt=tokenizer.encode(prompts[1], bos=True), max_tokens=10,
                                    temperature=0)
    assert ids.choices[0].text == expected[1][0]
    streamed = list(client.completions.create(model=NAME, prompt=prompts, max_tokens=10, temperature=0,
                                              stream=True))
    for i, (text, reason) in enumerate(expected):
        mine = [c.choices[0] for c in streamed if c.choices[0].index == i]
        assert "".join(c.text for c in mine) == text
        assert mine[-1].finish_reason == reason


def test_stop_strings_ids_and_seed(srv, tokenizer):
    ids = srv.prompt_ids(HELLO)
    full, _ = greedy(srv, tokenizer, ids, 24)
    stop = full[8:11]
    assert stop.strip() and full.find(stop) > 0
    expected, reason = greedy(srv, tokenizer, ids, 24, stop=[stop])
    assert reason == "stop" and full.startswith(expected) and len(expected) <= full.find(stop)
    choice = chat(srv, temperature=0, max_tokens=24, stop=stop).choices[0]
    assert (choice.message.content, choice.finish_reason) == (expected, "stop")
    # A seed reproduces a sampled answer, which is the one `generate` draws alone with that seed.
    sampled, _ = greedy(srv, tokenizer, ids, 12, temperature=1.0, top_p=0.9,
                        generator=torch.Generator().manual_seed(7))
    answers = {chat(srv, temperature=1.0, top_p=0.9, seed=7, max_tokens=12).choices[0].message.content
               for _ in range(2)}
    assert answers == {sampled}
    # stop_ids end an answer before the id (a second server sharing the model).
    tokens = generate(srv.model, [ids], max_new_tokens=12, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)[0]
    k = tokens.index(tokens[5])
    app = serve.create_app(srv.model, tokenizer, srv.prompt_ids, model_name=NAME, stop_ids=[tokens[5]])
    with running(app) as url, openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=TIMEOUT) as client:
        choice = client.chat.completions.create(model=NAME, messages=HELLO, temperature=0, max_tokens=12).choices[0]
    assert (choice.message.content, choice.finish_reason) == (tokenizer.decode(tokens[:k], continuation=True).lstrip(),
                                                             "stop")


@pytest.mark.parametrize("kwargs, param, words", [
    ({"n": 2}, "n", "n=1"),
    ({"temperature": -1}, "temperature", "between 0 and 2"),
    ({"temperature": 2.5}, "temperature", "between 0 and 2"),
    ({"top_p": 1.5}, "top_p", "between 0 and 1"),
    ({"max_tokens": 0}, "max_tokens", "at least 1"),
    ({"logprobs": True}, "logprobs", "not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ({"stop": [1]}, "stop[0]", "must be a string"),
    ({"messages": [{"role": "user", "content": "the day " * 300}]}, "messages", "maximum context length is 256"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role", "'system', 'user' or 'assistant'"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}, "messages",
     "last message must be from the user"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]", "only text content parts"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "messages",
     "template cannot render"),
])
def test_bad_chat_requests_get_400(srv, tokenizer, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        chat(srv, **{"temperature": 0, **kwargs})
    error = e.value.response.json()["error"]
    assert set(error) == ERROR_KEYS and error["type"] == "invalid_request_error"
    assert error["param"] == param and words in error["message"]


def test_malformed_requests_and_unknown_paths(srv, tokenizer):
    cases = [("/chat/completions", b'{"model": "tiny-test", "messages": [', 400, "not valid JSON"),
             ("/chat/completions", b'[1, 2]', 400, "must be a JSON object"),
             ("/chat/completions", b'{"model": "tiny-test"}', 400, "'messages' must be a non-empty array"),
             ("/chat/completions", b'{"messages": []}', 400, "'messages' must be a non-empty array"),
             ("/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
              "'temperature' must be a number"),
             ("/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "lone surrogate"),
             ("/chat/completions", b'{"model": 3, "messages": [{"role": "user", "content": "hi"}]}', 400,
              "'model' must be a string"),
             ("/completions", b'{"prompt": [1, 999]}', 400, "token ids in [0, 320)"),
             ("/completions", b'{"prompt": "hi", "echo": true}', 400, "'echo' is not supported"),
             ("/completions", b'{}', 400, "'prompt' must be"),
             ("/completions", b'{"prompt": "hi", "max_tokens": "5"}', 400, "'max_tokens' must be an integer"),
             ("/nowhere", b'{}', 404, "unknown path /v1/nowhere")]
    for path, data, status, words in cases:
        got, body = post(srv, path, data)
        assert (got, set(body["error"])) == (status, ERROR_KEYS), (path, data, body)
        assert words in body["error"]["message"], (path, data, body)
    got, body = post(srv, "/chat/completions", b"", method="GET")
    assert got == 405 and set(body["error"]) == ERROR_KEYS
    with pytest.raises(openai.NotFoundError) as e:
        srv.client().chat.completions.create(model="gpt-4", messages=HELLO)
    assert e.value.response.json()["error"]["code"] == "model_not_found"
    # Unknown parameters are ignored.
    status, body = post(srv, "/chat/completions", json.dumps({"messages": HELLO, "max_tokens": 3, "temperature": 0,
                                                              "user": "me", "some_extension": [1]}).encode())
    assert status == 200 and body["usage"]["completion_tokens"] == 3
    assert_still_answers(srv, tokenizer)


def test_concurrent_clients_are_batched_and_answer_as_alone(srv, tokenizer):
    convs = [HELLO, [{"role": "user", "content": "The water of the old house is good, and the light is small."}]]
    expected = [greedy(srv, tokenizer, srv.prompt_ids(c), 14)[0] for c in convs]
    assert len({len(srv.prompt_ids(c)) for c in convs}) == 2  # different lengths: left padding in the batch

    def streamed(messages):
        chunks = chat(srv, messages, temperature=0, max_tokens=14, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks)

    before = dict(srv.batcher.stats)
    with held_worker(srv):
        a = srv.pool.submit(lambda: chat(srv, convs[0], temperature=0, max_tokens=14).choices[0].message.content)
        b = srv.pool.submit(streamed, convs[1])
        wait_until(lambda: srv.batcher.waiting() == 2, "both requests to wait in the queue")
    assert [a.result(TIMEOUT), b.result(TIMEOUT)] == expected
    # The blocker's batch, then one batch of both rows.
    assert (srv.batcher.stats["batches"] - before["batches"], srv.batcher.stats["rows"] - before["rows"]) == (2, 3)


def test_full_queue_gets_429(srv, tokenizer):
    expected, _ = greedy(srv, tokenizer, srv.prompt_ids(HELLO), 6)
    with held_worker(srv):
        waiting = [srv.pool.submit(lambda: chat(srv, temperature=0, max_tokens=6).choices[0].message.content)
                   for _ in range(2)]
        wait_until(lambda: srv.batcher.waiting() == 2, "two requests to wait in the queue (max_queue=2)")
        with pytest.raises(openai.RateLimitError) as e:
            chat(srv, temperature=0, max_tokens=6)
        error = e.value.response.json()["error"]
        assert set(error) == ERROR_KEYS and "server busy" in error["message"]
    assert [w.result(TIMEOUT) for w in waiting] == [expected, expected]
    assert_still_answers(srv, tokenizer)


def test_client_leaving_mid_stream_does_not_break_the_batch(srv, tokenizer):
    expected, _ = greedy(srv, tokenizer, srv.prompt_ids(HELLO), 8)

    def leave_after_two_chunks():
        stream = chat(srv, temperature=0, max_tokens=100, stream=True)
        chunks = [next(stream), next(stream)]
        stream.close()
        return len(chunks)

    before = dict(srv.batcher.stats)
    with held_worker(srv):
        leaver = srv.pool.submit(leave_after_two_chunks)
        stayer = srv.pool.submit(lambda: chat(srv, temperature=0, max_tokens=8).choices[0].message.content)
        wait_until(lambda: srv.batcher.waiting() == 2, "both requests to wait in the queue")
    assert leaver.result(TIMEOUT) == 2 and stayer.result(TIMEOUT) == expected
    assert srv.batcher.stats["rows"] - before["rows"] == 3 and srv.batcher.stats["batches"] - before["batches"] == 2
    assert_still_answers(srv, tokenizer)


def test_internal_failure_is_500_and_the_server_goes_on(srv, tokenizer):
    srv.gate.fail = True
    try:
        with pytest.raises(openai.InternalServerError) as e:
            chat(srv, temperature=0, max_tokens=4)
        error = e.value.response.json()["error"]
        assert set(error) == ERROR_KEYS and error["type"] == "server_error" and "simulated failure" in error["message"]
        with pytest.raises(openai.APIError, match="simulated failure"):  # streamed: an error event
            list(chat(srv, temperature=0, max_tokens=4, stream=True))
    finally:
        srv.gate.fail = False
    assert_still_answers(srv, tokenizer)


def test_cancelled_row_stops_costing_and_the_others_finish(tokenizer):
    """The worker alone: a row cancelled after its first tokens gets nothing more, the other row gets all its
    tokens, and the batch ends when the remaining row is done, not at the cancelled row's limit."""
    model = Gate(make_model())
    batcher = serve.Batcher(model, tokenizer, max_batch=4, max_queue=4)
    prompts = [tokenizer.encode("The model of water", bos=True), tokenizer.encode("It was", bos=True)]
    events, done = [[], [], []], [threading.Event() for _ in range(3)]

    def deliver(i):
        def put(item):
            events[i].append(item)
            if i == 0:
                jobs[0].cancelled = True  # the client left after its first tokens
            if item[0] != "tokens":
                done[i].set()
        return put

    jobs = [serve.Job(prompts[0], 60, serve.Sampling(), deliver(0)),
            serve.Job(prompts[1], 5, serve.Sampling(), deliver(1))]
    try:
        batcher.submit(jobs)
        assert done[1].wait(TIMEOUT)
        # A one-token job after it: the worker takes it only when it has left the first batch.
        batcher.submit([serve.Job(prompts[1], 1, serve.Sampling(), deliver(2))])
        assert done[2].wait(TIMEOUT)
    finally:
        batcher.stop()
    alone = generate(model.model, [prompts[1]], max_new_tokens=5, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    assert events[1] == [("tokens", [t]) for t in alone[0]] + [("done", "length")]
    assert len(events[0]) == 1 and events[0][0][0] == "tokens" and not done[0].is_set()
    assert model.calls == 5 + 1  # prefill + 4 steps, then the last job's prefill: the cancelled row's 60 never ran
    assert batcher.stats == {"batches": 2, "rows": 3}


def test_text_decoder_holds_back_partial_characters_and_strips_the_answer_space(tokenizer):
    text = " It was 日本 day"  # 日 and 本 are not in the tokenizer: three byte pieces each
    ids = tokenizer.encode(text, continuation=True)
    assert len(ids) > len(text.split())
    for strip, expected in ((True, text.lstrip()), (False, text)):
        decoder = TextStream(tokenizer, strip_leading=strip)
        pieces = [decoder.push([i]) for i in ids] + [decoder.push([], final=True)]
        assert "".join(pieces) == expected and not any("\ufffd" in p for p in pieces)
        assert "日" in pieces  # released whole once its last byte arrived
    # An incomplete character at the very end comes out, as the replacement character, only when final.
    decoder = TextStream(tokenizer, strip_leading=True)
    partial = tokenizer.encode("日", continuation=True)[:2]
    assert decoder.push(partial) == ""
    assert set(decoder.push([], final=True)) == {"\ufffd"}


def test_batching_policy():
    """Which waiting jobs share a batch: the oldest, then those with its settings that fit, up to max_batch."""
    model = SimpleNamespace(config=SimpleNamespace(max_seq_len=256))
    batcher = serve.Batcher(model, None, max_batch=3, max_queue=64)

    def job(name, limit=16, prompt=10, **sampling):
        j = serve.Job([1] * prompt, limit, serve.Sampling(**sampling), lambda item: None)
        j.name = name
        return j

    batcher.pending = [
        job("greedy"), job("seeded", temperature=0.7, seed=1), job("greedy, other limit", limit=8),
        job("stop", stop=("x",)), job("greedy 3"), job("sampled", temperature=0.7), job("greedy 4"),
        job("sampled 2", temperature=0.7), job("seeded 2", temperature=0.7, seed=1), job("stop, other limit",
                                                                                        limit=8, stop=("x",)),
        job("stop 2", stop=("x",)), job("long", prompt=200, limit=50), job("room", limit=100),
        job("sampled, other top_p", temperature=0.7, top_p=0.5)]
    batcher.pending[3].cancelled = True  # "stop": its client left
    batches = []
    while batcher.pending:
        batches.append([j.name for j in batcher._take()])
    assert batches == [["greedy", "greedy, other limit", "greedy 3"],  # max_batch 3
                       ["seeded"],  # a seeded sample runs alone
                       ["sampled", "sampled 2"],
                       ["greedy 4", "long"],  # "room" does not fit: 200 + 100 > 256
                       ["seeded 2"],
                       ["stop, other limit"],  # with stop strings, only rows of the same limit
                       ["stop 2"],
                       ["room"],
                       ["sampled, other top_p"]]
    # Every waiting job cancelled between the worker's wait and its take (cancel() runs on the event loop without
    # the lock): an empty batch, not an IndexError that would end the worker thread and hang every later request.
    batcher.pending = [job("left"), job("left too")]
    for j in batcher.pending:
        j.cancelled = True
    assert batcher._take() == [] and batcher.pending == []


def test_text_decoder_decodes_a_window_not_the_whole_answer(tokenizer):
    """Streaming n tokens decodes O(n) tokens in all (it decoded the whole answer at each token: O(n^2))."""
    text = " one two three four five six seven eight nine ten " * 20
    ids = tokenizer.encode(text, continuation=True)
    decoded = []

    class Counting:
        def decode(self, ids, continuation=False):
            decoded.append(len(ids))
            return tokenizer.decode(ids, continuation=continuation)

    decoder = TextStream(Counting(), strip_leading=True)
    pieces = [decoder.push([i]) for i in ids] + [decoder.push([], final=True)]
    assert "".join(pieces) == tokenizer.decode(ids, continuation=True).lstrip() == decoder.text()
    assert len(ids) > 200 and sum(decoded) < 6 * len(ids) + 20, (len(ids), sum(decoded))
