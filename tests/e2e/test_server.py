"""End-to-end tests of `glassbox serve`: the real server on a free loopback port, driven by
the real `openai` client and by raw HTTP. Bounded in time; every server is stopped with
SIGTERM and must exit 0."""

import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
BIN = os.environ.get("GLASSBOX_BIN", str(ROOT / "target" / "debug" / "glassbox"))
STORIES = str(SHARED / "models" / "stories260K")
STORIES_REF = ", there was a little girl named Lily. She loved to play outside in the p"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args, env=None):
        self.port = free_port()
        kv = [] if "--kv-cache-memory" in args else ["--kv-cache-memory", "256MiB"]
        cmd = [BIN, "serve", "--port", str(self.port), *kv, *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.log = []
        deadline = time.time() + 120
        for line in self.proc.stderr:
            self.log.append(line)
            if line.startswith("ready:"):
                break
            if time.time() > deadline:
                break
        assert any(l.startswith("ready:") for l in self.log), "".join(self.log)
        assert any("tokens fit" in l for l in self.log), "startup must say how many KV tokens fit"
        threading.Thread(target=lambda: [self.log.append(l) for l in self.proc.stderr], daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}"

    def request(self, method, path, body=None, headers=None, raw=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        h = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        text = resp.read().decode("utf-8", "replace")
        conn.close()
        try:
            payload = json.loads(text)
        except ValueError:
            payload = text
        return resp.status, payload, resp

    def metrics(self):
        _, text, _ = self.request("GET", "/metrics")
        out = {}
        for line in text.splitlines():
            m = re.match(r'^(glassbox:[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$', line)
            if m:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
        return out

    def gauge(self, name):
        return next(v for k, v in self.metrics().items() if k.startswith(name + "{"))

    def wait_idle(self, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.gauge("glassbox:num_requests_running") == 0 and self.gauge("glassbox:num_requests_waiting") == 0 and self.gauge("glassbox:kv_cache_blocks_used") == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"engine not idle: {self.metrics()}")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        assert code == 0, f"exit code {code}: {''.join(self.log[-20:])}"


@pytest.fixture(scope="module")
def stories():
    s = Server("--model", STORIES, "--max-model-len", "512")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def smol():
    # The default model (fetched once into the cache by the Rust tests or on first use).
    s = Server("--served-model-name", "smollm2")
    yield s
    s.stop()


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


# --- the openai client -------------------------------------------------------------------

def test_completions_with_openai_client(stories):
    c = client(stories)
    r = c.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=24, temperature=0)
    assert r.choices[0].text == STORIES_REF
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 24, 29)
    chunks = list(c.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=24, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == STORIES_REF
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].choices == []
    # n, stop, logprobs, seed, vLLM extras.
    r = c.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=24, temperature=0, stop=["girl"])
    assert r.choices[0].text == ", there was a little " and r.choices[0].finish_reason == "stop"
    r = c.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=8, n=3, temperature=1.0, seed=7,
                             logprobs=2, extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1})
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2]
    assert all(len(ch.logprobs.tokens) == 8 and len(ch.logprobs.top_logprobs[0]) == 2 for ch in r.choices)
    again = c.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=8, n=3, temperature=1.0, seed=7,
                                 logprobs=2, extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1})
    assert [ch.text for ch in again.choices] == [ch.text for ch in r.choices], "seeded requests repeat"
    models = c.models.list()
    assert [m.id for m in models.data] == ["stories260K"]


def test_chat_with_openai_client(smol):
    c = client(smol)
    r = c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "What is 2+2?"}], temperature=0, max_tokens=30)
    assert r.choices[0].message.content == "The answer to this classic math problem is 4."
    assert r.choices[0].finish_reason == "stop"
    stream = c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "What is 2+2?"}], temperature=0,
                                       max_tokens=30, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "The answer to this classic math problem is 4."
    r = c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0,
                                  logprobs=True, top_logprobs=2)
    assert len(r.choices[0].logprobs.content) == 3 and len(r.choices[0].logprobs.content[0].top_logprobs) == 2


def test_tokenize_detokenize_health_version(stories):
    status, body, _ = stories.request("POST", "/tokenize", {"prompt": "Once upon a time"})
    assert status == 200 and body["tokens"] == [1, 403, 407, 261, 378] and body["max_model_len"] == 512
    status, body, _ = stories.request("POST", "/detokenize", {"tokens": [403, 407, 261, 378]})
    assert status == 200 and body["prompt"] == "Once upon a time"
    assert stories.request("GET", "/health")[0] == 200
    assert stories.request("GET", "/version")[1]["version"]


# --- bad input over raw HTTP -------------------------------------------------------------

BAD = [
    ("malformed JSON", b'{"prompt": ', 400, "invalid JSON"),
    ("wrong type", json.dumps({"prompt": "x", "max_tokens": "ten"}).encode(), 400, "invalid JSON body"),
    ("negative max_tokens", json.dumps({"prompt": "x", "max_tokens": -5}).encode(), 400, "at least 1"),
    ("huge max_tokens", json.dumps({"prompt": "x", "max_tokens": 10**12}).encode(), 400, "maximum context length is 512 tokens"),
    ("empty prompt", json.dumps({"prompt": ""}).encode(), 400, "must not be empty"),
    ("prompt over context", json.dumps({"prompt": [1] + [400] * 600, "max_tokens": 4}).encode(), 400, "maximum context length is 512 tokens. However, you requested 605 tokens (601 in the prompt"),
    ("invalid UTF-8", b'{"prompt": "\xff\xfe"}', 400, "not valid UTF-8"),
    ("bad temperature", json.dumps({"prompt": "x", "temperature": -1}).encode(), 400, "temperature"),
    ("bad n", json.dumps({"prompt": "x", "n": 0}).encode(), 400, "`n` must be between 1 and 128"),
    ("unknown model", json.dumps({"prompt": "x", "model": "gpt-5"}).encode(), 404, "does not exist"),
]


@pytest.mark.parametrize("name,body,status,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_requests(stories, name, body, status, msg):
    got, payload, _ = stories.request("POST", "/v1/completions", raw=body)
    assert got == status, payload
    assert msg in payload["error"]["message"], payload
    assert payload["error"]["code"] == status


def test_unknown_fields_are_ignored_and_routes_404(stories):
    status, body, _ = stories.request("POST", "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 2, "frobnicate": True})
    assert status == 200 and body["usage"]["completion_tokens"] == 2
    status, body, _ = stories.request("GET", "/v2/nothing")
    assert status == 404 and body["error"]["type"] == "not_found_error"
    status, body, _ = stories.request("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and "no chat template" in body["error"]["message"]


def test_oversized_body_is_413():
    s = Server("--model", STORIES, "--max-body-bytes", "1000")
    try:
        status, body, _ = s.request("POST", "/v1/completions", {"prompt": "x" * 5000})
        assert status == 413 and "too large" in body["error"]["message"]
    finally:
        s.stop()


def test_api_key():
    s = Server("--model", STORIES, "--api-key", "sekrit")
    try:
        status, body, _ = s.request("POST", "/v1/completions", {"prompt": "Once", "max_tokens": 1})
        assert status == 401 and body["error"]["type"] == "authentication_error"
        status, _, _ = s.request("POST", "/v1/completions", {"prompt": "Once", "max_tokens": 1}, headers={"Authorization": "Bearer sekrit"})
        assert status == 200
        assert s.request("GET", "/health")[0] == 200
    finally:
        s.stop()


def test_overload_answers_503_with_retry_after():
    s = Server("--model", STORIES, "--max-num-seqs", "1", "--max-waiting-requests", "0")
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": True, "temperature": 0}
        with ThreadPoolExecutor(6) as ex:
            results = list(ex.map(lambda _: s.request("POST", "/v1/completions", body), range(6)))
        codes = [r[0] for r in results]
        assert 200 in codes and 503 in codes, codes
        for status, payload, resp in results:
            if status == 503:
                assert resp.getheader("Retry-After") == "1" and payload["error"]["type"] == "overloaded_error"
        s.wait_idle()
    finally:
        s.stop()


# --- disconnects and load ----------------------------------------------------------------

def stream_and_hang_up(port, body, chunks):
    """Open a streaming request, read a few events, then drop the connection."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    seen = b""
    while seen.count(b"data: ") < chunks:
        got = sock.recv(4096)
        if not got:
            break
        seen += got
        if seen.startswith(b"HTTP/1.1 ") and not seen.startswith(b"HTTP/1.1 200"):
            raise AssertionError(seen.decode("utf-8", "replace"))
    sock.close()
    return seen.count(b"data: ")


def test_disconnects_free_the_kv_cache(smol):
    body = {"prompt": "Write a long story about a dragon.", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with ThreadPoolExecutor(20) as ex:
        seen = list(ex.map(lambda _: stream_and_hang_up(smol.port, body, 3), range(20)))
    assert all(n >= 3 for n in seen), seen
    smol.wait_idle(timeout=30)
    assert smol.gauge("glassbox:kv_cache_usage_perc") == 0.0
    aborted = next(v for k, v in smol.metrics().items() if k.startswith("glassbox:request_success_total") and 'finished_reason="abort"' in k)
    assert aborted >= 20


def test_load_every_request_answered_once(stories):
    rng = random.Random(0)
    prompts = ["Once upon a time", "Lily and Tom went to the park. They saw a big", "The little dog was sad because he lost his ball.",
               "Tim had a red ball", "One day, a cat"]
    # Greedy answers alone, for comparison: batching must not change them.
    alone = {}
    for p in prompts:
        for mt in (1, 8, 32, 64):
            alone[(p, mt)] = stories.request("POST", "/v1/completions", {"prompt": p, "max_tokens": mt, "temperature": 0})[1]["choices"][0]["text"]
    jobs = []
    for i in range(200):
        p, mt = rng.choice(prompts), rng.choice((1, 8, 32, 64))
        jobs.append((i, p, mt, i % 20 == 7))  # every 20th is aborted mid-stream

    def run(job):
        i, p, mt, abort = job
        if abort:
            stream_and_hang_up(stories.port, {"prompt": p, "max_tokens": 400, "ignore_eos": True, "stream": True}, 2)
            return (i, "aborted", None)
        status, body, _ = stories.request("POST", "/v1/completions", {"prompt": p, "max_tokens": mt, "temperature": 0, "user": f"u{i}"})
        return (i, status, body)

    start = time.time()
    with ThreadPoolExecutor(32) as ex:
        results = list(ex.map(run, jobs))
    assert time.time() - start < 120
    assert len(results) == 200 and len({r[0] for r in results}) == 200
    for (i, p, mt, abort), (_, status, body) in zip(jobs, results):
        if abort:
            continue
        assert status == 200, body
        (choice,) = body["choices"]
        assert choice["finish_reason"] in ("stop", "length")
        assert choice["text"] == alone[(p, mt)], f"request {i} differs from the same request alone"
    stories.wait_idle()


def test_sigterm_exits_zero_after_in_flight_requests():
    s = Server("--model", STORIES, "--shutdown-grace-period", "5")
    results = []
    t = threading.Thread(target=lambda: results.append(s.request("POST", "/v1/completions", {"prompt": "Once", "max_tokens": 200, "ignore_eos": True})))
    t.start()
    time.sleep(0.05)
    s.stop()  # asserts exit code 0
    t.join(timeout=30)
    assert results and results[0][0] == 200, results
