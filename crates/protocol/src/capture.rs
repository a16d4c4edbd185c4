//! Captured rows as plain data, and their assembly into one tensor per hook.
//!
//! The engine copies each captured slice out of the forward pass as a [`CaptureChunk`] and,
//! when a sequence finishes, hands its chunks over in [`CaptureParts`]; whoever receives them
//! (the server's handler, the offline API) calls [`CaptureParts::assemble`], so the concatenating,
//! filtering and type conversion never run on the engine thread.

use crate::{Capture, CaptureSpec, HookName, Site};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Rows of one hook, as captured in one step: `[t, ...]`, or `[H, t, ctx]` for patterns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaptureChunk {
    /// Absolute token positions of the `t` rows.
    pub positions: Vec<usize>,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Everything one finished sequence captured, not yet assembled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaptureParts {
    pub spec: CaptureSpec,
    pub prompt_len: usize,
    /// Per hook of the spec, in the spec's order.
    pub chunks: Vec<(HookName, Vec<CaptureChunk>)>,
}

impl CaptureParts {
    /// One tensor per hook: each position once (a preempted sequence recomputes some rows),
    /// in order, filtered by the spec, in the spec's element type.
    pub fn assemble(&self) -> Vec<Capture> {
        self.chunks.iter().map(|(hook, chunks)| assemble(*hook, chunks, &self.spec, self.prompt_len)).collect()
    }
}

fn assemble(hook: HookName, chunks: &[CaptureChunk], spec: &CaptureSpec, prompt_len: usize) -> Capture {
    let pattern = hook.site == Site::Pattern;
    let end = chunks.iter().flat_map(|c| c.positions.iter()).max().map_or(0, |&p| p + 1);
    // position -> (chunk, row within it), first occurrence.
    let mut rows: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    for (c, chunk) in chunks.iter().enumerate() {
        for (r, &p) in chunk.positions.iter().enumerate() {
            if spec.positions.keeps(p, prompt_len, end) {
                rows.entry(p).or_insert((c, r));
            }
        }
    }
    let n = rows.len();
    let (shape, values) = if n == 0 {
        (vec![0], vec![])
    } else if pattern {
        // [H, t, ctx] chunks; the key axis grows with the context: pad to the widest.
        let heads = chunks[0].shape[0];
        let ctx = chunks.iter().map(|c| c.shape[2]).max().unwrap_or(0);
        let mut out = vec![0f32; heads * n * ctx];
        for h in 0..heads {
            for (i, &(c, r)) in rows.values().enumerate() {
                let (t, w) = (chunks[c].shape[1], chunks[c].shape[2]);
                let src = &chunks[c].data[(h * t + r) * w..(h * t + r + 1) * w];
                out[(h * n + i) * ctx..(h * n + i) * ctx + w].copy_from_slice(src);
            }
        }
        (vec![heads, n, ctx], out)
    } else {
        let inner: Vec<usize> = chunks[0].shape[1..].to_vec();
        let width: usize = inner.iter().product();
        let mut out = Vec::with_capacity(n * width);
        for &(c, r) in rows.values() {
            out.extend_from_slice(&chunks[c].data[r * width..(r + 1) * width]);
        }
        let mut shape = vec![n];
        shape.extend(inner);
        (shape, out)
    };
    Capture { hook, shape, dtype: spec.dtype, data: spec.dtype.encode(&values), positions: rows.into_keys().collect() }
}
