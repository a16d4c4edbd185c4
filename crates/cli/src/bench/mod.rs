//! Benchmarks. `glassbox bench throughput`: offline throughput through the real engine, like
//! `vllm bench throughput` with its random dataset. `bench serve` (serve.rs) drives any
//! OpenAI-compatible server; `bench compare` (report.rs) puts runs side by side; `bench
//! one-batch` one static batch in-process; `bench kernels` the matmul kernels alone; `bench
//! memory` the memory bandwidth that bounds decoding.

mod kernels;
mod memory;
mod one_batch;
mod report;
mod serve;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use glassbox_engine::{EngineConfig, KvDtype, KvMemory, LLM};
use glassbox_protocol::{EngineRequest, SamplingParams};
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Offline throughput: N prompts through the engine, batched.
    Throughput(ThroughputArgs),
    /// Drive an OpenAI-compatible server (glassbox, llama-server, vLLM) under load: latency
    /// percentiles, throughput, goodput.
    Serve(serve::ServeArgs),
    /// One static batch in this process: prefill tokens/s, decode step latency and tokens/s,
    /// peak memory, per batch size and input length (like llama-bench's pp/tg).
    OneBatch(one_batch::OneBatchArgs),
    /// Runs of `bench serve` side by side, with ratios to the first (and a plot).
    Compare(report::CompareArgs),
    /// Our matmul kernels alone, per weight format and rows per call, on random weights.
    Kernels(kernels::KernelArgs),
    /// Memory bandwidth (STREAM's triad on every core): what bounds decoding at batch 1.
    Memory(memory::MemoryArgs),
}

/// The model an in-process benchmark loads, and on which path.
#[derive(Args)]
pub struct BenchModelArgs {
    #[arg(long)]
    pub model: Option<String>,
    /// Run GGUF weights dequantized to f32.
    #[arg(long)]
    pub dequantize: bool,
    /// Keep each request's numbers independent of the batch (our kernels always are; this costs
    /// speed only on the formats left to candle, Q2_K and Q3_K, run a row at a time).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub batch_invariant: bool,
}

impl BenchModelArgs {
    pub fn load(&self) -> Result<Arc<glassbox_model::LoadedModel>> {
        Ok(Arc::new(crate::commands::load_model(self.model.as_deref(), self.dequantize, self.batch_invariant)?))
    }
}

#[derive(Args)]
pub struct ThroughputArgs {
    #[command(flatten)]
    pub load: BenchModelArgs,
    #[arg(long, default_value_t = 64)]
    pub num_prompts: usize,
    /// Prompt length in tokens (random tokens, as vLLM's random dataset).
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Vary lengths uniformly in [len * (1 - r), len * (1 + r)] for a mixture.
    #[arg(long, default_value_t = 0.0)]
    pub range_ratio: f64,
    /// Tokens every prompt shares at its start (a shared-prefix workload).
    #[arg(long, default_value_t = 0)]
    pub prefix_len: usize,
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    #[arg(long, default_value_t = 512)]
    pub max_num_batched_tokens: usize,
    #[arg(long, default_value = "0.25")]
    pub kv_cache_memory: KvMemory,
    /// KV cache element type: f32 (exact) or f16 (half the memory and the bytes attention
    /// reads; keys and values rounded to f16, as llama.cpp's default cache).
    #[arg(long, default_value = "f32")]
    pub kv_cache_dtype: KvDtype,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub output_json: Option<PathBuf>,
    /// Every request captures these hooks (names or globs), to measure what capture costs.
    #[arg(long = "capture")]
    pub capture: Vec<String>,
    /// all, last, prompt or generated.
    #[arg(long, default_value = "last")]
    pub capture_positions: glassbox_protocol::CapturePositions,
    /// Every request adds a small vector at this hook (all positions), to measure what
    /// steering costs.
    #[arg(long)]
    pub steer: Option<String>,
    #[command(flatten)]
    pub profile: crate::profile::ProfileArgs,
}

/// A length drawn uniformly from `[len * (1 - ratio), len * (1 + ratio)]` (at least 1), as
/// vLLM's random dataset does.
pub fn vary_len(len: usize, ratio: f64, rng: &mut rand_chacha::ChaCha8Rng) -> usize {
    let lo = ((len as f64) * (1.0 - ratio)).round().max(1.0) as usize;
    let hi = ((len as f64) * (1.0 + ratio)).round().max(lo as f64) as usize;
    rng.random_range(lo..=hi)
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Throughput(a) => throughput(a),
        BenchCommand::Serve(a) => serve::run(a),
        BenchCommand::Compare(a) => report::compare(a),
        BenchCommand::OneBatch(a) => one_batch::run(a),
        BenchCommand::Kernels(a) => kernels::run(a),
        BenchCommand::Memory(a) => memory::run(a),
    }
}

fn throughput(a: ThroughputArgs) -> Result<()> {
    if a.num_prompts == 0 || a.input_len == 0 || a.output_len == 0 {
        bail!("--num-prompts, --input-len and --output-len must be positive");
    }
    if !(0.0..1.0).contains(&a.range_ratio) {
        bail!("--range-ratio must be in [0, 1)");
    }
    let model = a.load.load()?;
    let vocab = model.model.cfg.vocab_size as u32;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed);
    let vary = |len: usize, rng: &mut rand_chacha::ChaCha8Rng| vary_len(len, a.range_ratio, rng);
    // Random ids away from the low ids where vocabularies keep their special tokens.
    let lo_id = 256.min(vocab / 2);
    let prefix: Vec<u32> = (0..a.prefix_len).map(|_| rng.random_range(lo_id..vocab)).collect();
    let available = model.model.hook_names();
    let capture = if a.capture.is_empty() {
        None
    } else {
        let hooks = glassbox_protocol::resolve_patterns(&a.capture, &available)?;
        Some(glassbox_protocol::CaptureSpec { hooks, positions: a.capture_positions.clone(), dtype: Default::default() })
    };
    let steer = match &a.steer {
        None => vec![],
        Some(h) => glassbox_protocol::resolve_patterns(std::slice::from_ref(h), &available)?
            .into_iter()
            .map(|hook| glassbox_protocol::SteerSpec {
                hook,
                op: glassbox_protocol::SteerOp::Add { vector: vec![0.01; model.model.hook_width(hook.site)], scale: 1.0 },
                positions: glassbox_protocol::SteerPositions::All,
                heads: None,
            })
            .collect(),
    };
    let mut requests = Vec::with_capacity(a.num_prompts);
    for id in 0..a.num_prompts {
        let input = vary(a.input_len, &mut rng);
        let output = vary(a.output_len, &mut rng);
        let mut prompt = prefix.clone();
        prompt.extend((0..input).map(|_| rng.random_range(lo_id..vocab)));
        let sampling = SamplingParams { max_tokens: output, ignore_eos: true, ..Default::default() };
        requests.push(EngineRequest { id: id as u64, prompt, sampling, capture: capture.clone(), steer: steer.clone(), ..Default::default() });
    }
    let input_tokens: usize = requests.iter().map(|r| r.prompt.len()).sum();
    let cfg = EngineConfig {
        max_num_seqs: a.max_num_seqs,
        max_num_batched_tokens: a.max_num_batched_tokens,
        kv_cache_memory: a.kv_cache_memory,
        kv_cache_dtype: a.kv_cache_dtype,
        seed: a.seed,
        ..Default::default()
    };
    let mut llm = LLM::from_model(model.clone(), cfg)?;
    eprintln!(
        "{}: {} prompts, {} input tokens, KV cache holds {} tokens, max {} sequences",
        model.name,
        a.num_prompts,
        input_tokens,
        llm.core().kv_capacity_tokens(),
        a.max_num_seqs
    );
    let bar = indicatif::ProgressBar::new(a.num_prompts as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} requests {elapsed_precise}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
    a.profile.start(&mut llm)?;
    let start = Instant::now();
    for r in requests {
        llm.core_mut().add_request(r);
    }
    let (mut output_tokens, mut errors) = (0usize, 0usize);
    llm.stream(|out| {
        output_tokens += out.new_tokens.len();
        if let Some(f) = &out.finish {
            bar.inc(1);
            if matches!(f, glassbox_protocol::FinishReason::Error(_)) {
                errors += 1;
            }
        }
    });
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    a.profile.finish(&mut llm)?;
    if errors > 0 {
        bail!("{errors} requests failed");
    }
    let stats = llm.core().stats();
    let report = serde_json::json!({
        "model": model.name,
        "num_prompts": a.num_prompts,
        "elapsed_s": elapsed,
        "requests_per_s": a.num_prompts as f64 / elapsed,
        "input_tokens_per_s": input_tokens as f64 / elapsed,
        "output_tokens_per_s": output_tokens as f64 / elapsed,
        "total_tokens_per_s": (input_tokens + output_tokens) as f64 / elapsed,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "max_num_seqs": a.max_num_seqs,
        "batch_invariant": a.load.batch_invariant,
        "prefix_cache_hit_rate": stats.prefix_hit_rate(),
        "preemptions": stats.preemptions,
        "prompt_tokens_computed": stats.prompt_tokens_computed,
    });
    println!("{:<28} {:>12}", "metric", "value");
    for key in ["num_prompts", "elapsed_s", "requests_per_s", "input_tokens_per_s", "output_tokens_per_s", "total_tokens_per_s", "prefix_cache_hit_rate", "preemptions"] {
        let v = &report[key];
        let shown = v.as_f64().map(|f| if f.fract() == 0.0 { format!("{f:.0}") } else { format!("{f:.3}") }).unwrap_or_else(|| v.to_string());
        println!("{key:<28} {shown:>12}");
    }
    if let Some(path) = &a.output_json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
