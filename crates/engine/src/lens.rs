//! The logit lens, computed during the forward pass: at `hook_resid_post` of each layer a
//! sequence asked for, its rows (at the positions it asked for) go through the final norm and
//! the unembedding, and the top tokens with their probabilities are kept as plain data.
//! Only sequences that asked pay; the activations themselves are not changed.

use crate::scheduler::SeqId;
use glassbox_model::{BatchLayout, DecoderModel, HookRows, HookSet, Result};
use glassbox_protocol::{CapturePositions, HookName, LensEntry, LensSpec, Site};
use candle_core::Tensor;
use std::collections::HashMap;

struct SeqLens {
    set: HookSet,
    spec: LensSpec,
    prompt_len: usize,
    entries: Vec<LensEntry>,
}

#[derive(Default)]
pub struct LogitLens {
    by_seq: HashMap<SeqId, SeqLens>,
}

impl LogitLens {
    pub fn add(&mut self, seq: SeqId, spec: LensSpec, prompt_len: usize) {
        let set = spec.layers.iter().map(|&l| HookName::block(l, Site::ResidPost)).collect();
        self.by_seq.insert(seq, SeqLens { set, spec, prompt_len, entries: vec![] });
    }

    pub fn hook_set_of(&self, seq: SeqId) -> Option<&HookSet> {
        self.by_seq.get(&seq).map(|s| &s.set)
    }

    pub fn remove(&mut self, seq: SeqId) {
        self.by_seq.remove(&seq);
    }

    /// The entries of a finished sequence: exactly the positions its spec promises, ordered by
    /// position then layer (a preempted sequence's recomputed rows appear once).
    pub fn finish(&mut self, seq: SeqId) -> Vec<LensEntry> {
        let Some(s) = self.by_seq.remove(&seq) else { return vec![] };
        let end = s.entries.iter().map(|e| e.position + 1).max().unwrap_or(0);
        let mut by_key: std::collections::BTreeMap<(usize, usize), LensEntry> = Default::default();
        for e in s.entries {
            if s.spec.positions.keeps(e.position, s.prompt_len, end) {
                by_key.entry((e.position, e.layer)).or_insert(e);
            }
        }
        by_key.into_values().collect()
    }

    /// Called for `hook_resid_post` of every layer in the step's hook set.
    pub fn observe(&mut self, model: &DecoderModel, name: HookName, x: &Tensor, rows: &HookRows, layout: &BatchLayout) -> Result<()> {
        if name.site != Site::ResidPost || !matches!(rows, HookRows::Batch) {
            return Ok(());
        }
        let Some(layer) = name.layer.map(usize::from) else { return Ok(()) };
        for seq in &layout.seqs {
            let Some(s) = self.by_seq.get_mut(&seq.key) else { continue };
            if !s.set.contains(name) {
                continue;
            }
            let mut wanted: Vec<usize> = (0..seq.len).filter(|&k| s.spec.positions.may_keep(seq.pos + k, s.prompt_len)).collect();
            if s.spec.positions == CapturePositions::Last {
                // Only the newest row can still be the last.
                wanted = wanted.last().copied().into_iter().collect();
                s.entries.retain(|e| e.layer != layer);
            }
            if wanted.is_empty() {
                continue;
            }
            let idx = Tensor::new(wanted.iter().map(|&k| (seq.start + k) as u32).collect::<Vec<_>>(), x.device())?;
            let logits = model.lens(&x.index_select(&idx, 0)?)?.to_vec2::<f32>()?;
            for (k, row) in wanted.iter().zip(logits) {
                s.entries.push(LensEntry { layer, position: seq.pos + k, top: top_probs(&row, s.spec.top_k) });
            }
        }
        Ok(())
    }
}

/// The `k` most likely tokens of `softmax(logits)`, most likely first (ties: lower id first).
fn top_probs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    idx.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    let mut top: Vec<u32> = idx[..k].to_vec();
    top.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    top.into_iter().map(|t| (t, (((logits[t as usize] - max) as f64).exp() / sum) as f32)).collect()
}
