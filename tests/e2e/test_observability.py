"""The built-in profiler: always routed, engine steps and request tracks in a Chrome trace
that Perfetto opens, a text summary, 409s for misuse, and auto-stop after N steps."""

import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from test_server import STORIES, Server


def test_profile_engine_steps_and_requests():
    profiles = tempfile.mkdtemp(prefix="glassbox-e2e-profiles-")
    s = Server("--model", STORIES, "--profile-dir", profiles)
    try:
        status, out, _ = s.request("POST", "/stop_profile")
        assert status == 409 and "no profile is running" in out["error"]["message"], out
        status, out, _ = s.request("POST", "/start_profile", {"name": "run1"})
        assert status == 200 and out["status"] == "started", out
        status, out, _ = s.request("POST", "/start_profile")
        assert status == 409 and "already running" in out["error"]["message"], out
        prompts = ["Once upon a time", "Lily and Tom went to the park", "The cat sat on the mat", "One day"]
        with ThreadPoolExecutor(4) as ex:
            results = list(ex.map(lambda p: s.request("POST", "/v1/completions", {"prompt": p, "max_tokens": 12, "ignore_eos": True}), prompts))
        assert all(r[0] == 200 for r in results)
        status, files, _ = s.request("POST", "/stop_profile")
        assert status == 200 and files["steps"] >= 12, files
        assert Path(files["trace"]).parent == Path(profiles) and Path(files["trace"]).name.startswith("run1-")
        trace = json.loads(Path(files["trace"]).read_text())
        events = trace["traceEvents"]
        steps = [e for e in events if e.get("name") == "step" and e["ph"] == "X"]
        assert len(steps) == files["steps"]
        # Phases nest inside their step; steps follow each other in time.
        for st in steps:
            phases = [e for e in events if e.get("cat") == "engine" and e["name"] != "step" and e["args"].get("step") == st["args"]["step"]]
            assert {p["name"] for p in phases} == {"schedule + prepare", "forward", "update"}
            for p in phases:
                assert st["ts"] - 1e-3 <= p["ts"] and p["ts"] + p["dur"] <= st["ts"] + st["dur"] + 1e-3, (st, p)
            assert st["args"]["requests"] == len(st["args"]["batch"]) and st["args"]["prefill_rows"] + st["args"]["decode_rows"] > 0
        assert all(a["ts"] + a["dur"] <= b["ts"] + 1e-3 for a, b in zip(steps, steps[1:]))
        # One track per request: queued, prefill, decode steps, finished with its token count.
        names = {e["tid"]: e["args"]["name"] for e in events if e.get("name") == "thread_name"}
        request_tracks = [t for t, n in names.items() if n.startswith("request ")]
        assert len(request_tracks) == 4, names
        for t in request_tracks:
            mine = [e for e in events if e.get("tid") == t and e["ph"] in ("X", "i")]
            kinds = [e["name"] for e in mine]
            assert kinds[0] == "queued" and "prefill chunk" in kinds and kinds.count("decode") >= 10 and kinds[-1] == "finished", kinds
            assert mine[-1]["args"]["completion_tokens"] == 12
        summary = Path(files["summary"]).read_text()
        assert "forward" in summary and "% step" in summary
        # Auto-stop after num_steps: the files appear by themselves, and a stop is then a 409.
        status, out, _ = s.request("POST", "/start_profile", {"num_steps": 3, "name": "auto"})
        assert status == 200, out
        s.request("POST", "/v1/completions", {"prompt": "Once", "max_tokens": 8, "ignore_eos": True})
        deadline = time.time() + 10
        while time.time() < deadline and not list(Path(profiles).glob("auto-*.trace.json")):
            time.sleep(0.05)
        (auto,) = Path(profiles).glob("auto-*.trace.json")
        assert json.loads(auto.read_text())["otherData"]["steps"] == 3
        assert s.request("POST", "/stop_profile")[0] == 409
        status, out, _ = s.request("POST", "/start_profile", {"name": "../escape"})
        assert status == 400, out
    finally:
        s.stop()


def test_live_debug_views_follow_a_running_request():
    import socket
    s = Server("--served-model-name", "smollm2")  # the default model: slow enough to watch
    try:
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=60)
        body = json.dumps({"prompt": "Write a long story about a dragon.", "max_tokens": 200, "ignore_eos": True, "stream": True,
                           "capture": {"hooks": ["blocks.3.hook_resid_post"], "positions": "last"}}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        seen = []
        deadline = time.time() + 30
        while len(seen) < 3 and time.time() < deadline:
            status, out, _ = s.request("GET", "/debug/requests")
            assert status == 200, out
            if out["data"]:
                (r,) = out["data"]
                (seq,) = r["sequences"]
                assert r["capture"] == {"hooks": 1, "positions": "last"} and seq["state"] == "running" and seq["blocks"] > 0
                seen.append((seq["generated"], seq["tokens_computed"], r["id"]))
            time.sleep(0.3)
        assert len(seen) == 3 and seen[0][0] < seen[-1][0], f"token counts did not grow: {seen}"
        status, out, _ = s.request("GET", "/debug/steps?last=5")
        assert status == 200 and len(out["data"]) == 5, out
        assert all(st["batch"] and st["batch"][0]["request"] == seen[0][2] for st in out["data"]), out["data"]
        assert all(st["duration_ms"] > 0 for st in out["data"])
        status, out, _ = s.request("GET", "/debug/kv?tables=true")
        assert status == 200 and out["data"]["blocks_used"] > 0 and len(out["data"]["block_tables"]) == 1, out
        sock.close()
        s.wait_idle(timeout=30)
        status, out, _ = s.request("GET", "/debug/requests")
        assert out["data"] == []
    finally:
        s.stop()


def nests(inner, outer, slack=1e-3):
    return outer["ts"] - slack <= inner["ts"] and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"] + slack


def test_profile_with_layers_api_tracks_timings_metrics_and_access_log():
    profiles = tempfile.mkdtemp(prefix="glassbox-e2e-profiles-")
    s = Server("--model", STORIES, "--profile-dir", profiles, "--log-format", "json", env={"GLASSBOX_LOG": "warn,glassbox=info"})
    try:
        status, out, _ = s.request("POST", "/start_profile", {"name": "layers", "with_layers": True})
        assert status == 200, out
        bodies = [{"prompt": p, "max_tokens": 6, "ignore_eos": True, "return_timings": True} for p in ["Once upon a time", "The dog"]]
        bodies[1]["stream"] = True
        with ThreadPoolExecutor(2) as ex:
            results = list(ex.map(lambda b: s.request("POST", "/v1/completions", b, headers={"X-Request-Id": "rid-" + b["prompt"][:3]}), bodies))
        assert all(r[0] == 200 for r in results), results
        timings = results[0][1]["choices"][0]["timings"]
        assert timings["steps"] == 6 and timings["preemptions"] == 0, timings
        assert 0 <= timings["queued_ms"] <= timings["first_token_ms"] <= timings["engine_ms"], timings
        assert abs(timings["queued_ms"] + timings["prefill_ms"] + timings["decode_ms"] - timings["engine_ms"]) < 0.05, timings
        # Streaming: the final chunk of the choice carries its timings.
        events = [json.loads(l[6:]) for l in results[1][1].splitlines() if l.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "length" and events[-1]["choices"][0]["timings"]["steps"] == 6, events[-1]
        # API spans are sent when the stream ends; give them a moment to reach the engine.
        time.sleep(0.3)
        status, files, _ = s.request("POST", "/stop_profile")
        assert status == 200, files
        events = json.loads(Path(files["trace"]).read_text())["traceEvents"]
        spans = [e for e in events if e["ph"] == "X"]
        forwards = [e for e in spans if e["cat"] == "engine" and e["name"] == "forward"]
        layers = [e for e in spans if e["cat"] == "layer"]
        ops = [e for e in spans if e["cat"] == "op"]
        # stories260K has 5 layers: every forward pass holds 5 layer spans, each op nests in
        # its layer (or, for embed/final_norm/lm_head, in the forward pass).
        assert len(layers) == 5 * len(forwards), (len(layers), len(forwards))
        for layer in layers:
            assert any(nests(layer, f) for f in forwards), layer
        assert {"qkv_proj", "attention", "o_proj", "gate_up_proj", "down_proj", "attn_norm", "lm_head"} <= {o["name"] for o in ops}
        for op in ops:
            container = layers if op["args"]["layer"] is not None else forwards
            assert any(nests(op, c) for c in container if c["tid"] == op["tid"]), op
        # The API side: one track per HTTP request, its phases nested in `request`.
        names = {e["tid"]: e["args"]["name"] for e in events if e.get("name") == "thread_name"}
        api_tracks = {t: n for t, n in names.items() if n.startswith("api ")}
        assert sorted(api_tracks.values()) == ["api /v1/completions rid-Onc", "api /v1/completions rid-The"], names
        for tid in api_tracks:
            mine = [e for e in spans if e["tid"] == tid]
            (whole,) = [e for e in mine if e["name"] == "request"]
            phases = [e for e in mine if e["name"] != "request"]
            assert {"parse", "tokenize", "submit"} <= {p["name"] for p in phases}
            assert {"wait for engine", "stream"} & {p["name"] for p in phases}
            assert all(nests(p, whole) for p in phases), mine
        summary = Path(files["summary"]).read_text()
        assert "qkv_proj" in summary and "layer" in summary and "api" in summary
        # Metrics named after vLLM's.
        m = s.metrics()
        assert m['glassbox:request_queue_time_seconds_count{model_name="stories260K"}'] == 2
        assert m['glassbox:request_decode_time_seconds_count{model_name="stories260K"}'] == 2
        assert m['glassbox:iteration_tokens_total_count{model_name="stories260K"}'] >= 6
        assert m['glassbox:step_duration_seconds_count{model_name="stories260K"}'] >= 6
        assert 'glassbox:capture_bytes_total{model_name="stories260K"}' in m and 'glassbox:steer_requests_total{model_name="stories260K"}' in m
        # One JSON access-log line per request, with its id, status and tokens.
        access = [json.loads(l) for l in s.log if l.startswith("{") and '"glassbox::access"' in l]
        mine = {a["request_id"]: a for a in access if a["path"] == "/v1/completions"}
        assert set(mine) == {"rid-Onc", "rid-The"}, access
        assert all(a["status"] == 200 and a["completion_tokens"] == 6 and a["prompt_tokens"] > 0 for a in mine.values()), mine
    finally:
        s.stop()


def test_otlp_spans_reach_a_collector():
    """A stand-in OTLP/HTTP collector receives one `llm_request` span per request, with
    vLLM's GenAI attributes, as a child of the caller's `traceparent`."""
    import http.server
    import threading
    received = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers.get("Content-Type"), json.loads(body)))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *a):
            pass

    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    s = Server("--model", STORIES, "--otlp-traces-endpoint", f"http://127.0.0.1:{collector.server_port}")
    try:
        parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        assert s.request("POST", "/v1/completions", {"prompt": "Once", "max_tokens": 5, "ignore_eos": True, "temperature": 0.5}, headers={"traceparent": parent, "X-Request-Id": "traced"})[0] == 200
        assert s.request("POST", "/v1/completions", {"prompt": "The cat", "max_tokens": 3, "ignore_eos": True})[0] == 200
        spans = []
        deadline = time.time() + 15
        while time.time() < deadline and len(spans) < 2:
            time.sleep(0.2)
            spans = [sp for _, _, doc in list(received) for rs in doc["resourceSpans"] for ss in rs["scopeSpans"] for sp in ss["spans"]]
        assert len(spans) == 2, received
        assert all(path == "/v1/traces" and ctype.startswith("application/json") for path, ctype, _ in received)
        service = {a["key"]: a["value"] for a in received[0][2]["resourceSpans"][0]["resource"]["attributes"]}
        assert service["service.name"] == {"stringValue": "glassbox"}

        def attrs(sp):
            return {a["key"]: next(iter(a["value"].values())) for a in sp["attributes"]}
        by_id = {attrs(sp)["gen_ai.request.id"]: sp for sp in spans}
        traced = by_id["traced"]
        a = attrs(traced)
        assert traced["name"] == "llm_request" and traced["kind"] == 2  # SERVER
        assert traced["traceId"].lower() == "4bf92f3577b34da6a3ce929d0e0e4736" and traced["parentSpanId"].lower() == "00f067aa0ba902b7", traced
        assert a["gen_ai.response.model"] == "stories260K" and int(a["gen_ai.usage.completion_tokens"]) == 5 and int(a["gen_ai.usage.prompt_tokens"]) >= 2
        assert int(a["gen_ai.request.max_tokens"]) == 5 and abs(a["gen_ai.request.temperature"] - 0.5) < 1e-6 and int(a["gen_ai.request.n"]) == 1
        for k in ["gen_ai.latency.time_to_first_token", "gen_ai.latency.time_in_queue", "gen_ai.latency.time_in_model_prefill", "gen_ai.latency.time_in_model_decode", "gen_ai.latency.e2e"]:
            assert 0 <= a[k] <= a["gen_ai.latency.e2e"], (k, a)
        assert int(traced["endTimeUnixNano"]) > int(traced["startTimeUnixNano"])
        other = [sp for k, sp in by_id.items() if k != "traced"][0]
        assert other["traceId"].lower() != traced["traceId"].lower() and not other.get("parentSpanId")
    finally:
        s.stop()
        collector.shutdown()
