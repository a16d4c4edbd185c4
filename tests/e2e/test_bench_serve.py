"""`glassbox bench serve` against a glassbox server: exact input lengths from the server's own
tokenizer, vLLM's key names, goodput, failures counted with their messages, a plot, and
`bench compare` over two runs."""

import json
import subprocess
import tempfile
from pathlib import Path

from test_server import BIN, STORIES, Server


def bench(*args):
    run = subprocess.run([BIN, "bench", *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return run


def test_bench_serve_and_compare():
    s = Server("--model", STORIES, "--max-model-len", "256")
    tmp = Path(tempfile.mkdtemp(prefix="glassbox-e2e-bench-"))
    try:
        run = bench("serve", "--url", s.url, "--num-prompts", "24", "--input-len", "40", "--output-len", "12", "--max-concurrency", "4",
                    "--ignore-eos", "--goodput", "ttft:60000", "tpot:60000", "--output-json", str(tmp / "a.json"), "--plot", str(tmp / "a.svg"))
        assert "Serving Benchmark" in run.stdout and "Mean TTFT (ms)" in run.stdout
        a = json.loads((tmp / "a.json").read_text())
        assert a["completed"] == 24 and a["failed"] == 0, a["errors"]
        # Token-id prompts: input lengths are exact, and so are outputs with ignore_eos.
        assert a["total_input_tokens"] == 24 * 40 and a["total_output_tokens"] == 24 * 12
        for k in ["request_throughput", "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
                  "mean_tpot_ms", "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms", "p99_e2el_ms"]:
            assert a[k] > 0, k
        assert a["median_ttft_ms"] <= a["p90_ttft_ms"] <= a["p99_ttft_ms"] and a["mean_ttft_ms"] < a["mean_e2el_ms"]
        assert abs(a["request_goodput"] - a["request_throughput"]) < 1e-9, "generous SLOs: every request is good"
        assert (tmp / "a.svg").read_text().startswith("<svg")
        # A mixture with an input too long for the server: failed, with the server's message.
        (tmp / "mix.jsonl").write_text('{"input_len": 16, "output_len": 4}\n{"input_len": 300, "output_len": 4}\n{"prompt": "Once upon a time", "output_len": 6}\n')
        bench("serve", "--url", s.url, "--num-prompts", "6", "--dataset", str(tmp / "mix.jsonl"), "--request-rate", "40", "--burstiness", "0.5",
              "--ignore-eos", "--label", "mixture", "--output-json", str(tmp / "b.json"))
        b = json.loads((tmp / "b.json").read_text())
        assert b["completed"] == 4 and b["failed"] == 2, b
        (msg, n), = b["errors"].items()
        assert n == 2 and msg.startswith("HTTP 400") and "256" in msg, b["errors"]
        assert sorted(b["output_lens"]) == [4, 4, 6, 6]
        assert max(b["send_times"]) > 0.02, "a finite rate spaces the sends"
        cmp = bench("compare", str(tmp / "a.json"), str(tmp / "b.json"), "--plot", str(tmp / "cmp.svg"))
        assert "ratio" in cmp.stdout and "mixture" in cmp.stdout and "Successful requests" in cmp.stdout
        assert (tmp / "cmp.svg").exists()
        # Ctrl-C: no new requests, and what was measured is still reported and written.
        import signal
        import time
        p = subprocess.Popen([BIN, "bench", "serve", "--url", s.url, "--num-prompts", "200", "--input-len", "8", "--output-len", "4",
                              "--request-rate", "10", "--output-json", str(tmp / "c.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        c = json.loads((tmp / "c.json").read_text())
        assert 1 <= c["completed"] < 200 and c["cancelled"] == 200 - c["completed"] - c["failed"], c
        assert "stopping" in err and "Successful requests" in out
    finally:
        s.stop()
