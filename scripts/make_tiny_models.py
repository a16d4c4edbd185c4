#!/usr/bin/env python3
"""Tiny random-weight models of every architecture glassbox runs, with their oracle.

For each architecture this builds a model from its transformers config class with a fixed seed
(no download), and writes under OUT/<name>/:

    hf/                      the Hugging Face directory (config, safetensors, tokenizer)
    model-f32.gguf           llama.cpp's converter (convert_hf_to_gguf.py) on hf/, float32
    model-q8_0.gguf          the same, Q8_0
    model-q4_0.gguf          the f32 GGUF through llama.cpp's llama-quantize, Q4_0
    model-q5_0.gguf          the same, Q5_0
    reference/manifest.json  cases as in ../shared/reference (prompt, input_ids, greedy tokens)
    reference/<case>.safetensors
                             every HOOKS.md hook of every layer, the logits, input_ids and the
                             greedy continuation, computed by transformers (float32, eager)

Run outside CI (it needs torch and transformers; scripts/test-transformers makes the venv):

    target/transformers-venv/bin/python scripts/make_tiny_models.py \
        --llama-cpp target/llama.cpp/src/vendor/llama.cpp --out crates/model/tests/data/tiny

The converter comes from llama.cpp's source tree (vendored in the llama-cpp-python source
package on PyPI; scripts/build-llama-server unpacks it). Every model shares one tiny byte-level
BPE vocabulary (320 tokens) trained here; the converter is told its pre-tokenizer is GPT-2's
(its hash table only knows released vocabularies) and writes it as a GPT-2 vocabulary for
every architecture (Gemma 2's converter would want a SentencePiece model).
"""

import argparse
import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file

D, H, KV, DH, M, V = 32, 4, 2, 8, 64, 320
COMMON = dict(vocab_size=V, max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0)
LLAMA_LIKE = dict(hidden_size=D, intermediate_size=M, num_hidden_layers=2, num_attention_heads=H, num_key_value_heads=KV,
                  head_dim=DH, rms_norm_eps=1e-6, tie_word_embeddings=False, **COMMON)

# name -> (config class, kwargs, notes for the manifest)
ARCHS = {
    "gpt2": ("GPT2Config", dict(n_embd=D, n_layer=2, n_head=H, n_positions=128, n_ctx=128, n_inner=None, activation_function="gelu_new",
                                vocab_size=V, bos_token_id=0, eos_token_id=0, layer_norm_epsilon=1e-5)),
    "pythia": ("GPTNeoXConfig", dict(hidden_size=D, intermediate_size=4 * D, num_hidden_layers=2, num_attention_heads=H,
                                     rotary_pct=0.5, use_parallel_residual=True, hidden_act="gelu", layer_norm_eps=1e-5,
                                     tie_word_embeddings=False, **COMMON)),
    "gemma2": ("Gemma2Config", dict(LLAMA_LIKE, query_pre_attn_scalar=DH, sliding_window=4, attn_logit_softcapping=1.0,
                                    final_logit_softcapping=5.0, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)),
    "phi3": ("Phi3Config", dict(LLAMA_LIKE, hidden_act="silu")),
    "mistral": ("MistralConfig", dict(LLAMA_LIKE, sliding_window=4)),
    "qwen2": ("Qwen2Config", dict(LLAMA_LIKE, use_sliding_window=False)),
    "qwen3": ("Qwen3Config", dict(LLAMA_LIKE, use_sliding_window=False)),
    # Mixtures of experts: 4 experts of width 32, 2 per token.
    "mixtral": ("MixtralConfig", dict(LLAMA_LIKE, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    # llama.cpp always renormalizes Qwen3-MoE's top-k weights (released checkpoints say so too).
    "qwen3_moe": ("Qwen3MoeConfig", dict(LLAMA_LIKE, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                         norm_topk_prob=True, use_sliding_window=False)),
    # llama.cpp's converter writes OLMoE's norm epsilon as 1e-5 whatever the config says (as
    # released OLMoE has it).
    "olmoe": ("OlmoeConfig", dict(LLAMA_LIKE, intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                                  rms_norm_eps=1e-5)),
}

CASES = [
    ("short", "Once upon a time"),
    ("long", "The little dog ran to the park, and the sun was warm on the grass."),
]
GREEDY = 8

CORPUS = [
    "Once upon a time there was a little dog who liked to run in the park.",
    "The sun was warm and the grass was green. The dog ran and ran.",
    "One day the dog saw a big red ball. He was very happy and played all day.",
    "def main():\n    print('hello world')\n    return 0\n",
    "The capital of France is Paris. The capital of Italy is Rome.",
]


def make_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers, processors
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=V, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    assert tok.get_vocab_size() <= V, tok.get_vocab_size()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "add_bos_token": False, "add_eos_token": False, "model_max_length": 128,
    }, indent=1))


def build(cls_name, kwargs):
    torch.manual_seed(0)
    cfg = getattr(transformers, cls_name)(**kwargs)
    cfg.initializer_range = 0.1
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    # Norm weights start at 1 (or 0) and biases at 0: perturb them so a wrong offset or a
    # forgotten bias shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


class Recorder:
    """Forward hooks that write each HOOKS.md activation under its glassbox name."""

    def __init__(self, model, arch):
        self.out, self.handles, self.model, self.arch = {}, [], model, arch
        c = model.config
        self.h = c.num_attention_heads
        self.kv = getattr(c, "num_key_value_heads", None) or self.h
        self.dh = getattr(c, "head_dim", None) or c.hidden_size // self.h

    def put(self, name, t):
        t = t.detach().float()
        if t.dim() > 1 and t.shape[0] == 1:
            t = t[0]
        self.out[name] = t.contiguous().numpy()

    def on(self, module, fn):
        """Call fn with the module's output; the hook returns None, so the output stays."""
        def hook(m, i, o):
            fn(o[0] if isinstance(o, tuple) else o)
        self.handles.append(module.register_forward_hook(hook))

    def pre(self, module, fn):
        def hook(m, args, kwargs):
            fn(kwargs.get("hidden_states", args[0] if args else None))
        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def heads(self, t, n):
        return t.reshape(t.shape[0], t.shape[1], n, self.dh)

    def attach(self):
        m, a = self.model, self.arch
        if a == "gpt2":
            inner, layers = m.transformer, m.transformer.h
            self.on(inner.wte, lambda o: self.put("hook_embed", o))
            self.on(inner.wpe, lambda o: self.put("hook_pos_embed", o[None] if o.dim() == 2 else o))
            final = inner.ln_f
        elif a == "pythia":
            inner, layers = m.gpt_neox, m.gpt_neox.layers
            self.on(inner.embed_in, lambda o: self.put("hook_embed", o))
            final = inner.final_layer_norm
        else:
            inner, layers = m.model, m.model.layers
            # The embedding as the first block sees it (Gemma scales it inside the model).
            self.pre(layers[0], lambda x: self.put("hook_embed", x))
            final = inner.norm
        for l, layer in enumerate(layers):
            self.attach_block(l, layer)
        self.on(final, lambda o: self.put("ln_final.hook_normalized", o))
        self.patch_rotary(layers)

    def attach_block(self, l, layer):
        p, a = f"blocks.{l}.", self.arch
        put = self.put
        self.pre(layer, lambda x: put(p + "hook_resid_pre", x))
        self.on(layer, lambda o: put(p + "hook_resid_post", o))
        if a == "gpt2":
            ln1, ln2, attn, mlp = layer.ln_1, layer.ln_2, layer.attn, layer.mlp
            o_proj, up, down = attn.c_proj, mlp.c_fc, mlp.c_proj

            def qkv(o):
                q, k, v = o.split(o.shape[-1] // 3, dim=-1)
                put(p + "attn.hook_q", self.heads(q, self.h))
                put(p + "attn.hook_k", self.heads(k, self.h))
                put(p + "attn.hook_v", self.heads(v, self.h))
            self.on(attn.c_attn, qkv)
        elif a == "pythia":
            ln1, ln2, attn, mlp = layer.input_layernorm, layer.post_attention_layernorm, layer.attention, layer.mlp
            o_proj, up, down = attn.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h

            def qkv(o):
                t = o.reshape(o.shape[0], o.shape[1], self.h, 3 * self.dh)
                for i, n in enumerate("qkv"):
                    put(p + f"attn.hook_{n}", t[..., i * self.dh:(i + 1) * self.dh])
            self.on(attn.query_key_value, qkv)
        else:
            ln1, attn, mlp = layer.input_layernorm, layer.self_attn, layer.mlp
            ln2 = getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm
            o_proj, down = attn.o_proj, getattr(mlp, "down_proj", None)
            if hasattr(attn, "qkv_proj"):
                def qkv(o):
                    q, k, v = o.split([self.h * self.dh, self.kv * self.dh, self.kv * self.dh], dim=-1)
                    put(p + "attn.hook_q", self.heads(q, self.h))
                    put(p + "attn.hook_k", self.heads(k, self.kv))
                    put(p + "attn.hook_v", self.heads(v, self.kv))
                self.on(attn.qkv_proj, qkv)
            else:
                self.on(attn.q_proj, lambda o: put(p + "attn.hook_q", self.heads(o, self.h)))
                self.on(attn.k_proj, lambda o: put(p + "attn.hook_k", self.heads(o, self.kv)))
                self.on(attn.v_proj, lambda o: put(p + "attn.hook_v", self.heads(o, self.kv)))
            if getattr(attn, "q_norm", None) is not None:
                # Per head ([1, T, H, dh]) or, in OLMoE, over the whole projection ([1, T, H*dh]).
                self.on(attn.q_norm, lambda o: put(p + "attn.hook_q_normed", self.heads(o, self.h) if o.dim() == 3 else o))
                self.on(attn.k_norm, lambda o: put(p + "attn.hook_k_normed", self.heads(o, self.kv) if o.dim() == 3 else o))
            up = None
            if hasattr(mlp, "experts"):
                def router(m, i, o):
                    logits, weights, ids = o
                    put(p + "mlp.hook_router_logits", logits[None])
                    put(p + "mlp.hook_expert_weights", weights[None])
                    put(p + "mlp.hook_expert_ids", ids[None].float())
                self.handles.append(mlp.gate.register_forward_hook(router))
                down = None
            elif hasattr(mlp, "gate_up_proj"):
                def gate_up(o):
                    g, u = o.chunk(2, dim=-1)
                    put(p + "mlp.hook_pre", g)
                    put(p + "mlp.hook_pre_linear", u)
                self.on(mlp.gate_up_proj, gate_up)
            else:
                self.on(mlp.gate_proj, lambda o: put(p + "mlp.hook_pre", o))
                self.on(mlp.up_proj, lambda o: put(p + "mlp.hook_pre_linear", o))
        self.on(ln1, lambda o: put(p + "ln1.hook_normalized", o))
        self.on(ln2, lambda o: put(p + "ln2.hook_normalized", o))
        if up is not None:
            self.on(up, lambda o: put(p + "mlp.hook_pre", o))
        self.handles.append(o_proj.register_forward_pre_hook(lambda m, args: put(p + "attn.hook_z", self.heads(args[0], self.h))))
        if down is not None:
            self.handles.append(down.register_forward_pre_hook(lambda m, args: put(p + "mlp.hook_post", args[0])))

        def attn_out(m, i, o):
            if o[1] is not None:
                put(p + "attn.hook_pattern", o[1])
            if not sandwich:
                put(p + "hook_attn_out", o[0])
        self.handles.append(attn.register_forward_hook(attn_out))
        sandwich = hasattr(layer, "post_feedforward_layernorm")
        if sandwich:
            self.on(layer.post_attention_layernorm, lambda o: (put(p + "ln1_post.hook_normalized", o), put(p + "hook_attn_out", o)))
            self.on(layer.post_feedforward_layernorm, lambda o: (put(p + "ln2_post.hook_normalized", o), put(p + "hook_mlp_out", o)))
        else:
            self.on(mlp, lambda o: put(p + "hook_mlp_out", o))
        parallel = a == "pythia" and self.model.config.use_parallel_residual
        if not parallel:
            # The residual after attention is what the MLP's norm reads.
            self.pre(ln2, lambda x: put(p + "hook_resid_mid", x))

    def patch_rotary(self, layers):
        """Record what the rotary embedding returns (the one step that is not a module)."""
        if self.arch == "gpt2":
            return
        mod = sys.modules[type(layers[0].self_attn if hasattr(layers[0], "self_attn") else layers[0].attention).__module__]
        original = mod.apply_rotary_pos_emb
        state = {"layer": 0}

        def recording(q, k, *args, **kwargs):
            qr, kr = original(q, k, *args, **kwargs)
            l = state["layer"] % len(layers)
            self.put(f"blocks.{l}.attn.hook_rot_q", qr.transpose(1, 2))
            self.put(f"blocks.{l}.attn.hook_rot_k", kr.transpose(1, 2))
            state["layer"] += 1
            return qr, kr
        mod.apply_rotary_pos_emb = recording
        self.restore = lambda: setattr(mod, "apply_rotary_pos_emb", original)

    def detach(self):
        for h in self.handles:
            h.remove()
        getattr(self, "restore", lambda: None)()


def reference(model, arch, tok, out: Path, notes):
    out.mkdir(parents=True, exist_ok=True)
    c = model.config
    n_heads = c.num_attention_heads
    manifest = {
        "source": f"transformers {transformers.__version__}, torch {torch.__version__}, float32, eager attention; scripts/make_tiny_models.py",
        "model": arch, "n_layers": c.num_hidden_layers, "n_heads": n_heads,
        "n_kv_heads": getattr(c, "num_key_value_heads", None) or n_heads,
        "d_head": getattr(c, "head_dim", None) or c.hidden_size // n_heads,
        "layers_with_every_hook": None, "notes": notes, "cases": [],
    }
    for name, prompt in CASES:
        ids = tok(prompt, return_tensors="pt").input_ids
        rec = Recorder(model, arch)
        rec.attach()
        with torch.no_grad():
            logits = model(ids, output_attentions=True).logits
        rec.detach()
        rec.put("logits", logits)
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=GREEDY, do_sample=False, min_new_tokens=GREEDY)
        greedy = gen[0, ids.shape[1]:].tolist()
        tensors = dict(rec.out)
        tensors["input_ids"] = ids[0].numpy().astype(np.int64)
        tensors["greedy_continuation"] = np.array(greedy, dtype=np.int64)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / f"{name}.safetensors"))
        manifest["cases"].append({"name": name, "prompt": prompt, "add_special_tokens": True,
                                  "input_ids": ids[0].tolist(), "greedy_continuation": greedy})
        print(f"  {arch}/{name}: {len(tensors)} tensors, {ids.shape[1]} tokens")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


def convert(llama_cpp: Path, hf: Path, outfile: Path, outtype: str):
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    sys.path.insert(0, str(llama_cpp))
    import conversion.base as base
    import conversion.gemma as gemma
    # Our tiny vocabulary is byte-level BPE with GPT-2's pre-tokenizer; the converter only
    # recognizes released vocabularies by hash, and Gemma 2's wants a SentencePiece model.
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    gemma.Gemma2Model.set_vocab = lambda self: self._set_vocab_gpt2()
    # The converter reads the config through transformers 5, which moved Pythia's
    # `rotary_pct` into `rope_parameters`.
    import conversion.gptneox as gptneox
    init = gptneox.GPTNeoXModel.__init__

    def neox_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        rope = self.hparams.get("rope_parameters") or {}
        self.hparams.setdefault("rotary_pct", rope.get("partial_rotary_factor", 1.0))
    gptneox.GPTNeoXModel.__init__ = neox_init
    argv = sys.argv
    sys.argv = ["convert_hf_to_gguf.py", str(hf), "--outfile", str(outfile), "--outtype", outtype]
    try:
        runpy.run_path(str(llama_cpp / "convert_hf_to_gguf.py"), run_name="__main__")
    finally:
        sys.argv = argv


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", required=True, type=Path, help="llama.cpp source tree (with convert_hf_to_gguf.py)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--only", nargs="*", help="architectures to build (default: all)")
    ap.add_argument("--llama-quantize", type=Path, default=Path("target/llama.cpp/build/bin/llama-quantize"),
                    help="llama.cpp's llama-quantize (scripts/bench_vs_llamacpp builds it)")
    a = ap.parse_args()
    for arch, (cls_name, kwargs) in ARCHS.items():
        if a.only and arch not in a.only:
            continue
        d = a.out / arch
        shutil.rmtree(d, ignore_errors=True)
        hf = d / "hf"
        hf.mkdir(parents=True)
        make_tokenizer(hf)
        model = build(cls_name, kwargs)
        model.generation_config.pad_token_id = 0
        model.save_pretrained(hf, safe_serialization=True)
        if arch == "pythia":
            # Released Pythia checkpoints (and llama.cpp's converter) use the legacy keys.
            cfg = json.loads((hf / "config.json").read_text())
            cfg["rotary_pct"] = cfg["rope_parameters"]["partial_rotary_factor"]
            cfg["rotary_emb_base"] = cfg["rope_parameters"]["rope_theta"]
            (hf / "config.json").write_text(json.dumps(cfg, indent=2))
        tok = transformers.AutoTokenizer.from_pretrained(hf)
        reference(model, arch, tok, d / "reference", "")
        if arch == "mistral":
            # llama.cpp's converter writes no sliding window for Mistral (arch llama), so its
            # GGUFs run full attention: their oracle is the same weights without the window.
            model.config.sliding_window = None
            reference(model, arch, tok, d / "reference-gguf",
                      "the same weights with sliding_window = None: llama.cpp's converter drops Mistral's window")
        for outtype in ["f32", "q8_0"]:
            convert(a.llama_cpp, hf, d / f"model-{outtype}.gguf", outtype)
        for qtype in ["Q4_0", "Q5_0"]:
            subprocess.run([str(a.llama_quantize), str(d / "model-f32.gguf"), str(d / f"model-{qtype.lower()}.gguf"), qtype],
                           check=True, capture_output=True)
        print(f"{arch}: {sum(f.stat().st_size for f in d.rglob('*') if f.is_file()) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
