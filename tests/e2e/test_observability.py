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
