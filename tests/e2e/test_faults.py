"""Faults end to end: the server never hangs or loses a request, whatever the client does
and wherever the engine fails; failures leave crash dumps; SIGQUIT dumps without stopping.
Fault injection (`GLASSBOX_FAULT`) exists only in test builds, which these tests run."""

import json
import os
import random
import signal
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from test_server import STORIES, Server, stream_and_hang_up


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_stream(port, body, headers=None, timeout=60):
    """A whole SSE response: (status, [events]); events are parsed JSON or "[DONE]"."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    data = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n" +
                 f"{extra}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    raw = b""
    while True:
        got = sock.recv(65536)
        if not got:
            break
        raw += got
    sock.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    events = []
    for line in rest.decode("utf-8", "replace").splitlines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return status, events


def test_kv_exhaustion_is_answered_and_the_engine_idles():
    # The case: the default model with 4 MiB of KV (80 tokens) and a request for 300.
    s = Server("--kv-cache-memory", "4MiB")
    try:
        assert any("max model length 80" in l for l in s.log), "".join(s.log)
        start = time.time()
        status, body, _ = s.request("POST", "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True})
        assert status == 400 and "maximum context length is 80" in body["error"]["message"], body
        assert time.time() - start < 10
        status, body, _ = s.request("POST", "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 20, "ignore_eos": True})
        assert status == 200 and body["choices"][0]["finish_reason"] == "length", body
        s.wait_idle()
        # Nothing to do: the engine thread blocks (no busy loop).
        before = cpu_seconds(s.proc.pid)
        time.sleep(2)
        assert cpu_seconds(s.proc.pid) - before < 0.1
    finally:
        s.stop()


def test_500_concurrent_requests_with_aborts_disconnects_and_faults():
    dumps = tempfile.mkdtemp(prefix="glassbox-e2e-dumps-")
    s = Server("--model", STORIES, "--max-model-len", "512", "--crash-dump-dir", dumps, env={"GLASSBOX_FAULT": "forward:panic:50"})
    try:
        assert any("fault injection active" in l for l in s.log), \
            "this server binary has no fault injection: build it with `cargo build -p glassbox --features glassbox-engine/fault-injection` (scripts/test does)"

        prompts = ["Once upon a time", "Lily and Tom went to the park. They saw a big", "Tim had a red ball", "One day, a cat"]
        alone = {}
        for p in prompts:
            for mt in (4, 16, 48):
                alone[(p, mt)] = s.request("POST", "/v1/completions", {"prompt": p, "max_tokens": mt, "temperature": 0})[1]["choices"][0]["text"]
        rng = random.Random(1)
        jobs = []
        for i in range(500):
            p, mt = rng.choice(prompts), rng.choice((4, 16, 48))
            kind = "fault" if i % 50 == 49 else rng.choice(["json", "json", "stream", "stream", "hangup", "timeout"])
            jobs.append((i, p, mt, kind))

        def run(job):
            i, p, mt, kind = job
            body = {"prompt": p, "max_tokens": mt, "temperature": 0, "seed": 50 if kind == "fault" else 1000 + i}
            if kind == "hangup":
                stream_and_hang_up(s.port, {**body, "max_tokens": 300, "ignore_eos": True, "stream": True}, 2)
                return None
            if kind == "timeout":
                # A client that gives up before the answer (its connection closes: an abort).
                try:
                    sock = socket.create_connection(("127.0.0.1", s.port), timeout=0.05)
                    data = json.dumps({**body, "max_tokens": 300, "ignore_eos": True}).encode()
                    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
                                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
                    sock.recv(10)
                except OSError:
                    pass
                finally:
                    sock.close()
                return None
            if kind == "stream":
                return read_stream(s.port, {**body, "stream": True}, {"X-Request-Id": f"job-{i}"})
            return s.request("POST", "/v1/completions", body, headers={"X-Request-Id": f"job-{i}"})

        with ThreadPoolExecutor(64) as ex:
            results = list(ex.map(run, jobs))
        faults = 0
        for (i, p, mt, kind), r in zip(jobs, results):
            if r is None:
                continue
            if kind == "stream":
                status, events = r
                assert status == 200, (i, events)
                assert events.count("[DONE]") == 1 and events[-1] == "[DONE]", (i, events[-3:])
                finishes = [c["finish_reason"] for e in events if e != "[DONE]" for c in e["choices"] if c["finish_reason"]]
                assert len(finishes) == 1, (i, finishes)
                assert finishes[0] == "length" or finishes[0] == "stop", (i, events[-3:])
                text = "".join(c["text"] for e in events if e != "[DONE]" for c in e["choices"])
                assert text == alone[(p, mt)], f"request {i} differs from the same request alone"
                continue
            status, body, resp = r
            assert status == 200, (i, body)
            assert resp.getheader("X-Request-Id") == f"job-{i}"
            (choice,) = body["choices"]
            if kind == "fault":
                faults += 1
                assert choice["finish_reason"] == "error" and "injected fault" in choice["error"]["message"], (i, choice)
            else:
                assert choice["finish_reason"] in ("stop", "length"), (i, choice)
                assert choice["text"] == alone[(p, mt)], f"request {i} differs from the same request alone"
        assert faults == 10
        s.wait_idle(timeout=30)
        assert s.request("GET", "/health")[0] == 200
        assert s.gauge("glassbox:num_requests_running") == 0 and s.gauge("glassbox:kv_cache_blocks_used") == 0
        # Each failing step left a crash dump naming the faulty request (bounded: at most 20).
        files = sorted(Path(dumps).glob("crash-*.json"))
        assert 1 <= len(files) <= 20, files
        dump = json.loads(files[-1].read_text())
        failed = {f["request"] for f in dump["failed"]}
        assert all(r["request"]["sampling"]["seed"] == 50 for r in dump["requests"] if r["request"]["id"] in failed)
    finally:
        s.stop()


def test_sigquit_dumps_a_running_request_and_keeps_serving():
    dumps = tempfile.mkdtemp(prefix="glassbox-e2e-state-")
    s = Server("--crash-dump-dir", dumps)  # the default model: slow enough to catch mid-request
    try:
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=60)
        body = json.dumps({"prompt": "Write a long story about a dragon.", "max_tokens": 400, "ignore_eos": True, "stream": True, "seed": 7}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        s.proc.send_signal(signal.SIGQUIT)
        deadline = time.time() + 20
        while time.time() < deadline and not list(Path(dumps).glob("state-*.json")):
            time.sleep(0.1)
        (path,) = Path(dumps).glob("state-*.json")
        time.sleep(0.2)
        dump = json.loads(path.read_text())
        assert [r["request"]["sampling"]["seed"] for r in dump["requests"]] == [7], dump["requests"]
        assert dump["requests"][0]["request"]["sampling"]["max_tokens"] == 400
        # Still serving; and the same dump over HTTP.
        status, body, _ = s.request("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert status == 200, body
        status, body, _ = s.request("POST", "/debug/dump_state")
        assert status == 200 and Path(body["path"]).is_file(), body
        sock.close()
        s.wait_idle(timeout=30)
    finally:
        s.stop()


def test_openapi_describes_every_endpoint():
    s = Server("--model", STORIES, "--max-model-len", "512")
    try:
        status, doc, _ = s.request("GET", "/openapi.json")
        assert status == 200 and doc["openapi"].startswith("3.")
        paths = set(doc["paths"])
        assert paths == {"/v1/completions", "/v1/chat/completions", "/v1/models", "/debug/dump_state", "/health", "/version",
                         "/tokenize", "/detokenize", "/metrics", "/v1/captures/{id}", "/v1/steering_vectors", "/debug/dump", "/start_profile", "/stop_profile",
                         "/debug/requests", "/debug/kv", "/debug/steps"}, paths
        schemas = doc["components"]["schemas"]
        # The server's own limits are in the document.
        assert schemas["Common"]["properties"]["model"]["enum"] == ["stories260K"]
        assert schemas["Common"]["properties"]["max_tokens"]["maximum"] == 512
        assert schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]["maximum"] == 511
        # Every documented path answers something other than 404/405 for its method.
        for path, ops in doc["paths"].items():
            if "{" in path:
                continue  # a made-up id is a 404 by design
            for method in ops:
                body = {"enabled": False} if path == "/debug/dump" else {} if method == "post" else None
                status, _, _ = s.request(method.upper(), path, body)
                assert status not in (404, 405), (method, path, status)
        # Integral floats are integers, as JSON Schema says.
        status, body, _ = s.request("POST", "/v1/completions", {"prompt": "Once", "max_tokens": 3.0, "seed": 7.0})
        assert status == 200, body
    finally:
        s.stop()
