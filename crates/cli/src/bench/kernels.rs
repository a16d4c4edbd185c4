//! `glassbox bench kernels`: our matmul kernels alone, per weight format and batch size, on
//! random weights of one shape: milliseconds per call, weight bytes streamed per second and
//! arithmetic rate. What `bench one-batch` shows per model, this shows per kernel, so a kernel
//! change can be measured without a model.

use anyhow::{bail, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use clap::Args;
use glassbox_model::kquants::KFormat;
use glassbox_model::qkernels::{QFormat, QMatrix};
use std::time::Instant;

#[derive(Args)]
pub struct KernelArgs {
    /// Output features (weight rows).
    #[arg(long, default_value_t = 2048)]
    pub n: usize,
    /// Input features (a multiple of 256 for the K-quants).
    #[arg(long, default_value_t = 2048)]
    pub k: usize,
    /// Input rows per call, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 32])]
    pub m: Vec<usize>,
    /// Formats, comma-separated: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k
    /// (the exact path; Q8_0 is always integer), the same with an `i` suffix for the default integer path
    /// (q4_0i, q4_ki, ...); and
    /// candle-q8_0, candle-q4_0, candle-q4_k, candle-q5_k, candle-q6_k for candle's kernels
    /// run one row per call (how batch invariance has to run them).
    #[arg(long, value_delimiter = ',', default_values_t = ["f32".to_string(), "q8_0".into(), "q4_0".into(), "q4_0i".into(), "q4_1".into(), "q4_1i".into(), "q5_0i".into(), "q4_k".into(), "q4_ki".into(), "q6_ki".into()])]
    pub format: Vec<String>,
    /// Timed calls per configuration (the median is reported).
    #[arg(long, default_value_t = 20)]
    pub reps: usize,
}

enum Kernel {
    Dense(Vec<f32>),
    Blocks(Box<QMatrix>),
    /// candle's quantized matmul, one row per call as batch invariance needs it there.
    CandleRowwise(candle_core::quantized::QMatMul),
}

fn build(name: &str, n: usize, k: usize) -> Result<(Kernel, usize)> {
    let w: Vec<f32> = (0..n * k).map(|i| ((i.wrapping_mul(2654435761) >> 7) % 2001) as f32 / 1000.0 - 1.0).collect();
    if let Some(candle) = name.strip_prefix("candle-") {
        let dtype = match candle {
            "q8_0" => GgmlDType::Q8_0,
            "q4_0" => GgmlDType::Q4_0,
            "q4_k" => GgmlDType::Q4K,
            "q5_k" => GgmlDType::Q5K,
            "q6_k" => GgmlDType::Q6K,
            other => bail!("unknown candle format `{other}` (q8_0, q4_0, q4_k, q5_k, q6_k)"),
        };
        let q = QTensor::quantize(&Tensor::from_vec(w, (n, k), &Device::Cpu)?, dtype)?;
        let bytes = q.storage_size_in_bytes();
        return Ok((Kernel::CandleRowwise(candle_core::quantized::QMatMul::from_qtensor(q)?), bytes));
    }
    // A trailing `i` is the default path (integer dots over 8-bit activations, `q4_0i`,
    // `q4_ki`, ...); without it the exact path (f32 expansion). Q8_0 is always integer.
    let integer = name.ends_with('i');
    let (dtype, ours) = match name.trim_end_matches('i') {
        "f32" => return Ok((Kernel::Dense(w), n * k * 4)),
        "f16" => (GgmlDType::F16, QFormat::F16),
        "bf16" => (GgmlDType::BF16, QFormat::BF16),
        "q8_0" => (GgmlDType::Q8_0, QFormat::Q8_0),
        "q4_0" => (GgmlDType::Q4_0, QFormat::Q4_0),
        "q4_1" => (GgmlDType::Q4_1, QFormat::Q4_1),
        "q5_0" => (GgmlDType::Q5_0, QFormat::Q5_0),
        "q5_1" => (GgmlDType::Q5_1, QFormat::Q5_1),
        "q4_k" => (GgmlDType::Q4K, QFormat::K(KFormat::Q4K)),
        "q5_k" => (GgmlDType::Q5K, QFormat::K(KFormat::Q5K)),
        "q6_k" => (GgmlDType::Q6K, QFormat::K(KFormat::Q6K)),
        other => bail!("unknown format `{other}` (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k; an `i` suffix for the integer path)"),
    };
    let q = QTensor::quantize(&Tensor::from_vec(w, (n, k), &Device::Cpu)?, dtype)?;
    let data = q.data()?;
    let m = QMatrix::new(ours, &data, n, k, integer).ok_or_else(|| anyhow::anyhow!("{name} needs k to be a multiple of its block ({k} is not)"))?;
    Ok((Kernel::Blocks(Box::new(m)), data.len()))
}

pub fn run(a: KernelArgs) -> Result<()> {
    if a.n == 0 || a.k == 0 || a.m.contains(&0) || a.reps == 0 {
        bail!("--n, --k, --m and --reps must be positive");
    }
    for name in &a.format {
        // K-quants hold 256 weights per block, the other quantized formats 32.
        let block = if name.trim_end_matches('i').ends_with("_k") { 256 } else { 32 };
        if !["f32", "f16", "bf16"].contains(&name.as_str()) && !a.k.is_multiple_of(block) {
            bail!("{name} needs --k to be a multiple of {block} ({} is not)", a.k);
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("{cores} cores, weights [{} x {}]", a.n, a.k);
    println!("{:>6} {:>5} {:>10} {:>10} {:>10} {:>10}", "format", "m", "ms/call", "MB", "GB/s", "GFLOP/s");
    for name in &a.format {
        let (kernel, bytes) = build(name, a.n, a.k)?;
        for &m in &a.m {
            let x: Vec<f32> = (0..m * a.k).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
            let call = || match &kernel {
                Kernel::Dense(w) => glassbox_model::kernels::matmul_bt(&x, w, m, a.k, a.n),
                Kernel::Blocks(q) => q.matmul_bt(&x, m),
                Kernel::CandleRowwise(q) => {
                    use candle_core::Module;
                    let mut y = Vec::with_capacity(m * a.n);
                    for row in x.chunks_exact(a.k) {
                        let t = Tensor::from_slice(row, (1, a.k), &Device::Cpu).and_then(|t| q.forward(&t)).and_then(|t| t.flatten_all()?.to_vec1::<f32>());
                        y.extend(t.unwrap_or_default());
                    }
                    y
                }
            };
            std::hint::black_box(call());
            let mut times: Vec<f64> = (0..a.reps)
                .map(|_| {
                    let t = Instant::now();
                    std::hint::black_box(call());
                    t.elapsed().as_secs_f64()
                })
                .collect();
            times.sort_by(f64::total_cmp);
            let t = times[times.len() / 2];
            let flops = 2.0 * (m * a.n * a.k) as f64;
            println!("{name:>6} {m:>5} {:>10.3} {:>10.1} {:>10.1} {:>10.1}", t * 1e3, bytes as f64 / 1e6, bytes as f64 / t / 1e9, flops / t / 1e9);
        }
    }
    Ok(())
}
