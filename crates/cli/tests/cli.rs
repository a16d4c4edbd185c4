//! The `glassbox` binary: what users type, and what they see when they get it wrong.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

fn glassbox(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_glassbox")).args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails with a message that contains `msg`, without a panic.
fn check_error(args: &[&str], msg: &str) {
    let o = glassbox(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "{args:?} succeeded");
    assert!(err.contains(msg), "{args:?}: stderr {err:?} does not mention {msg:?}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
}

#[test]
fn generate_prints_the_reference_continuation() {
    let model = shared().join("models/stories260K");
    let o = glassbox(&["generate", "--model", model.to_str().unwrap(), "--prompt", "Once upon a time", "--max-tokens", "24"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim_end(), ", there was a little girl named Lily. She loved to play outside in the p");
}

#[test]
fn generate_writes_captures_as_safetensors() {
    let model = shared().join("models/stories260K.gguf");
    let model = if model.exists() { model } else { shared().join("models/stories260K/stories260K.gguf") };
    let out = std::env::temp_dir().join(format!("glassbox-cap-{}.safetensors", std::process::id()));
    let o = glassbox(&[
        "generate", "--model", model.to_str().unwrap(), "--prompt", "Once upon a time", "--max-tokens", "4",
        "--capture", "blocks.{0,4}.hook_resid_post", "--capture", "blocks.1.attn.hook_pattern", "--capture", "logits",
        "--capture-positions", "all", "--capture-out", out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<_> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    assert_eq!(names, ["blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern", "blocks.4.hook_resid_post", "logits"]);
    // 5 prompt tokens + 3 generated positions fed back (the 4th token is never fed).
    assert_eq!(st.tensor("blocks.0.hook_resid_post").unwrap().shape(), &[8, 64]);
    assert_eq!(st.tensor("blocks.1.attn.hook_pattern").unwrap().shape(), &[8, 8, 8]);
    assert_eq!(st.tensor("logits").unwrap().shape(), &[8, 512]);
    let _ = std::fs::remove_file(out);
}

#[test]
fn tokenize_and_decode() {
    let vocab = shared().join("tokenizers/ggml-vocab-llama-bpe.gguf");
    let o = glassbox(&["tokenize", "--model", vocab.to_str().unwrap(), "Hello world<|begin_of_text|>"]);
    assert_eq!(stdout(&o).trim(), "9906 1917 128000");
    let o = glassbox(&["tokenize", "--model", vocab.to_str().unwrap(), "--add-special", "Hello"]);
    assert_eq!(stdout(&o).trim(), "128000 9906");
    let o = glassbox(&["tokenize", "--model", vocab.to_str().unwrap(), "--decode", "9906", "1917"]);
    assert_eq!(stdout(&o).trim_end(), "Hello world");
    // Standard input is read byte for byte: the trailing newline is a token.
    let mut child = Command::new(env!("CARGO_BIN_EXE_glassbox"))
        .args(["tokenize", "--model", vocab.to_str().unwrap(), "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"Hello\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(stdout(&o).trim(), "9906 198");
}

#[test]
fn render_chat_prints_the_prompt() {
    let dir = std::env::temp_dir().join(format!("glassbox-chat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let msgs = dir.join("m.json");
    std::fs::write(&msgs, r#"[{"role": "user", "content": "What is 2+2?"}]"#).unwrap();
    let tmpl = shared().join("chat-templates/google-gemma-2-2b-it.jinja");
    let o = glassbox(&[
        "render-chat", "--chat-template", tmpl.to_str().unwrap(), "--messages", msgs.to_str().unwrap(),
        "--add-generation-prompt", "--var", "bos_token=<s>",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "<s><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n");
    let model = shared().join("models/smollm2-135m-instruct");
    let o = glassbox(&["render-chat", "--model", model.to_str().unwrap(), "--messages", msgs.to_str().unwrap()]);
    assert_eq!(stdout(&o), "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n");
    std::fs::write(&msgs, r#"[{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]"#).unwrap();
    check_error(&["render-chat", "--chat-template", tmpl.to_str().unwrap(), "--messages", msgs.to_str().unwrap()], "System role not supported");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_input_gives_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("glassbox-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let stories = shared().join("models/stories260K");
    let p = |s: &Path| s.to_str().unwrap().to_string();

    check_error(&["generate", "--model", &p(&dir.join("nope.gguf")), "--prompt", "x"], "model not found");

    // A truncated GGUF and a truncated safetensors file.
    let gguf = std::fs::read(stories.join("stories260K.gguf")).unwrap();
    std::fs::write(dir.join("cut.gguf"), &gguf[..gguf.len() / 2]).unwrap();
    check_error(&["generate", "--model", &p(&dir.join("cut.gguf")), "--prompt", "x"], "truncated GGUF file");
    let cut = dir.join("cut");
    std::fs::create_dir_all(&cut).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(stories.join(f), cut.join(f)).unwrap();
    }
    let st = std::fs::read(stories.join("model.safetensors")).unwrap();
    std::fs::write(cut.join("model.safetensors"), &st[..st.len() - 1000]).unwrap();
    check_error(&["generate", "--model", &p(&cut), "--prompt", "x"], "truncated safetensors file");

    // Unknown architecture; a config missing a field.
    let arch = dir.join("arch");
    std::fs::create_dir_all(&arch).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(stories.join(f), arch.join(f)).unwrap();
    }
    let cfg = std::fs::read_to_string(stories.join("config.json")).unwrap();
    std::fs::write(arch.join("config.json"), cfg.replace("\"llama\"", "\"mamba\"")).unwrap();
    check_error(&["generate", "--model", &p(&arch), "--prompt", "x"], "unsupported architecture `mamba`");
    std::fs::write(arch.join("config.json"), cfg.replace("\"num_hidden_layers\": 5,", "")).unwrap();
    check_error(&["generate", "--model", &p(&arch), "--prompt", "x"], "config is missing `num_hidden_layers`");

    // A GGUF whose tensor has a type glassbox cannot read (type id 99).
    let mut bad = gguf.clone();
    let pos = find_tensor_type(&bad);
    bad[pos..pos + 4].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(dir.join("type.gguf"), &bad).unwrap();
    check_error(&["generate", "--model", &p(&dir.join("type.gguf")), "--prompt", "x"], "unknown dtype for tensor 99");

    // An unknown hook name.
    check_error(&["generate", "--model", &p(&stories), "--prompt", "x", "--capture", "blocks.0.hook_nope"], "unknown hook name `blocks.0.hook_nope`");
    check_error(&["generate", "--model", &p(&stories), "--prompt", "x", "--capture", "blocks.9.hook_resid_pre"], "matches no hook point");
    let _ = std::fs::remove_dir_all(dir);
}

/// Byte offset of the first tensor-info's type field in a GGUF v3 file.
fn find_tensor_type(b: &[u8]) -> usize {
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap()) as usize;
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap()) as usize;
    let n_kv = u64_at(16);
    let mut i = 24;
    // Skip a value of type t at i.
    fn skip(b: &[u8], i: usize, t: usize) -> usize {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap()) as usize;
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap()) as usize;
        match t {
            0 | 1 | 7 => i + 1,
            2 | 3 => i + 2,
            4..=6 => i + 4,
            10..=12 => i + 8,
            8 => i + 8 + u64_at(i),
            9 => {
                let (et, n) = (u32_at(i), u64_at(i + 4));
                let mut j = i + 12;
                for _ in 0..n {
                    j = skip(b, j, et);
                }
                j
            }
            _ => panic!("bad gguf value type {t}"),
        }
    }
    for _ in 0..n_kv {
        i += 8 + u64_at(i); // key
        let t = u32_at(i);
        i = skip(b, i + 4, t);
    }
    // First tensor info: name, n_dims, dims, type.
    i += 8 + u64_at(i);
    let n_dims = u32_at(i);
    i + 4 + 8 * n_dims
}

/// A crash dump of four requests, the third (seed 666) failing in `phase`, written by the
/// engine library under test fault injection.
fn crash_dump(dir: &Path, phase: glassbox_engine::fault::Phase) -> PathBuf {
    use glassbox_engine::fault::{FaultKind, FaultPlan};
    use glassbox_engine::{EngineConfig, EngineCore, KvMemory};
    use glassbox_protocol::{EngineRequest, SamplingParams};
    let model = glassbox_model::load(&glassbox_model::ModelSource::HfDir(shared().join("models/stories260K")), Default::default()).unwrap();
    let cfg = EngineConfig { kv_cache_memory: KvMemory::Bytes(16 << 20), crash_dump_dir: Some(dir.to_path_buf()), ..Default::default() };
    let mut core = EngineCore::new(std::sync::Arc::new(model), cfg).unwrap();
    core.set_fault(Some(FaultPlan { phase, kind: FaultKind::Panic, seed: 666 }));
    for (i, text) in ["Once upon a time", "Lily and Tom", "The cat sat", "One day"].iter().enumerate() {
        let prompt = core.model().tokenizer.encode(text, true).unwrap();
        let sampling = SamplingParams { max_tokens: 10, temperature: 0.9, seed: Some(if i == 2 { 666 } else { i as u64 }), ..Default::default() };
        core.add_request(EngineRequest { id: i as u64, prompt, sampling, capture: None, ..Default::default() });
    }
    while core.has_work() {
        core.step();
    }
    let dumps: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(dumps.len(), 1, "{dumps:?}");
    dumps[0].clone()
}

#[test]
fn replay_reproduces_an_injected_fault_and_names_the_request() {
    use glassbox_engine::fault::Phase;
    for (phase, name) in [(Phase::Schedule, "schedule"), (Phase::Forward, "forward"), (Phase::Sample, "sample"), (Phase::Detokenize, "detokenize"), (Phase::Hook, "hook")] {
        let dir = std::env::temp_dir().join(format!("glassbox-replay-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let dump = crash_dump(&dir, phase);
        let run = |fault: Option<String>| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_glassbox"));
            cmd.args(["replay", dump.to_str().unwrap()]);
            match fault {
                Some(f) => cmd.env("GLASSBOX_FAULT", f),
                None => cmd.env_remove("GLASSBOX_FAULT"),
            };
            cmd.output().unwrap()
        };
        // The same fault active: it reproduces, alone and in the batch, for request 2 only.
        let o = run(Some(format!("{name}:panic:666")));
        let out = stdout(&o);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        assert!(out.contains("verdict: the failure reproduces for request(s) 2 alone (recorded: 2)"), "{name}: {out}");
        assert_eq!(out.matches("request 2: FAILED").count(), 2, "{name}: {out}");
        assert!(!out.contains("request 0: FAILED") && !out.contains("DIVERGES"), "{name}: {out}");
        // Without it (the bug fixed, say): it does not.
        let out = stdout(&run(None));
        assert!(out.contains("verdict: the failure does not reproduce (recorded for request(s) 2)"), "{name}: {out}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn replay_of_a_state_dump_matches_the_recorded_tokens() {
    use glassbox_engine::{EngineConfig, EngineCore, KvMemory};
    use glassbox_protocol::{EngineRequest, SamplingParams};
    let dir = std::env::temp_dir().join(format!("glassbox-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let model = glassbox_model::load(&glassbox_model::ModelSource::HfDir(shared().join("models/stories260K")), Default::default()).unwrap();
    let cfg = EngineConfig { kv_cache_memory: KvMemory::Bytes(16 << 20), crash_dump_dir: Some(dir.clone()), ..Default::default() };
    let mut core = EngineCore::new(std::sync::Arc::new(model), cfg).unwrap();
    for (i, text) in ["Once upon a time", "Lily and Tom"].iter().enumerate() {
        let prompt = core.model().tokenizer.encode(text, true).unwrap();
        // Unseeded: the dump records the seed the engine chose.
        let sampling = SamplingParams { max_tokens: 12, temperature: 1.0, ..Default::default() };
        core.add_request(EngineRequest { id: i as u64, prompt, sampling, capture: None, ..Default::default() });
    }
    for _ in 0..5 {
        core.step();
    }
    let dump = core.dump_state("test").unwrap();
    let o = glassbox(&["replay", dump.to_str().unwrap()]);
    let out = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    // Together and alone, both requests reproduce their 5 recorded sampled tokens exactly.
    assert_eq!(out.matches("matches the 5 recorded token(s)").count(), 4, "{out}");
    assert!(out.contains("does not reproduce"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dump_diff_names_the_first_diverging_hook() {
    let dir = std::env::temp_dir().join(format!("glassbox-diff-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let stories = shared().join("models/stories260K");
    // The same model with layer 2's down projection scaled by 1.01.
    let perturbed = dir.join("perturbed");
    std::fs::create_dir_all(&perturbed).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(stories.join(f), perturbed.join(f)).unwrap();
    }
    let mut weights = candle_core::safetensors::load(stories.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let name = "model.layers.2.mlp.down_proj.weight";
    let w = (weights[name].clone() * 1.01).unwrap();
    weights.insert(name.to_string(), w);
    candle_core::safetensors::save(&weights, perturbed.join("model.safetensors")).unwrap();
    let capture = |model: &Path, out: &Path| {
        let o = glassbox(&["generate", "--model", model.to_str().unwrap(), "--prompt", "Once upon a time", "--max-tokens", "4", "--capture", "*", "--capture-out", out.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    let (a, b) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
    capture(&stories, &a);
    capture(&perturbed, &b);
    let o = glassbox(&["dump", "diff", a.to_str().unwrap(), a.to_str().unwrap()]);
    assert!(o.status.success() && stdout(&o).contains("no divergence over"), "{}{}", stdout(&o), stderr(&o));
    let o = glassbox(&["dump", "diff", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("first divergence: blocks.2.hook_mlp_out"), "{}{}", stdout(&o), stderr(&o));
    // Everything before it agrees exactly.
    let table = stdout(&o);
    let before = table.lines().take_while(|l| !l.starts_with("blocks.2.hook_mlp_out")).filter(|l| l.contains("diverges")).count();
    assert_eq!(before, 0, "{table}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `bench one-batch`: a row per (input length, batch size) with prefill and decode rates and
/// peak memory, in the JSON too.
#[test]
fn bench_one_batch_reports_every_configuration() {
    let model = shared().join("models/stories260K");
    let out = std::env::temp_dir().join(format!("glassbox-one-batch-{}.json", std::process::id()));
    let o = glassbox(&["bench", "one-batch", "--model", model.to_str().unwrap(), "--batch-size", "1,3", "--input-len", "8,20", "--output-len", "5", "--output-json", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("prefill tok/s"), "{}", stdout(&o));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let rows = report["results"].as_array().unwrap();
    let configs: Vec<(u64, u64)> = rows.iter().map(|r| (r["input_len"].as_u64().unwrap(), r["batch_size"].as_u64().unwrap())).collect();
    assert_eq!(configs, [(8, 1), (8, 3), (20, 1), (20, 3)]);
    for r in rows {
        assert_eq!(r["decode_steps"], 4, "output_len 5: one token from the prefill step, then 4 decode steps");
        for k in ["prefill_tokens_per_s", "decode_tokens_per_s", "decode_step_ms_median", "peak_rss_mib"] {
            assert!(r[k].as_f64().unwrap() > 0.0, "{k}: {r}");
        }
    }
    let _ = std::fs::remove_file(out);
    check_error(&["bench", "one-batch", "--model", model.to_str().unwrap(), "--batch-size", "0"], "must be positive");
}
