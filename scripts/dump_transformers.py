#!/usr/bin/env python3
"""Run a Hugging Face transformers model on one prompt and write a capture file in
glassbox's layout and names (HOOKS.md), so `glassbox dump diff` can compare glassbox with
transformers hook by hook:

    python scripts/dump_transformers.py --model ../shared/models/stories260K \
        --prompt "Once upon a time" --out theirs.safetensors
    glassbox generate --model ../shared/models/stories260K --prompt "Once upon a time" \
        --max-tokens 1 --capture '*' --capture-positions prompt --capture-out ours.safetensors
    glassbox dump diff ours.safetensors theirs.safetensors --atol 1e-4 --rtol 1e-3

Needs `pip install torch transformers safetensors numpy`. Llama-family models (Llama,
Mistral, Qwen2/3) and Gemma 3 (sandwich norms). The prompt's positions are captured (one
forward pass, float32, eager attention); tensors drop the batch axis: `[T, d]`, heads as
`[T, H, d_head]`, patterns as `[H, T, T]`.
"""

import argparse
import json
import sys

import numpy as np
import torch
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama import modeling_llama


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a Hugging Face model directory")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--out", required=True, help="the capture file to write (.safetensors)")
    ap.add_argument("--no-special", action="store_true", help="tokenize without BOS/special tokens")
    a = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ids = tok(a.prompt, add_special_tokens=not a.no_special, return_tensors="pt").input_ids
    cfg = model.config
    text_cfg = getattr(cfg, "text_config", cfg)
    n_heads = text_cfg.num_attention_heads
    n_kv = getattr(text_cfg, "num_key_value_heads", n_heads)
    d_head = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // n_heads

    out = {}

    def put(name, t):
        out[name] = t.detach().float()[0].contiguous().numpy() if t.dim() > 1 and t.shape[0] == 1 else t.detach().float().numpy()

    def heads(t, h):
        return t.reshape(t.shape[0], t.shape[1], h, d_head)

    hooks = []
    inner = model.model
    layers = inner.layers
    gemma = hasattr(layers[0], "pre_feedforward_layernorm")

    def on(module, fn):
        """Call fn with the module's output (the first element of a tuple output)."""
        def hook(m, i, o):
            fn(o[0] if isinstance(o, tuple) else o)  # returns None: the output is not replaced
        hooks.append(module.register_forward_hook(hook))

    # The embedding as the first layer sees it (Gemma scales it inside the model).
    hooks.append(layers[0].register_forward_pre_hook(lambda m, args, kwargs: put("hook_embed", kwargs.get("hidden_states", args[0] if args else None)), with_kwargs=True))
    for l, layer in enumerate(layers):
        p = f"blocks.{l}."
        state = {}

        def pre_layer(m, args, kwargs, p=p, state=state):
            x = kwargs.get("hidden_states", args[0] if args else None)
            state["resid_pre"] = x
            put(p + "hook_resid_pre", x)
        hooks.append(layer.register_forward_pre_hook(pre_layer, with_kwargs=True))
        on(layer.input_layernorm, lambda o, p=p: put(p + "ln1.hook_normalized", o))
        at = layer.self_attn
        on(at.q_proj, lambda o, p=p: put(p + "attn.hook_q", heads(o, n_heads)))
        on(at.k_proj, lambda o, p=p: put(p + "attn.hook_k", heads(o, n_kv)))
        on(at.v_proj, lambda o, p=p: put(p + "attn.hook_v", heads(o, n_kv)))
        if getattr(at, "q_norm", None) is not None:
            on(at.q_norm, lambda o, p=p: put(p + "attn.hook_q_normed", o.transpose(1, 2) if o.shape[1] == n_heads and o.shape[2] != n_heads else o))
            on(at.k_norm, lambda o, p=p: put(p + "attn.hook_k_normed", o.transpose(1, 2) if o.shape[1] == n_kv and o.shape[2] != n_kv else o))
        hooks.append(at.o_proj.register_forward_pre_hook(lambda m, args, p=p: put(p + "attn.hook_z", heads(args[0], n_heads))))

        def attn_out(m, i, o, p=p, state=state):
            a_out, weights = o[0], o[1]
            if weights is not None:
                put(p + "attn.hook_pattern", weights)
            state["attn"] = a_out
        hooks.append(at.register_forward_hook(attn_out))
        if gemma:
            on(layer.post_attention_layernorm, lambda o, p=p, state=state: (put(p + "ln1_post.hook_normalized", o), put(p + "hook_attn_out", o), state.__setitem__("attn", o)))
            on(layer.pre_feedforward_layernorm, lambda o, p=p, state=state: (put(p + "hook_resid_mid", state["resid_pre"] + state["attn"]), put(p + "ln2.hook_normalized", o)))
            on(layer.post_feedforward_layernorm, lambda o, p=p: (put(p + "ln2_post.hook_normalized", o), put(p + "hook_mlp_out", o)))
        else:
            on(layer.post_attention_layernorm, lambda o, p=p, state=state: (put(p + "hook_attn_out", state["attn"]), put(p + "hook_resid_mid", state["resid_pre"] + state["attn"]), put(p + "ln2.hook_normalized", o)))
            on(layer.mlp, lambda o, p=p: put(p + "hook_mlp_out", o))
        mlp = layer.mlp
        on(mlp.gate_proj, lambda o, p=p: put(p + "mlp.hook_pre", o))
        on(mlp.up_proj, lambda o, p=p: put(p + "mlp.hook_pre_linear", o))
        hooks.append(mlp.down_proj.register_forward_pre_hook(lambda m, args, p=p: put(p + "mlp.hook_post", args[0])))
        on(layer, lambda o, p=p: put(p + "hook_resid_post", o))
    on(inner.norm, lambda o: put("ln_final.hook_normalized", o))

    # Rotated q and k: record what the rotary embedding returns (the one non-module step).
    rot = {"layer": 0}
    original = modeling_llama.apply_rotary_pos_emb

    def recording(q, k, *args, **kwargs):
        qr, kr = original(q, k, *args, **kwargs)
        l = rot["layer"]
        put(f"blocks.{l}.attn.hook_rot_q", qr.transpose(1, 2))
        put(f"blocks.{l}.attn.hook_rot_k", kr.transpose(1, 2))
        rot["layer"] += 1
        return qr, kr
    attn_module = sys.modules[type(layers[0].self_attn).__module__]
    original = getattr(attn_module, "apply_rotary_pos_emb", original)
    attn_module.apply_rotary_pos_emb = recording

    with torch.no_grad():
        logits = model(ids, output_attentions=True).logits
    put("logits", logits)
    for h in hooks:
        h.remove()
    n = ids.shape[1]
    meta = {"positions": json.dumps(list(range(n))), "token_ids": json.dumps(ids[0].tolist()), "source": "transformers"}
    for name in out:
        meta[f"positions.{name}"] = json.dumps(list(range(n)))
    save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, a.out, metadata=meta)
    print(f"wrote {len(out)} tensors for {n} positions to {a.out}")


if __name__ == "__main__":
    main()
