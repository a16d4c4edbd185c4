//! `glassbox-fuzz run TARGET [--seconds N] [--iterations N] [--seed S]`: fuzz one target
//! (gguf, tokenizer, safetensors, template, or `all`); a panicking input is saved under
//! `target/fuzz-crashes/` and the run fails. `glassbox-fuzz seed` rewrites the corpus.

use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use glassbox_fuzz::{fuzz, Target, TARGETS};
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(|v| v.parse::<u64>()).transpose();
    match args.first().map(String::as_str) {
        Some("seed") => seed_corpus(),
        Some("run") => {
            let which = args.get(1).context("which target? gguf, tokenizer, safetensors, template or all")?;
            let targets: Vec<Target> = match which.as_str() {
                "all" => TARGETS.to_vec(),
                t => vec![Target::parse(t).with_context(|| format!("unknown target `{t}`"))?],
            };
            let seconds = flag("--seconds")?.unwrap_or(60);
            let iterations = flag("--iterations")?.unwrap_or(u64::MAX);
            let seed = flag("--seed")?.unwrap_or(0);
            for t in targets {
                let start = Instant::now();
                match fuzz(t, seed, iterations, Some(start + Duration::from_secs(seconds))) {
                    Ok(n) => println!("{}: {n} executions in {:.0} s, no panic", t.name(), start.elapsed().as_secs_f64()),
                    Err((input, msg)) => {
                        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz-crashes");
                        std::fs::create_dir_all(&dir)?;
                        let path = dir.join(format!("{}-{:016x}.bin", t.name(), fxhash(&input)));
                        std::fs::write(&path, &input)?;
                        bail!("{}: an input panicked ({msg}); saved to {}", t.name(), path.display());
                    }
                }
            }
            Ok(())
        }
        _ => bail!("usage: glassbox-fuzz run TARGET|all [--seconds N] [--iterations N] [--seed S] | glassbox-fuzz seed"),
    }
}

fn fxhash(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, &x| (h ^ x as u64).wrapping_mul(0x100000001b3))
}

fn write_gguf(path: &std::path::Path, meta: &[(&str, gguf_file::Value)], tensors: &[(&str, QTensor)]) -> Result<()> {
    let mut f = std::fs::File::create(path)?;
    let meta: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    gguf_file::write(&mut f, &meta, &ts)?;
    Ok(())
}

fn strings(v: &[&str]) -> gguf_file::Value {
    gguf_file::Value::Array(v.iter().map(|s| gguf_file::Value::String(s.to_string())).collect())
}

/// Small, valid inputs of each kind (a few KB in all), made from nothing but this code.
fn seed_corpus() -> Result<()> {
    use gguf_file::Value as V;
    for t in TARGETS {
        std::fs::create_dir_all(t.corpus_dir())?;
    }
    let tokens = ["<unk>", "<s>", "</s>", "▁", "a", "b", "c", "▁a", "▁b", "ab", "bc", "<0x0A>", "h", "i", "▁hi", "."];
    let spm = |model: &str| -> Vec<(&str, V)> {
        vec![
            ("general.architecture", V::String("llama".into())),
            ("tokenizer.ggml.model", V::String(model.into())),
            ("tokenizer.ggml.tokens", strings(&tokens)),
            ("tokenizer.ggml.scores", V::Array((0..tokens.len()).map(|i| V::F32(-(i as f32))).collect())),
            ("tokenizer.ggml.token_type", V::Array((0..tokens.len()).map(|i| V::I32(if i < 3 { 3 } else if i == 11 { 6 } else { 1 })).collect())),
            ("tokenizer.ggml.bos_token_id", V::U32(1)),
            ("tokenizer.ggml.eos_token_id", V::U32(2)),
            ("tokenizer.chat_template", V::String("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}".into())),
        ]
    };
    write_gguf(&Target::Tokenizer.corpus_dir().join("spm.gguf"), &spm("llama"), &[])?;
    let bpe_tokens = ["a", "b", "c", "Ġ", "ab", "Ġa", "bc", "h", "i", "hi", "<|end|>"];
    let bpe = vec![
        ("general.architecture", V::String("llama".into())),
        ("tokenizer.ggml.model", V::String("gpt2".into())),
        ("tokenizer.ggml.pre", V::String("llama-bpe".into())),
        ("tokenizer.ggml.tokens", strings(&bpe_tokens)),
        ("tokenizer.ggml.token_type", V::Array((0..bpe_tokens.len()).map(|i| V::I32(if i == 10 { 3 } else { 1 })).collect())),
        ("tokenizer.ggml.merges", strings(&["a b", "Ġ a", "b c", "h i"])),
        ("tokenizer.ggml.eos_token_id", V::U32(10)),
    ];
    write_gguf(&Target::Tokenizer.corpus_dir().join("bpe.gguf"), &bpe, &[])?;

    // A one-layer Llama (hidden 32) with F32, F16 and Q8_0 weights and the SPM vocabulary.
    let (d, ff, vocab) = (32usize, 64usize, tokens.len());
    let mut meta = spm("llama");
    for (k, v) in [("embedding_length", d), ("feed_forward_length", ff), ("block_count", 1), ("attention.head_count", 2), ("attention.head_count_kv", 1), ("context_length", 64)] {
        meta.push((Box::leak(format!("llama.{k}").into_boxed_str()), V::U32(v as u32)));
    }
    meta.push(("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)));
    let w = |rows: usize, cols: usize, dtype| -> Result<QTensor> {
        let t = Tensor::randn(0f32, 0.1, (rows, cols), &Device::Cpu)?;
        Ok(QTensor::quantize(&t, dtype)?)
    };
    let ones = |n: usize| -> Result<QTensor> { Ok(QTensor::quantize(&Tensor::ones(n, candle_core::DType::F32, &Device::Cpu)?, GgmlDType::F32)?) };
    let tensors = vec![
        ("token_embd.weight", w(vocab, d, GgmlDType::F32)?),
        ("output_norm.weight", ones(d)?),
        ("blk.0.attn_norm.weight", ones(d)?),
        ("blk.0.ffn_norm.weight", ones(d)?),
        ("blk.0.attn_q.weight", w(d, d, GgmlDType::Q8_0)?),
        ("blk.0.attn_k.weight", w(16, d, GgmlDType::F16)?),
        ("blk.0.attn_v.weight", w(16, d, GgmlDType::F32)?),
        ("blk.0.attn_output.weight", w(d, d, GgmlDType::Q8_0)?),
        ("blk.0.ffn_gate.weight", w(ff, d, GgmlDType::Q8_0)?),
        ("blk.0.ffn_up.weight", w(ff, d, GgmlDType::F32)?),
        ("blk.0.ffn_down.weight", w(d, ff, GgmlDType::Q8_0)?),
    ];
    write_gguf(&Target::Gguf.corpus_dir().join("tiny-llama.gguf"), &meta, &tensors)?;

    // The weights of the fuzz target's tiny config (hidden 8, 1 layer, vocab 16).
    let mut st: HashMap<String, Tensor> = HashMap::new();
    let mut put = |name: &str, shape: &[usize]| -> Result<()> {
        st.insert(name.to_string(), Tensor::randn(0f32, 0.1, shape, &Device::Cpu)?);
        Ok(())
    };
    put("model.embed_tokens.weight", &[16, 8])?;
    put("model.norm.weight", &[8])?;
    put("model.layers.0.input_layernorm.weight", &[8])?;
    put("model.layers.0.post_attention_layernorm.weight", &[8])?;
    put("model.layers.0.self_attn.q_proj.weight", &[8, 8])?;
    put("model.layers.0.self_attn.k_proj.weight", &[4, 8])?;
    put("model.layers.0.self_attn.v_proj.weight", &[4, 8])?;
    put("model.layers.0.self_attn.o_proj.weight", &[8, 8])?;
    put("model.layers.0.mlp.gate_proj.weight", &[16, 8])?;
    put("model.layers.0.mlp.up_proj.weight", &[16, 8])?;
    put("model.layers.0.mlp.down_proj.weight", &[8, 16])?;
    candle_core::safetensors::save(&st, Target::Safetensors.corpus_dir().join("tiny.safetensors"))?;

    let templates = [
        ("chatml.jinja", "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
        ("inst.jinja", "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}{% else %}{{ ' ' + message['content'] | trim + eos_token }}{% endif %}{% endfor %}"),
        ("namespace.jinja", "{%- set ns = namespace(sys='') -%}{%- for m in messages -%}{%- if m.role == 'system' -%}{%- set ns.sys = m.content -%}{%- endif -%}{%- endfor -%}Today is {{ strftime_now('%d %b %Y') }}. {{ ns.sys }}\n{%- for m in messages if m.role != 'system' %}\n{{ m.role | upper }}: {{ m.content | tojson }}{% endfor %}"),
    ];
    for (name, src) in templates {
        std::fs::write(Target::Template.corpus_dir().join(name), src)?;
    }
    println!("corpus written under {}", Target::Gguf.corpus_dir().parent().unwrap_or(std::path::Path::new(".")).display());
    Ok(())
}
