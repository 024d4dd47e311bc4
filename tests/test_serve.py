"""`hire serve`: the OpenAI-compatible API. In process on a tiny model (errors, text pieces), and
as a live server on 127.0.0.1 talked to with the official ``openai`` client (SmolLM2: greedy text
equal to `hire generate --dense`, concurrent streams, disconnects, many requests, SIGTERM)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from hire.serve.protocol import APIError, ChatRequest, CompletionRequest
from hire.serve.text import TextStream

HIRE = str(Path(sys.executable).with_name("hire"))


# --- text pieces and request checks --------------------------------------------------------------
class Pieces:
    """A tokenizer whose token i decodes to PIECES[i] (3 and 4 are the two halves of one character)."""

    PIECES = ["Hello", " wor", "ld", b"\xc3".decode("latin-1"), "", "!", " END", " more"]

    def decode(self, ids, skip_special_tokens=True):
        raw = "".join(self.PIECES[i] for i in ids)
        # tokens 3 then 4 make "é": alone, 3 is an incomplete character
        return raw.replace(self.PIECES[3], "\ufffd") if ids[-1] == 3 else raw.replace(self.PIECES[3], "é")


def test_text_pieces_hold_back_partial_characters_and_possible_stops():
    s = TextStream(Pieces(), ["END"])
    got = [s.add(t) for t in (0, 1, 2, 3, 4, 5)]
    assert "".join(got) + s.flush() == "Hello worldé!"
    assert got[3] == ""  # half a character is not sent
    s = TextStream(Pieces(), [" wor", "xyz"])
    assert s.add(0) == "He" and s.add(1) == "llo" and s.stopped  # "llo" held back until the stop appeared
    s = TextStream(Pieces(), ["END"])
    assert "".join(s.add(t) for t in (0, 6, 7)) == "Hello " and s.stopped and s.flush() == ""


@pytest.mark.parametrize("body, param", [
    ({"n": 2}, "n"), ({"max_tokens": 0}, "max_tokens"), ({"echo": True}, "echo"),
    ({"presence_penalty": 0.5}, "presence_penalty"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": ["a", "b"]}, "prompt"), ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_unsupported_completion_settings_are_named(body, param):
    req = CompletionRequest(**{"model": "m", "prompt": "x", **body})
    with pytest.raises(APIError) as err:
        req.check()
    assert err.value.status == 400 and err.value.param == param


def test_chat_takes_max_completion_tokens_and_top_logprobs_needs_logprobs():
    req = ChatRequest(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                      max_completion_tokens=5)
    req.check()
    assert req.max_tokens == 5 and req.messages[0].plain() == {"role": "user", "content": "hi"}
    with pytest.raises(APIError, match="top_logprobs needs logprobs=true"):
        ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], top_logprobs=2).check()
    ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=20).check()


# --- the app in process, on a tiny model ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from hire.serve import create_app, load_service

    path = _tiny_dir(tmp_path_factory.mktemp("tiny"))
    service = load_service(path, None, slots=2, context=32, name="tiny", progress=False)
    with TestClient(create_app(service)) as client:
        client.hire_service = service
        yield client


def _tiny_dir(path: Path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tiny_models import make

    vocab = {"[UNK]": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate("the and of to a i you my in that".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    make("llama").save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return str(path)


BAD = [
    (b"{not json", 400, None),
    (json.dumps({"model": "tiny", "prompt": "the", "foo": 1}).encode(), 400, "foo"),
    (json.dumps({"model": "tiny", "prompt": "the", "max_tokens": "many"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "the", "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "the " * 40}).encode(), 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": "the", "max_tokens": 32}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "other", "prompt": "the"}).encode(), 404, "model"),
    (json.dumps({"model": "tiny", "prompt": "the", "logprobs": 6}).encode(), 400, "logprobs"),  # OpenAI's bound: 5
    (json.dumps({"prompt": "the"}).encode(), 400, "model"),
    (json.dumps(["a list"]).encode(), 400, None),
]


@pytest.mark.parametrize("body, status, param", BAD)
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(tiny_client, body, status, param):
    r = tiny_client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    ok = tiny_client.post("/v1/completions", json={"model": "tiny", "prompt": "the and", "max_tokens": 3,
                                                   "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_routes_and_usage_in_process(tiny_client):
    assert tiny_client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert tiny_client.get("/nowhere").json()["error"]["type"] == "not_found_error"
    r = tiny_client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "a"}],
                                                       "max_tokens": 4, "temperature": 0}).json()
    assert r["object"] == "chat.completion" and r["choices"][0]["message"]["role"] == "assistant"
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
    lines = tiny_client.post("/v1/completions", json={"model": "tiny", "prompt": "the", "max_tokens": 4, "stream": True,
                                                      "stream_options": {"include_usage": True}}).text.split("\n\n")
    assert lines[-2] == "data: [DONE]" and json.loads(lines[-3][6:])["usage"]["completion_tokens"] == 4
    health = tiny_client.get("/health").json()
    assert health["status"] == "ok" and health["slots"] == 2 and health["active"] == 0


def test_nulls_and_the_fields_openai_accepts_are_taken(tiny_client):
    """A null is the field's default; metadata, store, user, service_tier, parallel_tool_calls are accepted and
    ignored, as are the settings that ask for what the server does anyway (text output, no tools)."""
    chat = {"model": "tiny", "messages": [{"role": "system", "content": "the"}, {"role": "user", "content": "a"},
                                          {"role": "assistant", "content": None}, {"role": "user", "content": "i"}],
            "max_tokens": 3, "temperature": None, "top_p": None, "seed": None, "stop": None, "n": None,
            "metadata": {"run": "1"}, "store": False, "user": "u", "service_tier": "auto", "parallel_tool_calls": True,
            "response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "logprobs": None}
    r = tiny_client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200, r.text
    r = tiny_client.post("/v1/completions", json={"model": "tiny", "prompt": "the", "max_tokens": None, "temperature": 0,
                                                  "echo": None, "suffix": None, "user": "u", "metadata": None})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0"),
    ({"messages": [{"role": "user", "content": "a", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages.0"),
    ({"temperatur": 0.5}, "temperatur"),  # a typo is still refused
])
def test_what_the_server_would_silently_break_is_refused_by_name(tiny_client, extra, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_tokens": 2, **extra}
    r = tiny_client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def _probabilities_are_consistent(entries: list[dict], top: int) -> None:
    for e in entries:
        alternatives = [a["logprob"] for a in e["top_logprobs"]]
        assert len(alternatives) == top and alternatives == sorted(alternatives, reverse=True)
        assert e["logprob"] <= 0 and sum(math.exp(lp) for lp in alternatives) <= 1 + 1e-5
        assert e["logprob"] == pytest.approx(alternatives[0], abs=1e-6)  # greedy: the most likely token
        assert e["top_logprobs"][0]["token"] == e["token"] and bytes(e["bytes"]).decode(errors="replace") == e["token"]


def test_logprobs_chat_and_completions_streamed_and_not(tiny_client):
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "the and"}], "max_tokens": 6, "temperature": 0,
            "logprobs": True, "top_logprobs": 3}
    r = tiny_client.post("/v1/chat/completions", json=chat).json()
    choice = r["choices"][0]
    entries = choice["logprobs"]["content"]
    assert len(entries) == r["usage"]["completion_tokens"] and choice["logprobs"]["refusal"] is None
    _probabilities_are_consistent(entries, 3)
    lines = tiny_client.post("/v1/chat/completions", json={**chat, "stream": True}).text.split("\n\n")
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    streamed = [e for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == entries
    plain = tiny_client.post("/v1/chat/completions", json={**chat, "logprobs": False, "top_logprobs": None}).json()
    assert plain["choices"][0]["logprobs"] is None and plain["choices"][0]["message"] == choice["message"]

    done = {"model": "tiny", "prompt": "the and", "max_tokens": 5, "temperature": 0, "logprobs": 2}
    r = tiny_client.post("/v1/completions", json=done).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == r["usage"]["completion_tokens"]
    assert all(len(t) == 2 and max(t.values()) == pytest.approx(v, abs=1e-6)
               for t, v in zip(lp["top_logprobs"], lp["token_logprobs"]))
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    lines = tiny_client.post("/v1/completions", json={**done, "stream": True}).text.split("\n\n")
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert [v for c in chunks if c["choices"][0]["logprobs"] for v in c["choices"][0]["logprobs"]["token_logprobs"]] \
        == lp["token_logprobs"]


def test_metrics_count_requests_tokens_and_the_decode_loop(tiny_client):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        r = tiny_client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return {s.name + str(sorted(s.labels.items())): s.value
                for family in text_string_to_metric_families(r.text) for s in family.samples}

    before = scrape()
    body = {"model": "tiny", "prompt": "the and", "max_tokens": 5, "temperature": 0, "stop": ["never"]}
    tokens = tiny_client.post("/v1/completions", json=body).json()["usage"]["completion_tokens"]
    assert tiny_client.post("/v1/completions", json={**body, "n": 2}).status_code == 400
    after = scrape()

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew("hire_http_requests_total[('route', '/v1/completions'), ('status', '200')]") == 1
    assert grew("hire_http_requests_total[('route', '/v1/completions'), ('status', '400')]") == 1
    assert grew("hire_time_to_first_token_seconds_count[]") == 1
    assert grew("hire_inter_token_latency_seconds_count[]") == tokens - 1
    assert grew("hire_decode_step_tokens_total[]") >= tokens - 1 and grew("hire_prefills_total[]") == 1
    assert after["hire_decode_loop_up[]"] == 1 and after["hire_slots[]"] == 2
    assert after["hire_requests_running[]"] == 0 and after["hire_requests_waiting[]"] == 0


def test_an_api_key_guards_every_route_but_health(tmp_path):
    from fastapi.testclient import TestClient

    from hire.serve import create_app, load_service

    service = load_service(_tiny_dir(tmp_path), None, slots=1, context=32, name="tiny", progress=False)
    body = {"model": "tiny", "prompt": "the", "max_tokens": 2}
    with TestClient(create_app(service, api_key="s3cret")) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for r in (client.post("/v1/completions", json=body, headers=headers), client.get("/v1/models", headers=headers),
                      client.get("/metrics", headers=headers)):
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        ok = {"Authorization": "Bearer s3cret"}
        assert client.post("/v1/completions", json=body, headers=ok).status_code == 200
        assert client.get("/v1/models", headers=ok).status_code == 200
        assert client.get("/health").status_code == 200  # for probes, without the key


def test_a_full_queue_answers_429_with_retry_after(tmp_path):
    """One slot and one waiting place: while a slow request runs and a second waits, a third is turned away
    with OpenAI's rate-limit error and a Retry-After; the first two complete."""
    from fastapi.testclient import TestClient

    from hire.serve import create_app, load_service

    service = load_service(_tiny_dir(tmp_path), None, slots=1, context=32, name="tiny", progress=False, max_waiting=1)
    step = service.scheduler.decoder.step

    def slow(*args, **kwargs):
        time.sleep(0.05)
        return step(*args, **kwargs)

    service.scheduler.decoder.step = slow
    body = {"model": "tiny", "prompt": "the", "max_tokens": 20, "temperature": 0}
    with TestClient(create_app(service)) as client, ThreadPoolExecutor(2) as pool:
        running = [pool.submit(client.post, "/v1/completions", json=body)]
        while service.scheduler.load()["active"] < 1:
            time.sleep(0.01)
        running.append(pool.submit(client.post, "/v1/completions", json=body))
        while service.scheduler.load()["waiting"] < 1:
            time.sleep(0.01)
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error" and "--max-waiting 1" in r.json()["error"]["message"]
        assert [f.result().status_code for f in running] == [200, 200]
    # with no waiting place, a request that finds its slot free is served
    service = load_service(_tiny_dir(tmp_path / "zero"), None, slots=1, context=32, name="tiny", progress=False,
                           max_waiting=0)
    with TestClient(create_app(service)) as client:
        assert client.post("/v1/completions", json={**body, "max_tokens": 2}).status_code == 200


def test_a_non_streamed_request_whose_client_leaves_frees_its_slot(tmp_path):
    """A client that gives up on a non-streamed request (its timeout) has it cancelled: the slot is freed
    before the request would have ended, and the server keeps serving."""
    import uvicorn

    from hire.serve import create_app, load_service

    service = load_service(_tiny_dir(tmp_path), None, slots=1, context=32, name="tiny", progress=False)
    step = service.scheduler.decoder.step

    def slow(*args, **kwargs):  # 25 tokens: 5 s
        time.sleep(0.2)
        return step(*args, **kwargs)

    service.scheduler.decoder.step = slow
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        while not server.started:
            time.sleep(0.05)
        body = {"model": "tiny", "prompt": "the", "max_tokens": 25, "temperature": 0, "stop": ["never"]}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=body, timeout=0.6)
        deadline = time.time() + 3  # well before the request's own 5 s
        while service.scheduler.load()["active"] and time.time() < deadline:
            time.sleep(0.05)
        assert service.scheduler.load()["active"] == 0 and service.scheduler.stats.summary()["cancelled"] == 1
        service.scheduler.decoder.step = step
        ok = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_failed_decode_loop_answers_503_on_health_and_serve_exits_with_an_error(tmp_path):
    from fastapi.testclient import TestClient

    from hire.serve import create_app, load_service, serve
    from hire.serve.service import DecodeLoopFailed

    service = load_service(_tiny_dir(tmp_path), None, slots=1, context=32, name="tiny", progress=False)

    def broken(*args, **kwargs):
        raise RuntimeError("a kernel fault")

    service.scheduler.decoder.step = broken
    with TestClient(create_app(service)) as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "the", "max_tokens": 4})
        assert r.status_code == 500 and "a kernel fault" in r.json()["error"]["message"]
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "a kernel fault" in health.json()["error"]
    # under `hire serve` the loop runs in the main thread: when it dies, the server shuts down and serve raises
    service = load_service(_tiny_dir(tmp_path / "again"), None, slots=1, context=32, name="tiny", progress=False)
    service.scheduler.decoder.step = broken
    port = _free_port()

    def request():
        import urllib.request

        for _ in range(100):
            try:
                urllib.request.urlopen(urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(
                        {"model": "tiny", "prompt": "the", "max_tokens": 4}).encode(),
                    headers={"Content-Type": "application/json"}), timeout=10)
            except Exception as err:  # noqa: BLE001 - refused until it listens, then the 500
                if getattr(err, "code", None) == 500:
                    return
                time.sleep(0.1)

    threading.Thread(target=request, daemon=True).start()
    with pytest.raises(DecodeLoopFailed, match="a kernel fault"):
        serve(service, port=port, log_level="warning")


# --- a live server, the openai client ------------------------------------------------------------
MODEL = "smollm2-135m"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three laws of thermodynamics", "import numpy as np\n", "My favourite recipe for bread",
           "In the year 1492,", "Q: What is the boiling point of water?\nA:"]
EXACT_HEAD = ["--head-proxy", "int8", "--head-candidates", "49152", "--dense-above", "1"]  # every k = n


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen([HIRE, "serve", "--model", MODEL, "--port", str(self.port), *args],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while time.time() < deadline:
            assert self.proc.poll() is None, log.read_text()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(1)
        raise AssertionError("the server did not start:\n" + log.read_text())

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=300)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(*EXACT_HEAD, "--slots", "8", "--context", "512", log=tmp_path_factory.mktemp("serve") / "log")
    yield s
    s.stop()


def _complete(client, prompt: str, n: int = 24, **kw) -> str:
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, **kw).choices[0].text


def _stream(client, prompt: str, n: int = 24) -> str:
    parts = []
    for chunk in client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stream=True):
        parts.append(chunk.choices[0].text)
    return "".join(parts)


@pytest.mark.slow
def test_greedy_text_equals_hire_generate_dense(server):
    from hire.generate import generate_text

    client = server.client()
    for prompt in PROMPTS[:2]:
        want = generate_text(MODEL, None, prompt, max_new_tokens=24, progress=False)["text"]
        assert _complete(client, prompt) == want
        assert _stream(client, prompt) == want


def _dense_log_probs(prompt: str, n: int) -> tuple[list[int], list[float], list[list[float]]]:
    """SmolLM2 on its codes, the dense engine as hire serve runs it (float16 hidden state into the head),
    greedy: each new token, its log_softmax and the top 5."""
    from hire.engine import Engine
    from hire.models.load import gguf_source
    from hire.quant import load_quantized

    model, tokenizer, _ = load_quantized(gguf_source(MODEL))
    ids = torch.tensor(tokenizer(prompt).input_ids)
    engine = Engine(model, None, dtype=torch.float16, max_seq_len=ids.numel() + n + 1)
    hidden = engine.prefill(ids)  # as the server prefills (batched native steps)
    tokens, chosen, tops = [], [], []
    for i in range(n):
        lp = torch.log_softmax(engine.logits(hidden, hire=False)[0][0].float(), -1)
        token = int(lp.argmax())
        tokens.append(token)
        chosen.append(float(lp[token]))
        tops.append(lp.topk(5).values.tolist())
        hidden = engine.forward(torch.tensor([token]), ids.numel() + i, hire=False)
    return tokens, chosen, tops


@pytest.mark.slow
def test_logprobs_with_every_row_a_candidate_equal_the_dense_model_s(server):
    """k = n (EXACT_HEAD): each greedy token's logprob and the top 5 are the dense engine's, to 1e-3."""
    client = server.client()
    prompt, n = PROMPTS[0], 8
    want_tokens, want, want_top = _dense_log_probs(prompt, n)
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, logprobs=5).choices[0]
    assert got.logprobs.token_logprobs == pytest.approx(want, abs=1e-3)
    assert [sorted(t.values(), reverse=True) for t in got.logprobs.top_logprobs] == [
        pytest.approx(t, abs=1e-3) for t in want_top]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=n,
                                          temperature=0, logprobs=True, top_logprobs=3)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == chat.usage.completion_tokens and all(len(e.top_logprobs) == 3 for e in entries)
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-6) for e in entries)  # greedy
    assert all(sum(math.exp(a.logprob) for a in e.top_logprobs) <= 1 + 1e-5 for e in entries)
    assert "".join(bytes(b for e in entries for b in e.bytes).decode(errors="replace")) == \
        chat.choices[0].message.content


@pytest.mark.slow
def test_chat_streamed_and_not(server):
    client = server.client()
    messages = [{"role": "user", "content": "Name a colour."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 20 and whole.usage.prompt_tokens > 5
    parts = [c.choices[0].delta.content or "" for c in
             client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True)]
    assert "".join(parts) == text
    assert client.models.list().data[0].id == MODEL


@pytest.mark.slow
def test_eight_concurrent_streams_get_their_own_complete_answers(server):
    client = server.client()
    alone = [_complete(client, p) for p in PROMPTS]
    before = server.health()["loop"]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: _stream(server.client(), p), PROMPTS))
    assert together == alone
    after = server.health()["loop"]
    shared = (after["steps"] - before["steps"], after["mean_batch"])
    assert after["steps"] - before["steps"] < 8 * 23, shared  # steps were shared, not one sequence at a time


@pytest.mark.slow
def test_errors_are_4xx_openai_bodies_and_the_server_keeps_serving(server):
    import openai

    client = server.client()
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument supplied: foo"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body={"foo": 1})
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="word " * 600, max_tokens=4)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=4)
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": ', timeout=10,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert _complete(client, PROMPTS[0], 4)


@pytest.mark.slow
def test_a_client_that_disconnects_frees_its_slot(server):
    body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few tokens in, then the client goes away
    assert any(line.startswith("data: ") for line in got)
    deadline = time.time() + 30
    while server.health()["active"] and time.time() < deadline:
        time.sleep(0.1)
    assert server.health()["active"] == 0
    assert server.health()["loop"]["cancelled"] >= 1
    assert _complete(server.client(), PROMPTS[0], 8)


@pytest.mark.slow
def test_two_hundred_requests_do_not_leak(server):
    client = server.client()
    for _ in range(20):  # warm: allocator pools and caches settle
        _complete(client, PROMPTS[1], 4)
    before = server.health()["rss_mb"]
    for i in range(200):
        _complete(client, PROMPTS[i % len(PROMPTS)], 4)
    after = server.health()["rss_mb"]
    print(f"resident memory: {before:.1f} MB before, {after:.1f} MB after 200 requests")
    assert after - before < 32, (before, after)


@pytest.mark.slow
def test_sigterm_finishes_the_requests_in_flight_and_exits(tmp_path):
    s = Server(*EXACT_HEAD, "--slots", "2", "--context", "256", log=tmp_path / "log")
    result = {}

    def client():
        result["text"] = _stream(s.client(), PROMPTS[0], 48)

    t = threading.Thread(target=client)
    t.start()
    deadline = time.time() + 60
    while not s.health()["active"] and time.time() < deadline:
        time.sleep(0.05)
    s.proc.send_signal(signal.SIGTERM)
    # uvicorn re-raises the signal once shut down, so the exit status says how the server ended
    assert s.proc.wait(120) in (0, -signal.SIGTERM)
    t.join(60)
    assert result.get("text"), s.log.read_text()  # the whole answer, not a broken stream
    log = s.log.read_text()
    assert "Application shutdown complete" in log and "Traceback" not in log
    with pytest.raises(httpx.HTTPError):
        httpx.get(s.url + "/health", timeout=2)


def test_serve_help_and_a_missing_model(tmp_path):
    out = subprocess.run([HIRE, "serve", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "/v1/chat/completions" in out.stdout
    out = subprocess.run([HIRE, "serve", "--model", str(tmp_path / "none.gguf"), "--dense"], capture_output=True,
                         text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and "hire: error:" in out.stderr and "Traceback" not in out.stderr


def test_a_first_start_serves_dense_at_once_and_says_why(tmp_path, monkeypatch):
    """Without --calibrate, a model whose head is not fitted yet is served with the dense head at once
    (its info says why: /health shows it); fitted (--calibrate), the next start finds it cached."""
    from hire.calibrate import auto as auto_mod
    from hire.calibrate import prepare as prepare_mod
    from hire.calibrate import proxy_cache
    from hire.config import HeadConfig, HiReConfig
    from hire.serve import load_service

    def fresh(*parts):  # a cache with nothing fitted (the kernels and the corpus stay where they are)
        path = tmp_path.joinpath("cache", *parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    for module in (auto_mod, prepare_mod, proxy_cache):
        monkeypatch.setattr(module, "cache_dir", fresh)
    monkeypatch.setattr(auto_mod, "measure_head_times",
                        lambda heads, hidden: {name: 2.0 if name == "dense" else 1.0 for name in heads})
    path = _tiny_dir(tmp_path / "tiny")
    config = HiReConfig(head=HeadConfig(k=4, auto=True, proxy="lowrank"))
    kw = dict(slots=1, context=32, seq_len=32, calib_windows=8, progress=False)
    first = load_service(path, config, fit=False, **kw)
    assert "not chosen for this model yet" in first.info["head_pending"]
    assert not first.info["config"]["head"]["enabled"] and first.info["kernels"].get("head") is None
    fitted = load_service(path, config, fit=True, **kw)
    assert "head_pending" not in fitted.info and fitted.info["config"]["head"]["enabled"]
    again = load_service(path, config, fit=False, **kw)
    assert "head_pending" not in again.info and again.info["config"] == fitted.info["config"]


def _fresh_cache(tmp_path: Path, monkeypatch) -> Path:
    """$HIRE_CACHE in tmp_path (for this process and the children it starts) with nothing fitted; the
    built kernels and the corpus linked in from the real cache."""
    from hire.paths import cache_root

    real, cache = cache_root(), tmp_path / "cache"
    cache.mkdir()
    for part in ("native", "corpus"):
        if (real / part).exists():
            (cache / part).symlink_to(real / part)
    monkeypatch.setenv("HIRE_CACHE", str(cache))
    return cache


def test_a_first_start_switches_to_hire_once_the_background_fit_is_done(tmp_path, monkeypatch):
    """With background_fit, a model whose head proxy is not fitted yet is served dense at once while a
    child process fits it; the decode loop then switches its head to HiRE between two steps (its info
    says so), and the next start finds the proxy cached."""
    from fastapi.testclient import TestClient

    from hire.config import HeadConfig, HiReConfig
    from hire.serve import create_app, load_service

    _fresh_cache(tmp_path, monkeypatch)
    path = _tiny_dir(tmp_path / "tiny")
    config = HiReConfig(head=HeadConfig(k=4, candidates=8, proxy="lowrank", rank=8))
    kw = dict(slots=1, context=32, seq_len=32, calib_windows=8, progress=False, name="tiny")
    service = load_service(path, config, fit=False, background_fit=True, **kw)
    assert "not fitted for this model yet" in service.info["head_pending"] and service.background is not None
    engine = service.scheduler.decoder.engine
    ask = {"model": "tiny", "prompt": "the and of", "max_tokens": 6, "temperature": 0}
    with TestClient(create_app(service)) as client:
        dense = client.post("/v1/completions", json=ask).json()["choices"][0]["text"]
        assert engine.head is None
        service.background.nice = 0  # (the server's own priority: tests may share the cores with others)
        service.background.start()
        service.background.wait(300)
        deadline = time.monotonic() + 30  # the loop applies the switch at its next turn
        while "head_pending" in service.info and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "head_pending" not in service.info, service.info
        assert engine.head is not None and service.info["config"]["head"]["enabled"]
        assert service.info["kernels"]["head"] and service.info["head_switched_after_s"] >= 0
        health = client.get("/health").json()
        assert health["config"]["head"]["rank"] == 8 and "head_pending" not in health
        hire = client.post("/v1/completions", json=ask).json()["choices"][0]["text"]
    service.background.stop()
    assert isinstance(hire, str) and isinstance(dense, str)
    again = load_service(path, config, fit=False, **kw)
    assert "head_pending" not in again.info and again.info["config"]["head"]["rank"] == 8


def test_a_fitted_head_that_does_not_fit_the_engine_leaves_the_server_dense(tmp_path, monkeypatch):
    """The switch itself failing (a proxy of another rank than its config says) leaves the loop serving
    with the dense head and says why."""
    from fastapi.testclient import TestClient

    from hire.config import HeadConfig, HiReConfig
    from hire.proxies import LowRankProxy
    from hire.serve import create_app, load_service
    from hire.serve.service import _switch_head

    _fresh_cache(tmp_path, monkeypatch)
    config = HiReConfig(head=HeadConfig(k=4, candidates=8, proxy="lowrank", rank=8))
    service = load_service(_tiny_dir(tmp_path / "tiny"), config, fit=False, slots=1, context=32, seq_len=32,
                           calib_windows=8, progress=False, name="tiny")
    engine = service.scheduler.decoder.engine
    vocab, width = engine.head_weight.shape
    wrong = LowRankProxy(torch.randn(vocab, 4).half(), torch.randn(4, width).half())  # rank 4, not 8
    with TestClient(create_app(service)) as client:
        _switch_head(service, config, wrong)
        deadline = time.monotonic() + 30
        while "head_dense" not in service.info and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "switching to the fitted head failed" in service.info["head_dense"] and "rank 4" in service.info["head_dense"]
        assert engine.head is None and "head_pending" not in service.info
        ask = {"model": "tiny", "prompt": "the and of", "max_tokens": 3, "temperature": 0}
        assert client.post("/v1/completions", json=ask).status_code == 200


def test_a_background_fit_that_fails_leaves_the_server_dense_and_says_why(tmp_path, monkeypatch):
    from hire.config import HeadConfig, HiReConfig
    from hire.serve.background import BackgroundHead

    _fresh_cache(tmp_path, monkeypatch)
    got: dict = {}
    background = BackgroundHead(str(tmp_path / "missing.gguf"), HiReConfig(head=HeadConfig(proxy="lowrank")),
                                fingerprint="x", switch=lambda *a: got.setdefault("switch", a),
                                failed=lambda reason: got.setdefault("failed", reason), nice=0)
    background.start()
    background.wait(120)
    background.stop()
    assert "switch" not in got and "the background fit failed (exit status 1)" in got["failed"]
    assert "missing.gguf" in got["failed"]  # the child's own error's last lines


def test_a_server_that_stops_ends_its_background_fit(tmp_path, monkeypatch):
    """A server shut down mid-fit ends the child, and nothing is switched or reported after that."""
    from hire.config import HeadConfig, HiReConfig
    from hire.serve.background import BackgroundHead

    _fresh_cache(tmp_path, monkeypatch)
    got: dict = {}
    background = BackgroundHead(_tiny_dir(tmp_path / "tiny"), HiReConfig(head=HeadConfig(k=4, candidates=8,
                                                                                       proxy="lowrank", rank=8)),
                                fingerprint="x", switch=lambda *a: got.setdefault("switch", a),
                                failed=lambda reason: got.setdefault("failed", reason), seq_len=32, calib_windows=8)
    background.start()
    time.sleep(0.5)
    assert background.process.poll() is None  # still starting up: its imports alone take seconds
    background.stop()
    assert background.process.returncode == -signal.SIGTERM and not got


# --- structured output (hire.serve.grammar) ------------------------------------------------------
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "languages": {"type": "array", "items": {"type": "string", "maxLength": 20},
                                                         "maxItems": 3}},
          "required": ["name", "age", "languages"], "additionalProperties": False}


def test_response_formats_are_read_or_refused_by_name():
    from hire.serve.grammar import GrammarError, schema_of

    assert schema_of({"type": "text"}) is None
    assert schema_of({"type": "json_object"}) == {"type": "object"}
    assert schema_of({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}) == PERSON
    with pytest.raises(GrammarError, match="needs"):
        schema_of({"type": "json_schema", "json_schema": "p"})
    with pytest.raises(GrammarError, match="not one of"):
        schema_of({"type": "yaml"})


def test_a_grammar_the_tokenizer_cannot_spell_fails_its_request_only(tiny_client):
    """The tiny word-level tokenizer has no '{': the request gets an error, the server keeps serving; warming
    the grammar engine at start (hire serve does, on a thread) does not raise for it."""
    tiny_client.hire_service.warm_grammars()  # the tokenizer has no decoder: nothing to warm, no error
    r = tiny_client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "a"}],
                                                       "max_tokens": 4, "response_format": {"type": "json_object"}})
    assert r.status_code in (400, 500) and r.json()["error"]["message"], r.text
    ok = tiny_client.post("/v1/completions", json={"model": "tiny", "prompt": "the", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200


def _structured_client(model: str, head: list[str]):
    """hire serve's app in process over a packaged model, with ``head`` flags (HiRE or dense)."""
    from fastapi.testclient import TestClient

    from hire.commands._args import build_config
    from hire.cli import make_parser
    from hire.recommended import quantized_config
    from hire.serve import create_app, load_service

    args = make_parser().parse_args(["serve", "--model", model, *head])
    config = None if args.dense else build_config(args)
    service = load_service(model, config, slots=2, context=512, name=model, progress=False, dense_batch=None)
    assert config is None or service.info["hire"]
    return TestClient(create_app(service))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_json_schema_output_validates_streamed_and_not_hire_and_dense(model):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    messages = [{"role": "user", "content": "Describe a famous scientist as JSON with name, age and languages."}]
    outputs = {}
    for mode, head in (("hire", ["--head-proxy", "int8", "--head-candidates", "4096"]), ("dense", ["--dense"])):
        with _structured_client(model, head) as client:
            body = {"model": model, "messages": messages, "max_tokens": 120, "temperature": 0, "response_format": fmt}
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "stop", choice  # the value completed before max_tokens
            value = json.loads(choice["message"]["content"])
            jsonschema.validate(value, PERSON)
            lines = client.post("/v1/chat/completions", json={**body, "stream": True}).text.split("\n\n")
            chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
            streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
            assert streamed == choice["message"]["content"]
            sampled = client.post("/v1/chat/completions", json={**body, "temperature": 0.8, "seed": 3}).json()
            jsonschema.validate(json.loads(sampled["choices"][0]["message"]["content"]), PERSON)
            anything = client.post("/v1/chat/completions", json={**body, "max_tokens": 60,
                                                                  "response_format": {"type": "json_object"}}).json()
            choice = anything["choices"][0]  # an object of any keys: complete, or cut at max_tokens
            if choice["finish_reason"] == "stop":
                assert isinstance(json.loads(choice["message"]["content"]), dict)
            else:
                assert choice["finish_reason"] == "length" and choice["message"]["content"].startswith("{")
            outputs[mode] = value
    assert set(outputs["hire"]) == set(outputs["dense"]) == {"name", "age", "languages"}


@pytest.mark.slow
def test_an_invalid_schema_is_a_400_naming_response_format():
    with _structured_client("smollm2-135m", ["--dense"]) as client:
        r = client.post("/v1/chat/completions", json={
            "model": "smollm2-135m", "messages": [{"role": "user", "content": "a"}], "max_tokens": 4,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integr"}}}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text


# --- tools (hire.serve.tools) --------------------------------------------------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


def test_tool_text_gives_out_content_and_holds_the_calls():
    from hire.serve.tools import ToolText

    t = ToolText({"get_weather"})
    pieces = ["Sure", ", checking. <to", 'ol_call>\n{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}\n</tool_call>']
    assert [t.add(p) for p in pieces] == ["Sure", ", checking. ", "", ""]
    rest, calls = t.end()
    assert rest == "" and len(calls) == 1 and calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    t = ToolText({"get_weather"})  # not a call: an unknown name, or a "<" that starts no call
    assert "".join(t.add(p) for p in ["a <b", " and <t", "ea>"]) == "a <b and <tea>"
    t.add('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>')
    assert t.end() == ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', [])


def test_tools_and_their_answers_reach_a_template_without_tools():
    from hire.serve.tools import prompt_text

    class NoTemplate:  # hire.data.chat_text's fallback: "Role: content" lines
        chat_template = None

    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "-3 C, snow"}]
    text = prompt_text(NoTemplate(), messages, [WEATHER["function"]])
    assert text.startswith("System: # Tools") and json.dumps(WEATHER) in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>' in text
    assert "User: <tool_response>\n-3 C, snow\n</tool_response>" in text and text.endswith("Assistant:")


def test_a_template_that_renders_tools_gets_them_and_calls_as_objects(tmp_path):
    from transformers import AutoTokenizer

    from hire.serve.tools import prompt_text

    path = _tiny_dir(tmp_path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = ("{% for t in tools or [] %}[tool {{ t.function.name }}]{% endfor %}{% for m in messages %}"
                         "<{{ m.role }}>{{ m.content or '' }}{% for c in m.tool_calls or [] %}"
                         "{{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}{% endfor %}<assistant>")
    text = prompt_text(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c", "content": "cold"}], [WEATHER["function"]])
    assert text == "[tool get_weather]<user>hi<assistant>get_weather(Oslo)<tool>cold<assistant>"


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": [{"role": "tool", "content": "1"}]}, "messages.0"),  # no tool_call_id
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_tool_requests_are_named(tiny_client, extra, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_tokens": 2, **extra}
    r = tiny_client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def _check_call(call, name: str = "get_weather") -> dict:
    import jsonschema

    assert call.type == "function" and call.id.startswith("call_") and call.function.name == name
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    return args


@pytest.mark.slow
def test_a_tool_call_round_trip_with_the_openai_client(server):
    client = server.client()
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice=choice,
                                           parallel_tool_calls=False, max_tokens=60, temperature=0)
        assert r.choices[0].finish_reason == "tool_calls", r
        calls = r.choices[0].message.tool_calls
        assert len(calls) == 1
        args = _check_call(calls[0])
    streamed = list(client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required",
                                                   parallel_tool_calls=False, max_tokens=60, temperature=0,
                                                   stream=True))
    deltas = [d for c in streamed if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert len(deltas) == 1 and json.loads(deltas[0].function.arguments) == args
    assert streamed[-1].choices[0].finish_reason == "tool_calls"
    answer = client.chat.completions.create(model=MODEL, max_tokens=24, temperature=0, tools=[WEATHER], messages=[
        *messages, r.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temperature": 14, "sky": "cloudy"}'}])
    assert answer.choices[0].message.content and answer.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.slow
def test_langchain_openai_structured_output_and_tools(server):
    """A second client library: langchain-openai's ChatOpenAI against the live server."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="unused", temperature=0, max_tokens=80,
                     max_retries=0)
    assert llm.invoke("The capital of France is").content
    person = llm.with_structured_output({"title": "person", "type": "object", "properties": PERSON["properties"],
                                         "required": PERSON["required"], "additionalProperties": False},
                                        method="json_schema")
    value = person.invoke("Describe a famous scientist.")
    import jsonschema

    jsonschema.validate(value, PERSON)
    bound = llm.bind_tools([WEATHER], tool_choice="get_weather", parallel_tool_calls=False)
    question = HumanMessage("What is the weather in Paris?")
    reply = bound.invoke([question])
    assert len(reply.tool_calls) == 1 and reply.tool_calls[0]["name"] == "get_weather"
    final = llm.bind_tools([WEATHER]).invoke([question, reply, ToolMessage('{"temperature": 14}',
                                                                           tool_call_id=reply.tool_calls[0]["id"])])
    assert isinstance(final.content, str)


@pytest.mark.slow
def test_json_schema_through_the_openai_client(server):
    import jsonschema

    client = server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    messages = [{"role": "user", "content": "Describe a famous scientist."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=120, temperature=0, response_format=fmt)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=120, temperature=0, response_format=fmt, stream=True) if c.choices]
    assert "".join(parts) == r.choices[0].message.content


@pytest.mark.slow
def test_api_key_and_a_full_queue_through_the_openai_client(tmp_path):
    """A live server with --api-key, one slot and no waiting place: the openai client's wrong key is an
    AuthenticationError (401), the right one is served, and a second request while the slot decodes is
    a RateLimitError (429) that names --max-waiting."""
    import openai

    s = Server("--dense", "--api-key", "s3cret", "--slots", "1", "--max-waiting", "0", "--context", "512",
               log=tmp_path / "log")
    try:
        def client(key):
            return openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0, timeout=300)

        with pytest.raises(openai.AuthenticationError):
            client("wrong").completions.create(model=MODEL, prompt="Hello", max_tokens=2)
        good = client("s3cret")
        assert good.completions.create(model=MODEL, prompt="Hello", max_tokens=2).choices[0].text is not None
        stream = good.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=200, temperature=0,
                                         stream=True)
        next(iter(stream))  # the slot is decoding
        with pytest.raises(openai.RateLimitError, match="--max-waiting 0"):
            good.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
        assert sum(1 for _ in stream) > 0
    finally:
        s.stop()
