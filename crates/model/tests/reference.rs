//! Every tensor of every case in ../shared/reference, against transformers (float32, eager).
//!
//! Tolerance: for each tensor, max |ours - reference| <= TOL * max |reference|, TOL = 1e-4.
//! Reached (the test prints the worst tensors): stories260K 3.9e-6, SmolLM2 (Q4_1 dequantized)
//! 5.1e-6, Gemma 3 (Q4_K_M dequantized) 3.9e-6. A real bug (wrong RoPE, norm, permuted heads)
//! misses by orders of magnitude.

use candle_core::{Device, Tensor};
use glassbox_model::{
    load, BatchLayout, CaptureCollector, ContiguousKvCache, HookHandler, HookSet, ForwardCtx, LoadOptions, LogitRows,
    ModelSource,
};
use glassbox_protocol::{CapturePositions, CaptureSpec, HookName};
use std::path::{Path, PathBuf};

const TOL: f32 = 1e-4;

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

struct Case {
    name: String,
    prompt: String,
    add_special: bool,
    tensors: std::collections::HashMap<String, Tensor>,
}

fn cases_in(dir: &Path) -> Vec<Case> {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    manifest["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let name = c["name"].as_str().unwrap().to_string();
            let tensors = candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu).unwrap();
            let prompt = c["prompt"].as_str().unwrap().to_string();
            Case { name, prompt, add_special: c["add_special_tokens"].as_bool().unwrap(), tensors }
        })
        .collect()
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_dtype(candle_core::DType::I64).unwrap().to_vec1::<i64>().unwrap().iter().map(|&v| v as u32).collect()
}

/// Compare every hook and the logits of each case; then greedy decoding token for token.
fn check_model(source: ModelSource, reference: &str) {
    check_model_in(source, &shared().join("reference").join(reference), reference, false)
}

/// `complete`: the reference holds every hook of every layer, so the model may have no others.
fn check_model_in(source: ModelSource, dir: &Path, reference: &str, complete: bool) {
    let m = load(&source, LoadOptions { dequantize: true, ..Default::default() }).unwrap();
    let available = m.model.hook_names();
    let mut worst_overall = 0f32;
    let mut compared = 0;
    for case in cases_in(dir) {
        let input = ids(&case.tensors["input_ids"]);
        let encoded = m.tokenizer.encode(&case.prompt, case.add_special).unwrap();
        assert_eq!(encoded, input, "{reference}/{}: tokenization of the prompt", case.name);
        let hooks: Vec<HookName> = case
            .tensors
            .keys()
            .filter(|k| *k != "input_ids" && *k != "greedy_continuation")
            .map(|k| k.parse().unwrap_or_else(|e| panic!("{k}: {e}")))
            .collect();
        for h in &hooks {
            assert!(available.contains(h), "model lacks hook {h}");
        }
        if complete {
            // The tiny models' oracle records every hook: the model must not claim more.
            let extra: Vec<String> = available.iter().filter(|h| !hooks.contains(h)).map(|h| h.to_string()).collect();
            assert!(extra.is_empty(), "{reference}: hooks the oracle does not have: {extra:?}");
        }
        let mut collector = CaptureCollector::default();
        collector.want(0, CaptureSpec { hooks: hooks.clone(), positions: CapturePositions::All, dtype: Default::default() }, input.len());
        let set: HookSet = collector.hook_set();
        let layout = BatchLayout::single(input.len(), 0, LogitRows::All);
        let mut cache = ContiguousKvCache::default();
        let logits = {
            let handler: &mut dyn HookHandler = &mut collector;
            m.model.forward(&input, &mut ForwardCtx::new(&layout, &mut cache).with_hooks(&set, handler)).unwrap()
        };
        let captures = collector.finish(0).unwrap();
        let mut report = vec![];
        for cap in &captures {
            let name = cap.hook.to_string();
            let want = &case.tensors[&name];
            assert_eq!(cap.shape, want.dims(), "{}/{name}: shape", case.name);
            let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            let got = cap.to_f32();
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-6);
            let err = got.iter().zip(&want).fold(0f32, |a, (g, w)| a.max((g - w).abs()));
            report.push((err / scale, name, err, scale));
        }
        // The logits returned by forward are the same tensor as the captured hook.
        let lg: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = case.tensors["logits"].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(lg.len(), want.len());
        report.sort_by(|a, b| b.0.total_cmp(&a.0));
        println!("{reference}/{}: worst relative errors", case.name);
        for (rel, name, err, scale) in report.iter().take(5) {
            println!("  {rel:.2e}  {name} (abs {err:.2e}, scale {scale:.2e})");
        }
        for (rel, name, ..) in &report {
            assert!(*rel <= TOL, "{reference}/{}: {name} relative error {rel:.2e} > {TOL:.0e}", case.name);
            worst_overall = worst_overall.max(*rel);
        }
        compared += report.len();

        // Greedy continuation, one token per step through the KV cache.
        let expect = ids(&case.tensors["greedy_continuation"]);
        let mut cache = ContiguousKvCache::default();
        let mut tokens = input.clone();
        let mut step_input = input.clone();
        let mut got = vec![];
        for _ in 0..expect.len() {
            let pos = tokens.len() - step_input.len();
            let layout = BatchLayout::single(step_input.len(), pos, LogitRows::Last);
            let logits = m.model.forward(&step_input, &mut ForwardCtx::new(&layout, &mut cache)).unwrap();
            let next = logits.squeeze(0).unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
            got.push(next);
            tokens.push(next);
            step_input = vec![next];
        }
        assert_eq!(got, expect, "{reference}/{}: greedy continuation", case.name);
    }
    println!("{reference}: worst relative error over all {compared} tensors {worst_overall:.2e}");
    // Every hook the model has was in the reference (the oracle records them all here).
    assert!(compared > 0, "{reference}: no tensors compared");
}

#[test]
fn stories260k_safetensors_matches_reference() {
    check_model(ModelSource::HfDir(shared().join("models/stories260K")), "stories260K");
}

#[test]
fn stories260k_gguf_matches_reference() {
    check_model(ModelSource::Gguf(shared().join("models/stories260K/stories260K.gguf")), "stories260K");
}

#[test]
fn smollm2_dequantized_matches_reference() {
    let path = glassbox_model::fetch::DEFAULT_MODEL.ensure().unwrap();
    check_model(ModelSource::Gguf(path), "smollm2-135m-instruct");
}

#[test]
fn gemma3_dequantized_matches_reference() {
    let path = glassbox_model::fetch::GEMMA3_270M.ensure().unwrap();
    check_model(ModelSource::Gguf(path), "gemma-3-270m-it");
}

/// The quantized path (weights stay in GGUF blocks, activations quantized to 8 bits as
/// llama.cpp does) against the reference logits: mean KL(reference || ours) over every position,
/// and greedy decoding compared token for token (differences are printed, not failed: the
/// reference was computed on dequantized weights with float activations).
fn check_quantized(source: ModelSource, reference: &str, max_mean_kl: f64) {
    check_quantized_in(source, &shared().join("reference").join(reference), reference, max_mean_kl)
}

/// Log-probabilities `[positions, vocab]` of `m` over a whole prompt.
fn log_probs(m: &glassbox_model::LoadedModel, input: &[u32]) -> Vec<Vec<f32>> {
    let layout = BatchLayout::single(input.len(), 0, LogitRows::All);
    let logits = m.model.forward(input, &mut ForwardCtx::new(&layout, &mut ContiguousKvCache::default())).unwrap();
    candle_nn::ops::log_softmax(&logits, 1).unwrap().to_vec2::<f32>().unwrap()
}

/// KL(p || q) per position, from log-probabilities.
fn kls(p: &[Vec<f32>], q: &[Vec<f32>]) -> Vec<f64> {
    p.iter().zip(q).map(|(p, q)| p.iter().zip(q).map(|(&lp, &lq)| (lp as f64).exp() * (lp as f64 - lq as f64)).sum()).collect()
}

fn check_quantized_in(source: ModelSource, dir: &Path, reference: &str, max_mean_kl: f64) {
    let m = load(&source, LoadOptions::default()).unwrap();
    let mut kls_all = vec![];
    for case in cases_in(dir) {
        let input = ids(&case.tensors["input_ids"]);
        let refs = candle_nn::ops::log_softmax(&case.tensors["logits"], 1).unwrap().to_vec2::<f32>().unwrap();
        kls_all.extend(kls(&refs, &log_probs(&m, &input)));
        let expect = ids(&case.tensors["greedy_continuation"]);
        let mut cache = ContiguousKvCache::default();
        let (mut step, mut pos, mut got) = (input.clone(), 0, vec![]);
        for _ in 0..expect.len() {
            let layout = BatchLayout::single(step.len(), pos, LogitRows::Last);
            let logits = m.model.forward(&step, &mut ForwardCtx::new(&layout, &mut cache)).unwrap();
            let next = logits.squeeze(0).unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
            pos += step.len();
            got.push(next);
            step = vec![next];
        }
        let same = got.iter().zip(&expect).take_while(|(a, b)| a == b).count();
        println!(
            "{reference}/{}: greedy agrees on {same}/{} tokens: {:?}",
            case.name,
            expect.len(),
            m.tokenizer.decode(&got, false).unwrap()
        );
    }
    let mean = kls_all.iter().sum::<f64>() / kls_all.len() as f64;
    let max = kls_all.iter().cloned().fold(0.0, f64::max);
    println!("{reference}: quantized path KL(ref||ours) mean {mean:.2e}, max {max:.2e} over {} positions", kls_all.len());
    assert!(mean <= max_mean_kl, "{reference}: mean KL {mean:.3e} > {max_mean_kl:.0e}");
}

/// Measured: mean KL 3.8e-3 (max 2.5e-2). `chat_hi` and `code` agree on every token; `capital`
/// on the first 5 (" Paris.\n\n", then another sentence). Every matmul quantizes activations
/// to 8 bits per block of 32 (Q4_1 times Q8_1, Q8_0 times Q8_0, as llama.cpp computes them).
/// Before Q4_1 moved from the exact f32 expansion to integer dots: 5.5e-4, every token equal.
/// The dequantized path reproduces the reference (`smollm2_dequantized_matches_reference`).
#[test]
fn smollm2_quantized_path_kl() {
    check_quantized(ModelSource::Gguf(glassbox_model::fetch::DEFAULT_MODEL.ensure().unwrap()), "smollm2-135m-instruct", 6e-3);
}

/// Measured: mean KL 8.1e-3 (max 2.3e-2; 7.6e-3 while the K-quants ran on candle's kernels,
/// 6.2e-3 before Q5_0 moved to integer dots too).
/// `chat_capital` agrees on all 12 tokens; the open-ended `hello` ("Hello" -> ",") agrees on
/// the first token and then picks another continuation: every matmul quantizes activations to
/// 8 bits (as llama.cpp does), and after "Hello," the model's top choices are close. The
/// dequantized path reproduces the reference exactly (gemma3_dequantized_matches_reference).
#[test]
fn gemma3_quantized_path_kl() {
    check_quantized(ModelSource::Gguf(glassbox_model::fetch::GEMMA3_270M.ensure().unwrap()), "gemma-3-270m-it", 1.5e-2);
}

// ---- Tiny random-weight models of every architecture (scripts/make_tiny_models.py) ----
//
// Each directory holds the Hugging Face checkpoint, llama.cpp's f32 and Q8_0 conversions and
// the transformers oracle (every hook of every layer). Tolerances: every hook and the logits
// within TOL (1e-4 of scale) from the checkpoint and the f32 GGUF, greedy continuations
// identical; the Q8_0 GGUF (weights and activations in 8 bits) within a mean KL bound (see
// `check_tiny`); logits bitwise identical alone and in a batch of 8.

fn tiny(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny").join(arch)
}

/// `max_kl`: mean KL bound for the Q8_0 GGUF. 1e-3 for dense models; 3e-3 for mixtures of
/// experts, where 8-bit noise can flip a token's choice of expert (a discrete change: measured
/// Mixtral 7.8e-4 mean with one position at 2.5e-2).
fn check_tiny(arch: &str, max_kl: f64) {
    let dir = tiny(arch);
    let reference = dir.join("reference");
    // Where llama.cpp's converter drops part of the model (Mistral's window), the GGUFs have
    // their own oracle: the same weights without that part.
    let gguf_reference = Some(dir.join("reference-gguf")).filter(|d| d.is_dir()).unwrap_or_else(|| reference.clone());
    check_model_in(ModelSource::HfDir(dir.join("hf")), &reference, &format!("{arch} (hf)"), true);
    check_model_in(ModelSource::Gguf(dir.join("model-f32.gguf")), &gguf_reference, &format!("{arch} (gguf f32)"), true);
    check_quantized_in(ModelSource::Gguf(dir.join("model-q8_0.gguf")), &gguf_reference, &format!("{arch} (gguf q8_0)"), max_kl);
    for source in [ModelSource::HfDir(dir.join("hf")), ModelSource::Gguf(dir.join("model-q8_0.gguf")), ModelSource::Gguf(dir.join("model-q4_0.gguf"))] {
        check_batch_invariance(&source, arch);
    }
    check_integer_path(&dir.join("model-q4_0.gguf"), &reference, &format!("{arch} (gguf q4_0)"));
    check_integer_path(&dir.join("model-q5_0.gguf"), &reference, &format!("{arch} (gguf q5_0)"));
}

/// Q4_0 and Q5_0 run integer dot products over 8-bit activations by default (llama.cpp's
/// arithmetic) and the exact f32 expansion under `dequantize`: on the same file, the default path's
/// logits stay within a mean KL of 2e-3 of the exact path's (what quantizing the activations
/// costs; measured values printed).
fn check_integer_path(path: &Path, reference: &Path, arch: &str) {
    let fast = load(&ModelSource::Gguf(path.to_path_buf()), LoadOptions::default()).unwrap();
    let exact = load(&ModelSource::Gguf(path.to_path_buf()), LoadOptions { dequantize: true, ..Default::default() }).unwrap();
    let mut kls_all = vec![];
    for case in cases_in(reference) {
        let input = ids(&case.tensors["input_ids"]);
        kls_all.extend(kls(&log_probs(&exact, &input), &log_probs(&fast, &input)));
    }
    let mean = kls_all.iter().sum::<f64>() / kls_all.len() as f64;
    println!("{arch}: integer path vs exact path, mean KL {mean:.2e}, max {:.2e}", kls_all.iter().cloned().fold(0.0, f64::max));
    assert!(mean <= 2e-3, "{arch}: integer path mean KL {mean:.3e} > 2e-3 against the exact path");
}

/// Logits of one sequence alone and inside a batch of 8 (mixed lengths, then a decode step
/// of all 8) must be bitwise equal.
fn check_batch_invariance(source: &ModelSource, arch: &str) {
    let m = load(source, LoadOptions::default()).unwrap();
    let vocab = m.model.cfg.vocab_size as u32;
    let prompts: Vec<Vec<u32>> = (0..8).map(|i| (0..3 + 2 * i).map(|j| (17 * i + 31 * j + 5) as u32 % vocab).collect()).collect();
    let next: Vec<u32> = (0..8).map(|i| (7 + 13 * i) as u32 % vocab).collect();
    let rows = |t: &Tensor| t.to_vec2::<f32>().unwrap();
    // Alone: prefill, then one decode step.
    let mut alone = vec![];
    for (i, p) in prompts.iter().enumerate() {
        let mut cache = ContiguousKvCache::default();
        let layout = BatchLayout::single(p.len(), 0, LogitRows::All);
        let prefill = rows(&m.model.forward(p, &mut ForwardCtx::new(&layout, &mut cache)).unwrap());
        let layout = BatchLayout::single(1, p.len(), LogitRows::All);
        let decode = rows(&m.model.forward(&next[i..i + 1], &mut ForwardCtx::new(&layout, &mut cache)).unwrap());
        alone.push((prefill, decode));
    }
    // Together.
    let mut cache = ContiguousKvCache::default();
    let mut layout = BatchLayout::default();
    for (i, p) in prompts.iter().enumerate() {
        layout.push(i as u64, p.len(), 0, LogitRows::All);
    }
    let flat: Vec<u32> = prompts.concat();
    let prefill = rows(&m.model.forward(&flat, &mut ForwardCtx::new(&layout, &mut cache)).unwrap());
    let mut layout = BatchLayout::default();
    for (i, p) in prompts.iter().enumerate() {
        layout.push(i as u64, 1, p.len(), LogitRows::All);
    }
    let decode = rows(&m.model.forward(&next, &mut ForwardCtx::new(&layout, &mut cache)).unwrap());
    let mut row = 0;
    for (i, p) in prompts.iter().enumerate() {
        assert!(prefill[row..row + p.len()] == alone[i].0[..], "{arch}: sequence {i}'s prefill logits differ in a batch");
        assert!(decode[i] == alone[i].1[0], "{arch}: sequence {i}'s decode logits differ in a batch");
        row += p.len();
    }
}

/// One test per architecture (they run in parallel, and a failure names the model).
macro_rules! tiny_tests {
    ($($name:ident: $max_kl:expr),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check_tiny(stringify!($name), $max_kl);
            }
        )*
    };
}

tiny_tests! {
    gpt2: 1e-3,
    pythia: 1e-3,
    gemma2: 1e-3,
    phi3: 1e-3,
    mistral: 1e-3,
    qwen2: 1e-3,
    qwen3: 1e-3,
    mixtral: 3e-3,
    qwen3_moe: 3e-3,
    olmoe: 3e-3,
}
