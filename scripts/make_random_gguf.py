#!/usr/bin/env python3
"""A random-weight Llama GGUF with TinyLlama-1.1B's shapes (or smaller ones), for speed
comparisons: throughput does not depend on weight values, only on shapes and types.

    python scripts/make_random_gguf.py OUT.gguf [--layers 22] [--hidden 2048] ...

Writes F16 weights (f32 norms) and a 32000-token SentencePiece-style vocabulary; quantize the
result with llama.cpp's `llama-quantize` (scripts/bench_vs_llamacpp does). Needs numpy and
llama.cpp's gguf-py (from the llama-cpp-python source tree that scripts/build-llama-server
unpacks; pass --gguf-py or let the default find it).
"""

import argparse
import sys
from pathlib import Path

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--gguf-py", default=str(Path(__file__).resolve().parent.parent / "target/llama.cpp/src/vendor/llama.cpp/gguf-py"))
    a = ap.parse_args()
    sys.path.insert(0, a.gguf_py)
    import gguf

    rng = np.random.default_rng(0)
    d, dh = a.hidden, a.hidden // a.heads
    w = gguf.GGUFWriter(a.out, "llama")
    w.add_name("random-tinyllama-shapes")
    w.add_block_count(a.layers)
    w.add_context_length(2048)
    w.add_embedding_length(d)
    w.add_feed_forward_length(a.intermediate)
    w.add_head_count(a.heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_rope_dimension_count(dh)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    # A SentencePiece-style vocabulary: specials, the 256 byte tokens, then filler pieces.
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    tokens += [f"\u2581t{i}".encode() for i in range(a.vocab - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (a.vocab - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * a.vocab)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    w.add_tensor("token_embd.weight", mat(a.vocab, d))
    for i in range(a.layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(d, dtype=np.float32))
        w.add_tensor(p + "attn_q.weight", mat(d, d))
        w.add_tensor(p + "attn_k.weight", mat(a.kv_heads * dh, d))
        w.add_tensor(p + "attn_v.weight", mat(a.kv_heads * dh, d))
        w.add_tensor(p + "attn_output.weight", mat(d, d))
        w.add_tensor(p + "ffn_norm.weight", np.ones(d, dtype=np.float32))
        w.add_tensor(p + "ffn_gate.weight", mat(a.intermediate, d))
        w.add_tensor(p + "ffn_up.weight", mat(a.intermediate, d))
        w.add_tensor(p + "ffn_down.weight", mat(d, a.intermediate))
    w.add_tensor("output_norm.weight", np.ones(d, dtype=np.float32))
    w.add_tensor("output.weight", mat(a.vocab, d))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(a.out)


if __name__ == "__main__":
    main()
