"""Introspection over the API: captures through the real `openai` client (`extra_body`),
checked against the transformers reference, alone and inside a busy batch."""

import base64
import json
import threading
import time
from pathlib import Path

import numpy as np
import openai
import pytest
from safetensors.numpy import load as st_load, load_file

from test_server import SHARED, STORIES, Server, stream_and_hang_up

REF = SHARED / "reference" / "stories260K"
TOL = 1e-4  # relative to each tensor's scale, as the Rust reference tests


@pytest.fixture(scope="module")
def server():
    s = Server("--model", STORIES, "--max-model-len", "512")
    yield s
    s.stop()


def cases():
    manifest = json.loads((REF / "manifest.json").read_text())
    for case in manifest["cases"]:
        tensors = load_file(str(REF / f"{case['name']}.safetensors"))
        hooks = sorted(k for k in tensors if k not in ("input_ids", "greedy_continuation"))
        yield case, hooks, tensors


def capture(client, prompt, hooks, positions="prompt", dtype="float32"):
    out = client.completions.create(model="stories260K", prompt=prompt, max_tokens=1, temperature=0,
                                    extra_body={"capture": {"hooks": hooks, "positions": positions, "dtype": dtype}})
    cap = out.choices[0].model_extra["capture"]
    arrays = st_load(base64.b64decode(cap["data"]))
    return cap, arrays


def test_captures_match_the_reference_alone_and_in_a_busy_batch(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    alone = {}
    for case, hooks, ref in cases():
        cap, arrays = capture(client, case["prompt"], hooks)
        assert cap["positions"] == list(range(len(case["input_ids"])))
        assert cap["token_ids"] == case["input_ids"]
        assert set(arrays) == set(hooks)
        for name in hooks:
            want, got = ref[name], arrays[name]
            assert got.shape == want.shape, (name, got.shape, want.shape)
            assert cap["tensors"][name] == {"shape": list(want.shape), "dtype": "float32"}
            scale = max(float(np.abs(want).max()), 1e-6)
            err = float(np.abs(got - want).max()) / scale
            assert err <= TOL, f"{case['name']}/{name}: relative error {err:.2e}"
        alone[case["name"]] = arrays

    # The same requests while 16 others stream long generations: bitwise the same.
    stop = threading.Event()

    def busy(i):
        while not stop.is_set():
            stream_and_hang_up(server.port, {"prompt": f"Tim and Sue {i}", "max_tokens": 300, "ignore_eos": True,
                                             "stream": True, "temperature": 1.0, "seed": i}, 40)

    threads = [threading.Thread(target=busy, args=(i,), daemon=True) for i in range(16)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    try:
        for case, hooks, _ in cases():
            _, arrays = capture(client, case["prompt"], hooks)
            for name in hooks:
                assert arrays[name].tobytes() == alone[case["name"]][name].tobytes(), f"{case['name']}/{name} differs in a batch"
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    server.wait_idle()


def test_capture_options_streaming_and_n(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    # Streaming: the capture arrives in each choice's final chunk; n=2 gives one per choice.
    stream = client.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=3, n=2,
                                       stream=True, extra_body={"capture": {"hooks": ["blocks.2.hook_resid_post"], "positions": [0, -1], "dtype": "bfloat16"}})
    finals = {}
    for chunk in stream:
        for ch in chunk.choices:
            cap = (ch.model_extra or {}).get("capture")
            if cap is not None:
                assert ch.finish_reason == "length"
                finals[ch.index] = cap
    assert sorted(finals) == [0, 1]
    for cap in finals.values():
        assert cap["positions"] == [0, 9]  # 5 prompt tokens + 6 generated: rows 0..9 (the last token is never fed in)
        assert cap["tensors"]["blocks.2.hook_resid_post"] == {"shape": [2, 64], "dtype": "bfloat16"}
        raw = base64.b64decode(cap["data"])
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        assert json.loads(header["__metadata__"]["positions"]) == [0, 9]
    # Mistakes are 400s that say what to do.
    for extra, msg in [
        ({"hooks": ["blocks.*.hook_resid_pots"]}, "close names: blocks.0.hook_resid_post"),
        ({"hooks": ["blocks.9.hook_resid_post"]}, "close names"),
        ({"hooks": []}, "at least one hook"),
        ({"hooks": ["hook_embed"], "dtype": "float64"}, "float32, float16 or bfloat16"),
        ({"hooks": ["hook_embed"], "positions": "middle"}, "expected all, last"),
        ({"hooks": ["*"], "positions": "all"}, "--max-capture-bytes"),
    ]:
        status, body, _ = server.request("POST", "/v1/completions", {"prompt": "Once", "max_tokens": 400, "n": 16, "capture": extra})
        assert status == 400 and msg in body["error"]["message"], (extra, body)


def test_url_captures_download_once_and_the_store_is_bounded():
    s = Server("--model", STORIES, "--capture-store-bytes", "40000", "--capture-ttl", "600")
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0,
                "capture": {"hooks": ["blocks.*.hook_resid_post"], "positions": "all", "return": "url"}}
        status, out, _ = s.request("POST", "/v1/completions", body)
        cap = out["choices"][0]["capture"]
        assert status == 200 and cap["url"].startswith("/v1/captures/") and "data" not in cap
        conn_status, data, _ = s.request("GET", cap["url"])
        assert conn_status == 200
        status, _, _ = s.request("GET", cap["url"])
        assert status == 404, "a capture is deleted once downloaded"
        # 100 concurrent captures nobody downloads: the store fills, every request is answered,
        # the ones that do not fit finish with an error that says so.
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(16) as ex:
            results = list(ex.map(lambda _: s.request("POST", "/v1/completions", body), range(100)))
        kinds = {"stored": 0, "full": 0}
        for status, out, _ in results:
            assert status == 200, out
            ch = out["choices"][0]
            if ch["finish_reason"] == "error":
                assert "capture store is full" in ch["error"]["message"], ch
                kinds["full"] += 1
            else:
                assert ch["capture"]["bytes"] > 0
                kinds["stored"] += 1
        assert kinds["stored"] >= 1 and kinds["full"] >= 1 and sum(kinds.values()) == 100, kinds
        s.wait_idle()
    finally:
        s.stop()


def completion(server, body):
    status, out, _ = server.request("POST", "/v1/completions", body)
    assert status == 200, out
    ch = out["choices"][0]
    return ch["text"], ch["logprobs"]


def test_steering_over_the_api(server):
    base = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0.8, "seed": 5, "logprobs": 3, "ignore_eos": True}
    plain = completion(server, base)
    # A zero vector: bitwise the same text and logprobs.
    zero = completion(server, {**base, "steer": [{"hook": "blocks.3.hook_resid_post", "add": [0.0] * 64}]})
    assert zero == plain
    # A named vector (added at run time) changes this request only, inside a busy batch.
    push = [1.0 if i % 2 == 0 else -1.0 for i in range(64)]
    status, out, _ = server.request("POST", "/v1/steering_vectors", {"name": "zigzag", "vector": push})
    assert status == 200 and out["dims"] == 64
    others = [{**base, "prompt": p, "seed": i} for i, p in enumerate(["Lily and Tom", "The cat sat", "One day, a bird"])]
    alone = [completion(server, b) for b in others]
    from concurrent.futures import ThreadPoolExecutor
    steered_body = {**base, "steer": [{"hook": "blocks.3.hook_resid_post", "vector": "zigzag", "scale": 3.0}]}
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda b: completion(server, b), [steered_body, *others] * 2))
    assert results[0] != plain and results[0] == results[4]
    for got, want in zip(results[1:4] + results[5:8], alone * 2):
        assert got == want, "steering one request changed another"
    # Ablating every head of hook_z is zeroing hook_attn_out (stories260K has no o_proj bias).
    z = completion(server, {**base, "steer": [{"hook": "blocks.2.attn.hook_z", "ablate": True, "heads": list(range(8))}]})
    attn = completion(server, {**base, "steer": [{"hook": "blocks.2.hook_attn_out", "ablate": True}]})
    assert z == attn and z != plain
    # Mistakes are 400s.
    for steer, msg in [
        ([{"hook": "blocks.3.hook_resid_post", "add": [1.0] * 3}], "needs 64"),
        ([{"hook": "blocks.3.hook_resid_post", "vector": "nope"}], "no steering vector named `nope`"),
        ([{"hook": "blocks.3.hook_resid_post", "ablate": True, "add": [0.0] * 64}], "exactly one of"),
        ([{"hook": "blocks.3.attn.hook_pattern", "ablate": True}], "cannot be steered"),
        ([{"hook": "blocks.3.hook_resid_pots", "ablate": True}], "close names"),
    ]:
        status, out, _ = server.request("POST", "/v1/completions", {**base, "steer": steer})
        assert status == 400 and msg in out["error"]["message"], (steer, out)


def test_logit_lens_over_the_api(server):
    body = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0, "logprobs": 5,
            "logit_lens": {"layers": "all", "top_k": 5, "positions": "generated"}}
    status, out, _ = server.request("POST", "/v1/completions", body)
    assert status == 200, out
    ch = out["choices"][0]
    lens = ch["logit_lens"]
    # 5 prompt tokens + 4 generated: generated positions 5..7 went through the model, 5 layers each.
    assert [(e["position"], e["layer"]) for e in lens] == [(p, l) for p in (5, 6, 7) for l in range(5)]
    last = {e["position"]: e for e in lens if e["layer"] == 4}
    # The last layer's lens is the model's distribution: its ranking is the logprobs'.
    for i, pos in enumerate((5, 6, 7)):
        top_lp = ch["logprobs"]["top_logprobs"][i + 1]
        assert [t["token"] for t in last[pos]["top"]] == list(top_lp.keys())
    assert all(set(t) == {"token_id", "token", "prob"} for e in lens for t in e["top"])
    status, out, _ = server.request("POST", "/v1/completions", {**body, "logit_lens": {"layers": [7]}})
    assert status == 400 and "layer 7 does not exist" in out["error"]["message"], out


def test_tensor_dumps_switched_on_at_run_time_slice_into_requests():
    import subprocess
    import tempfile
    from test_server import BIN
    dumps = tempfile.mkdtemp(prefix="glassbox-e2e-dump-")
    s = Server("--model", STORIES, "--dump-dir", dumps, "--dump-max-steps", "0")
    try:
        status, out, _ = s.request("POST", "/debug/dump", {"hooks": ["blocks.*.hook_resid_post", "logits"], "max_steps": 50})
        assert status == 200 and out["enabled"] and out["hooks"] == 6, out
        body = {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0,
                "capture": {"hooks": ["blocks.*.hook_resid_post", "logits"], "positions": "all"}}
        status, resp, _ = s.request("POST", "/v1/completions", body)
        assert status == 200, resp
        status, out, _ = s.request("POST", "/debug/dump", {"enabled": False})
        assert status == 200 and not out["enabled"]
        manifests = sorted(Path(dumps).glob("step*.json"))
        assert len(manifests) == 5, manifests  # one prefill step and four decode steps
        request = json.loads(manifests[0].read_text())["requests"][0]["request"]
        sliced = Path(dumps) / "slice.safetensors"
        subprocess.run([BIN, "dump", "slice", dumps, "--request", str(request), "--out", str(sliced)], check=True)
        got = load_file(str(sliced))
        want = st_load(base64.b64decode(resp["choices"][0]["capture"]["data"]))
        assert set(got) == set(want)
        for name in want:
            assert got[name].tobytes() == want[name].tobytes(), name
        status, out, _ = s.request("POST", "/debug/dump", {"hooks": ["blocks.9.*"]})
        assert status == 400, out
    finally:
        s.stop()


def test_captures_match_the_reference_on_the_default_model_dequantized():
    # SmolLM2-135M's GGUF run dequantized (the oracle is its dequantized weights in
    # transformers); prompts go in as the oracle's token ids.
    ref_dir = SHARED / "reference" / "smollm2-135m-instruct"
    s = Server("--dequantize", "--served-model-name", "smollm2")
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        manifest = json.loads((ref_dir / "manifest.json").read_text())
        for case in manifest["cases"]:
            ref = load_file(str(ref_dir / f"{case['name']}.safetensors"))
            hooks = sorted(k for k in ref if k not in ("input_ids", "greedy_continuation"))
            out = client.completions.create(model="smollm2", prompt=case["input_ids"], max_tokens=1, temperature=0,
                                            extra_body={"capture": {"hooks": hooks, "positions": "prompt"}})
            cap = out.choices[0].model_extra["capture"]
            assert cap["token_ids"] == case["input_ids"]
            arrays = st_load(base64.b64decode(cap["data"]))
            for name in hooks:
                want, got = ref[name], arrays[name]
                assert got.shape == want.shape, (name, got.shape, want.shape)
                scale = max(float(np.abs(want).max()), 1e-6)
                err = float(np.abs(got - want).max()) / scale
                assert err <= TOL, f"{case['name']}/{name}: relative error {err:.2e}"
    finally:
        s.stop()


def test_steering_vectors_load_from_a_directory():
    import tempfile
    from safetensors.numpy import save_file
    d = tempfile.mkdtemp(prefix="glassbox-vectors-")
    save_file({"calm": np.full(64, 0.5, dtype=np.float32), "wild": np.linspace(-1, 1, 64, dtype=np.float32)}, f"{d}/moods.safetensors")
    s = Server("--model", STORIES, "--steering-vectors", d)
    try:
        status, out, _ = s.request("GET", "/v1/steering_vectors")
        assert status == 200 and [(v["name"], v["dims"]) for v in out["data"]] == [("calm", 64), ("wild", 64)], out
        base = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
        plain = completion(s, base)
        steered = completion(s, {**base, "steer": [{"hook": "blocks.4.hook_resid_post", "vector": "wild", "scale": 8.0}]})
        assert steered != plain
    finally:
        s.stop()
    # A vector that is not 1-D is refused at startup with a clear message.
    save_file({"matrix": np.zeros((2, 64), dtype=np.float32)}, f"{d}/bad.safetensors")
    import subprocess
    from test_server import BIN
    r = subprocess.run([BIN, "serve", "--model", STORIES, "--steering-vectors", d, "--port", "1"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "steering vectors are 1-D" in r.stderr, r.stderr
