"""`glassbox batch` against servers: load spread over two replicas by least outstanding
requests, a flaky replica's 500s retried, a replica that always fails some requests named in
those items' errors, every input id answered exactly once, captures written per item."""

import http.client
import http.server
import json
import subprocess
import tempfile
import threading
from pathlib import Path

from test_server import BIN, STORIES, Server


class FlakyProxy:
    """Forwards to a server; answers 500 to the first try of every third distinct request
    (a retry gets through), and always to prompts that contain FAIL."""

    def __init__(self, port):
        self.count = 0
        self.failed = 0
        self.seen = set()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.forward(None)

            def do_POST(self):
                self.forward(self.rfile.read(int(self.headers["Content-Length"])))

            def forward(self, body):
                first_try = body not in proxy.seen
                proxy.seen.add(body)
                proxy.count += first_try
                if body is not None and (b"FAIL" in body or (first_try and proxy.count % 3 == 0)):
                    proxy.failed += 1
                    out, status = json.dumps({"error": {"message": "injected failure", "type": "server_error", "code": 500}}).encode(), 500
                else:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                    conn.request(self.command, self.path, body=body, headers={"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    out, status = resp.read(), resp.status
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def successes(server):
    return sum(v for k, v in server.metrics().items() if k.startswith("glassbox:request_success_total"))


def test_batch_against_two_servers_with_failures():
    a, b = Server("--model", STORIES), Server("--model", STORIES)
    try:
        flaky = FlakyProxy(a.port)
        tmp = Path(tempfile.mkdtemp(prefix="glassbox-e2e-batch-"))
        items = [{"id": i, "desc": f"a cat called {i}" + (" FAIL" if i in (5, 50) else "")} for i in range(60)]
        (tmp / "in.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
        spec = {"stages": [
            {"name": "caption", "prompt": "Once upon a time, {{ desc }}", "max_tokens": 10},
            {"name": "refine", "prompt": "Refine: {{ caption }}", "max_tokens": 6,
             "capture": {"hooks": ["blocks.0.hook_resid_post"], "positions": "last"}},
        ]}
        (tmp / "spec.json").write_text(json.dumps(spec))
        run = subprocess.run([BIN, "batch", "--url", flaky.url, "--url", b.url, "--input", str(tmp / "in.jsonl"), "--spec", str(tmp / "spec.json"),
                              "--output", str(tmp / "out.jsonl"), "--max-inflight", "8"], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        recs = [json.loads(l) for l in (tmp / "out.jsonl").read_text().splitlines()]
        assert sorted(r["id"] for r in recs) == list(range(60)), "every id exactly once"
        by_id = {r["id"]: r for r in recs}
        for i in (5, 50):
            # Retried where it kept failing; named by stage, with the server's reason. (A FAIL item
            # that happened to reach the healthy replica on a retry succeeds: that is the point
            # of retries, so only check what the record says when it failed.)
            r = by_id[i]
            if "error" in r:
                assert r["error"]["stage"] == "caption" and "500" in r["error"]["message"] and "injected failure" in r["error"]["message"], r
        ok = [r for r in recs if "error" not in r]
        assert len(ok) >= 58, [r for r in recs if "error" in r]
        for r in ok:
            assert r["caption"] and r["refine"] and r["stats"]["refine"]["completion_tokens"] == 6, r
            assert Path(r["captures"]["refine"]).stat().st_size > 0
        assert flaky.failed > 0, "the proxy injected failures"
        assert successes(a) > 5 and successes(b) > 5, (successes(a), successes(b))
        assert "60 items:" in run.stderr
        # Only the flaky replica: the items it always fails end with an error naming the stage
        # and the server's reason (after retries); the others get through its 500s by retrying.
        (tmp / "out2.jsonl").unlink(missing_ok=True)
        run = subprocess.run([BIN, "batch", "--url", flaky.url, "--input", str(tmp / "in.jsonl"), "--spec", str(tmp / "spec.json"),
                              "--output", str(tmp / "out2.jsonl"), "--max-inflight", "4"], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        recs = {r["id"]: r for r in map(json.loads, (tmp / "out2.jsonl").read_text().splitlines())}
        assert sorted(recs) == list(range(60))
        for i in (5, 50):
            e = recs[i]["error"]
            assert e["stage"] == "caption" and "answered 500: injected failure (after 3 retries)" in e["message"], e
        assert all("error" not in r for i, r in recs.items() if i not in (5, 50))
        assert "errors in stage `caption`: 2" in run.stderr, run.stderr
    finally:
        a.stop()
        b.stop()


def test_batch_killed_half_way_resumes():
    """SIGKILL a running job, rerun it: the finished records stay as they were, the rest are
    done once, every id exactly once."""
    import os
    import signal
    import time
    s = Server("--model", STORIES)
    try:
        tmp = Path(tempfile.mkdtemp(prefix="glassbox-e2e-batch-kill-"))
        (tmp / "in.jsonl").write_text("".join(json.dumps({"id": f"x{i}", "desc": f"dog {i}"}) + "\n" for i in range(200)))
        spec = {"stages": [{"name": "a", "prompt": "Once upon a time, {{ desc }}", "max_tokens": 16},
                           {"name": "b", "prompt": "Then {{ a }}", "max_tokens": 16}]}
        (tmp / "spec.json").write_text(json.dumps(spec))
        args = [BIN, "batch", "--url", s.url, "--input", str(tmp / "in.jsonl"), "--spec", str(tmp / "spec.json"), "--output", str(tmp / "out.jsonl"), "--max-inflight", "2"]
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and (not (tmp / "out.jsonl").exists() or (tmp / "out.jsonl").read_text().count("\n") < 40):
            time.sleep(0.02)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        before = (tmp / "out.jsonl").read_text()
        whole = before[: before.rfind("\n") + 1]
        done_before = whole.count("\n")
        assert 40 <= done_before < 200, done_before
        run = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and f"({done_before} already in" in run.stderr, run.stderr
        after = (tmp / "out.jsonl").read_text()
        assert after.startswith(whole), "finished records are kept byte for byte"
        ids = [json.loads(l)["id"] for l in after.splitlines()]
        assert sorted(ids) == sorted(f"x{i}" for i in range(200)), "every id exactly once"
    finally:
        s.stop()
