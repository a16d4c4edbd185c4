//! `glassbox bench memory`: the machine's memory bandwidth as STREAM's triad measures it
//! (`a[i] = b[i] + s * c[i]` over arrays far larger than the caches, on every core; bytes
//! counted as STREAM does: two reads and a write per element). Decoding one token reads every
//! weight once, so bandwidth / weight bytes bounds decode tokens/s at batch 1.

use anyhow::{bail, Result};
use clap::Args;
use std::time::Instant;

#[derive(Args)]
pub struct MemoryArgs {
    /// Elements per array (f32); the default is 64M (256 MB per array, 768 MB in all).
    #[arg(long, default_value_t = 64 << 20)]
    pub elements: usize,
    /// Timed passes (the best is reported, as STREAM does).
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    /// Threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print only the GB/s number (for scripts).
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(a: MemoryArgs) -> Result<()> {
    if a.elements < 1 << 20 || a.reps == 0 {
        bail!("--elements must be at least 1M (larger than the caches) and --reps positive");
    }
    let threads = a.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    let n = a.elements;
    let (mut x, y, z) = (vec![0f32; n], vec![1f32; n], vec![2f32; n]);
    let chunk = n.div_ceil(threads);
    let mut best = f64::INFINITY;
    for _ in 0..a.reps + 1 {
        let t = Instant::now();
        std::thread::scope(|s| {
            for ((xa, yb), zc) in x.chunks_mut(chunk).zip(y.chunks(chunk)).zip(z.chunks(chunk)) {
                s.spawn(move || {
                    for ((o, b), c) in xa.iter_mut().zip(yb).zip(zc) {
                        *o = b + 3.0 * c;
                    }
                });
            }
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&x);
    let gbs = 3.0 * 4.0 * n as f64 / best / 1e9;
    if a.quiet {
        println!("{gbs:.2}");
    } else {
        println!("triad, {threads} threads, 3 x {} MB: best {:.2} ms, {gbs:.2} GB/s", n * 4 / 1_000_000, best * 1e3);
    }
    Ok(())
}
