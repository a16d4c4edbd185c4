//! `glassbox bench one-batch`: one static batch through the engine in this process (no
//! server), as SGLang's `bench_one_batch` and llama.cpp's `llama-bench` (pp/tg) measure:
//! prefill tokens/s, per-step decode latency and tokens/s, and peak resident memory, for
//! every combination of batch size and input length.

use anyhow::{bail, Result};
use clap::Args;
use glassbox_engine::{EngineConfig, EngineCore, KvDtype, KvMemory};
use glassbox_protocol::{EngineRequest, SamplingParams};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct OneBatchArgs {
    #[command(flatten)]
    pub load: super::BenchModelArgs,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 32])]
    pub batch_size: Vec<usize>,
    /// Prompt lengths, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [128usize, 512])]
    pub input_len: Vec<usize>,
    #[arg(long, default_value_t = 32)]
    pub output_len: usize,
    #[arg(long, default_value = "0.25")]
    pub kv_cache_memory: KvMemory,
    /// KV cache element type: f32 (exact) or f16 (half the memory and the bytes attention
    /// reads; keys and values rounded to f16, as llama.cpp's default cache).
    #[arg(long, default_value = "f32")]
    pub kv_cache_dtype: KvDtype,
    #[arg(long)]
    pub output_json: Option<PathBuf>,
}

/// This process's resident set now and at its peak (MiB), from /proc.
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)).and_then(|kb| kb.parse::<f64>().ok()).map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(a: OneBatchArgs) -> Result<()> {
    if a.batch_size.iter().chain(&a.input_len).any(|&x| x == 0) || a.output_len < 2 {
        bail!("batch sizes and input lengths must be positive, --output-len at least 2");
    }
    let model = a.load.load()?;
    let (rss_loaded, _) = rss_mib();
    let vocab = model.model.cfg.vocab_size as u32;
    let lo_id = 256.min(vocab / 2);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    eprintln!("{}: loaded, {rss_loaded:.0} MiB resident", model.name);
    println!("{:>6} {:>6} {:>14} {:>13} {:>16} {:>13} {:>10}", "batch", "input", "prefill tok/s", "prefill ms", "decode ms/step", "decode tok/s", "peak MiB");
    let mut rows = vec![];
    for &input_len in &a.input_len {
        for &batch in &a.batch_size {
            // The whole batch's prompts in one step, as llama-bench's pp and bench_one_batch do.
            let cfg = EngineConfig {
                max_num_seqs: batch,
                max_num_batched_tokens: (batch * input_len).max(batch),
                kv_cache_memory: a.kv_cache_memory,
                kv_cache_dtype: a.kv_cache_dtype,
                ..Default::default()
            };
            let mut core = EngineCore::new(model.clone(), cfg)?;
            if core.kv_capacity_tokens() < batch * (input_len + a.output_len) {
                eprintln!("skipping batch {batch} x {input_len}: the KV cache holds {} tokens; raise --kv-cache-memory", core.kv_capacity_tokens());
                continue;
            }
            for id in 0..batch {
                let prompt: Vec<u32> = (0..input_len).map(|_| rng.random_range(lo_id..vocab)).collect();
                let sampling = SamplingParams { max_tokens: a.output_len, ignore_eos: true, ..Default::default() };
                core.add_request(EngineRequest { id: id as u64, prompt, sampling, ..Default::default() });
            }
            let t0 = Instant::now();
            let mut prefill = None;
            let mut steps = vec![];
            let mut errors = 0;
            while core.has_work() {
                let t = Instant::now();
                let outs = core.step();
                let dt = t.elapsed().as_secs_f64();
                errors += outs.iter().filter(|o| matches!(o.finish, Some(glassbox_protocol::FinishReason::Error(_)))).count();
                match prefill {
                    // The step that computed the prompts gave every sequence its first token.
                    None => prefill = Some(t0.elapsed().as_secs_f64()),
                    Some(_) => steps.push(dt),
                }
                if core.stalled() {
                    bail!("the engine cannot schedule batch {batch} x {input_len}");
                }
            }
            if errors > 0 {
                bail!("{errors} requests failed in batch {batch} x {input_len}");
            }
            let prefill = prefill.unwrap_or(0.0);
            let step = median(steps.clone());
            let (_, peak) = rss_mib();
            let row = json!({
                "batch_size": batch, "input_len": input_len, "output_len": a.output_len,
                "prefill_s": prefill, "prefill_tokens_per_s": (batch * input_len) as f64 / prefill.max(1e-9),
                "decode_step_ms_median": step * 1e3, "decode_tokens_per_s": batch as f64 / step.max(1e-9),
                "decode_steps": steps.len(), "peak_rss_mib": peak,
            });
            println!(
                "{batch:>6} {input_len:>6} {:>14.1} {:>13.1} {:>16.2} {:>13.1} {peak:>10.0}",
                row["prefill_tokens_per_s"].as_f64().unwrap_or(0.0),
                prefill * 1e3,
                step * 1e3,
                row["decode_tokens_per_s"].as_f64().unwrap_or(0.0)
            );
            rows.push(row);
        }
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_name = cpu.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).unwrap_or("").trim().to_string();
    let report = json!({"model": model.name, "cpu": cpu_name, "threads": std::thread::available_parallelism().map_or(1, |n| n.get()), "rss_after_load_mib": rss_loaded, "results": rows});
    if let Some(path) = &a.output_json {
        std::fs::write(path, serde_json::to_string_pretty::<Value>(&report)?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
