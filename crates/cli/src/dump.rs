//! `glassbox dump diff A B`: compare two capture files (glassbox's, or
//! `scripts/dump_transformers.py`'s, which uses the same names and layout) hook by hook in
//! forward order, and name the first hook where they diverge beyond tolerance, as one would
//! to find where a quantized model, another engine or a changed kernel departs.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use glassbox_protocol::{DType, HookName, Site};
use safetensors::tensor::Dtype;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum DumpCommand {
    /// Compare two capture files hook by hook; name the first that diverges.
    Diff(DiffArgs),
    /// Cut one request's rows out of a tensor dump directory into a capture file.
    Slice(SliceArgs),
}

#[derive(Args)]
pub struct SliceArgs {
    /// A directory written by --dump-dir (stepNNNNNN.safetensors + .json).
    pub dir: PathBuf,
    /// The engine request id (the manifests name them).
    #[arg(long)]
    pub request: u64,
    /// Which completion of an `n` > 1 request.
    #[arg(long, default_value_t = 0)]
    pub index: usize,
    #[arg(long, default_value = "slice.safetensors")]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct DiffArgs {
    pub a: PathBuf,
    pub b: PathBuf,
    /// Elements differ when |a - b| > atol + rtol * |b| (numpy's allclose).
    #[arg(long, default_value_t = 1e-5)]
    pub atol: f64,
    #[arg(long, default_value_t = 1e-4)]
    pub rtol: f64,
}

pub fn run(cmd: DumpCommand) -> Result<()> {
    match cmd {
        DumpCommand::Diff(a) => diff(a),
        DumpCommand::Slice(a) => {
            let captures = glassbox_engine::dump::slice(&a.dir, a.request, a.index).map_err(anyhow::Error::msg)?;
            let mut meta = std::collections::HashMap::new();
            meta.insert("source".to_string(), format!("tensor dump {} request {} completion {}", a.dir.display(), a.request, a.index));
            std::fs::write(&a.out, glassbox_model::capture_file::to_safetensors(&captures, meta)?).with_context(|| format!("writing {}", a.out.display()))?;
            eprintln!("wrote {} hooks of request {} to {}", captures.len(), a.request, a.out.display());
            Ok(())
        }
    }
}

/// A capture file's hook tensors in forward order: (hook, shape, values as f32).
type HookTensors = BTreeMap<(usize, usize), (HookName, Vec<usize>, Vec<f32>)>;

/// Every hook tensor of a capture file, as f32, keyed in forward order.
fn load(path: &Path) -> Result<HookTensors> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let Ok(hook) = name.parse::<HookName>() else { continue };
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => bail!("{}: tensor {name} has type {other:?}; expected float32, float16 or bfloat16", path.display()),
        };
        let values = dtype.decode(view.data());
        out.insert(forward_key(hook), (hook, view.shape().to_vec(), values));
    }
    if out.is_empty() {
        bail!("{} holds no tensor named like a hook point (blocks.3.attn.hook_q, ...)", path.display());
    }
    Ok(out)
}

/// Forward order: the embedding, then each layer's sites in order, then the final norm and
/// the logits.
fn forward_key(h: HookName) -> (usize, usize) {
    let stage = match (h.layer, h.site) {
        (None, Site::Embed | Site::PosEmbed) => 0,
        (Some(l), _) => 1 + l as usize,
        (None, _) => usize::MAX,
    };
    (stage, h.site as usize)
}

pub fn compare(a: &[f32], b: &[f32], atol: f64, rtol: f64) -> (f64, f64, f64, f64) {
    let (mut max_abs, mut scale, mut dot, mut na, mut nb, mut bad) = (0f64, 0f64, 0f64, 0f64, 0f64, 0usize);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        let d = (x - y).abs();
        max_abs = max_abs.max(d);
        scale = scale.max(y.abs());
        dot += x * y;
        na += x * x;
        nb += y * y;
        if d > atol + rtol * y.abs() || d.is_nan() {
            bad += 1;
        }
    }
    let cosine = if na == 0.0 && nb == 0.0 { 1.0 } else { dot / (na.sqrt() * nb.sqrt()).max(f64::MIN_POSITIVE) };
    (max_abs, max_abs / scale.max(1e-12), cosine, bad as f64 / a.len().max(1) as f64)
}

fn diff(a: DiffArgs) -> Result<()> {
    let (left, right) = (load(&a.a)?, load(&a.b)?);
    println!("{:<36} {:>11} {:>11} {:>10} {:>10}", "hook (forward order)", "max abs", "max rel", "cosine", "mismatch");
    let mut first: Option<String> = None;
    let mut compared = 0;
    for (key, (hook, shape, va)) in &left {
        let Some((_, shape_b, vb)) = right.get(key) else { continue };
        compared += 1;
        if shape != shape_b {
            println!("{:<36} shapes differ: {shape:?} vs {shape_b:?}", hook.to_string());
            first.get_or_insert_with(|| format!("{hook} (shapes {shape:?} vs {shape_b:?})"));
            continue;
        }
        let (max_abs, max_rel, cosine, mismatch) = compare(va, vb, a.atol, a.rtol);
        let flag = if mismatch > 0.0 { "  <- diverges" } else { "" };
        println!("{:<36} {max_abs:>11.3e} {max_rel:>11.3e} {cosine:>10.6} {:>9.3}%{flag}", hook.to_string(), mismatch * 100.0);
        if mismatch > 0.0 && first.is_none() {
            first = Some(format!("{hook} (max abs {max_abs:.3e}, {:.3}% of elements beyond atol {} + rtol {})", mismatch * 100.0, a.atol, a.rtol));
        }
    }
    let only = |x: &HookTensors, y: &HookTensors| {
        x.iter().filter(|(k, _)| !y.contains_key(k)).map(|(_, v)| v.0.to_string()).collect::<Vec<_>>()
    };
    for (name, list) in [(&a.a, only(&left, &right)), (&a.b, only(&right, &left))] {
        if !list.is_empty() {
            println!("only in {}: {}", name.display(), list.join(", "));
        }
    }
    if compared == 0 {
        bail!("the two files share no hook");
    }
    match first {
        Some(f) => bail!("first divergence: {f}"),
        None => {
            println!("no divergence over {compared} hooks (atol {}, rtol {})", a.atol, a.rtol);
            Ok(())
        }
    }
}
