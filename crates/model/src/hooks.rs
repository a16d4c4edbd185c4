//! Hook points: one call per site in model code, one branch when nobody asked.
//!
//! Capture, steering and dumping are all [`HookHandler`]s: a handler sees the flat, ragged
//! batch tensor (rows of every sequence in the step) plus the [`BatchLayout`], and may return a
//! replacement tensor. The model never looks at names as strings.

use crate::batch::BatchLayout;
use crate::error::Result;
use candle_core::Tensor;
use glassbox_protocol::{Capture, CaptureChunk, CaptureParts, CapturePositions, CaptureSpec, HookName, Site};
use std::collections::HashMap;

/// Which hook points someone wants this step: a bitset over [`HookName::index`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HookSet {
    bits: Vec<u64>,
}

impl HookSet {
    pub const EMPTY: HookSet = HookSet { bits: Vec::new() };

    pub fn insert(&mut self, name: HookName) {
        let i = name.index();
        if self.bits.len() <= i / 64 {
            self.bits.resize(i / 64 + 1, 0);
        }
        self.bits[i / 64] |= 1 << (i % 64);
    }

    #[inline]
    pub fn contains(&self, name: HookName) -> bool {
        let i = name.index();
        self.bits.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|&w| w == 0)
    }

    pub fn union(&mut self, other: &HookSet) {
        if self.bits.len() < other.bits.len() {
            self.bits.resize(other.bits.len(), 0);
        }
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= b;
        }
    }
}

impl FromIterator<HookName> for HookSet {
    fn from_iter<I: IntoIterator<Item = HookName>>(iter: I) -> Self {
        let mut s = HookSet::default();
        for n in iter {
            s.insert(n);
        }
        s
    }
}

/// What a hook call hands over.
pub enum HookRows {
    /// `x` holds every row of the step (`[n_tokens, ...]`), ordered as the layout's sequences;
    /// for [`Site::Logits`] only the rows in `layout.logit_rows`.
    Batch,
    /// `x` belongs to one sequence of the layout (attention patterns: `[H, t, ctx]`).
    Seq(usize),
}

pub trait HookHandler {
    /// Called only for names in the step's [`HookSet`]. Return `Some` to replace the activation.
    fn on_hook(&mut self, name: HookName, x: &Tensor, rows: HookRows, layout: &BatchLayout) -> Result<Option<Tensor>>;
}

/// Collects captures for sequences of the batch, keyed by the layout's sequence `key`
/// (the engine uses request slots; a single-sequence caller uses 0).
///
/// Only rows the spec can still return are kept (`last` keeps one row, `prompt` and
/// `generated` their half, a list of non-negative positions just those). Rows recomputed after
/// a preemption arrive again and are deduplicated at assembly (batch invariance makes the copies
/// equal), so a preemption never loses a row: rows served back from the prefix cache keep the
/// values captured the first time.
#[derive(Default)]
pub struct CaptureCollector {
    wanted: HashMap<u64, Wanted>,
    chunks: HashMap<(u64, HookName), Vec<Chunk>>,
    /// The forward pass chunks are being added in (see `begin_pass`/`rollback_pass`).
    pass: u64,
}

struct Wanted {
    set: HookSet,
    spec: CaptureSpec,
    prompt_len: usize,
}

/// A chunk of rows and the forward pass that captured it.
struct Chunk {
    pass: u64,
    rows: CaptureChunk,
}

impl CaptureCollector {
    /// Sequence `key` (with a prompt of `prompt_len` tokens) captures `spec`.
    pub fn want(&mut self, key: u64, spec: CaptureSpec, prompt_len: usize) {
        let set = spec.hooks.iter().copied().collect();
        self.wanted.insert(key, Wanted { set, spec, prompt_len });
    }

    /// What sequence `key` wants, if it captures anything.
    pub fn hook_set_of(&self, key: u64) -> Option<&HookSet> {
        self.wanted.get(&key).map(|w| &w.set)
    }

    /// Chunks captured from now on belong to a new forward pass.
    pub fn begin_pass(&mut self) {
        self.pass += 1;
    }

    /// Drop what the current forward pass captured (it failed and will be rerun).
    pub fn rollback_pass(&mut self) {
        let pass = self.pass;
        for chunks in self.chunks.values_mut() {
            chunks.retain(|c| c.pass != pass);
        }
    }

    /// Forget sequence `key` and what it captured, without assembling anything.
    pub fn discard(&mut self, key: u64) {
        if self.wanted.remove(&key).is_some() {
            self.chunks.retain(|(k, _), _| *k != key);
        }
    }

    /// The union of what every registered sequence wants.
    pub fn hook_set(&self) -> HookSet {
        let mut s = HookSet::default();
        for w in self.wanted.values() {
            s.union(&w.set);
        }
        s
    }

    /// Does sequence `key` capture `name`?
    pub fn wants(&self, key: u64, name: HookName) -> bool {
        self.wanted.get(&key).is_some_and(|w| w.set.contains(name))
    }

    /// Hand over what sequence `key` captured (plain data, not yet assembled) and forget it.
    pub fn take_parts(&mut self, key: u64) -> Option<CaptureParts> {
        let w = self.wanted.remove(&key)?;
        let chunks = w
            .spec
            .hooks
            .iter()
            .map(|&hook| (hook, self.chunks.remove(&(key, hook)).unwrap_or_default().into_iter().map(|c| c.rows).collect()))
            .collect();
        Some(CaptureParts { spec: w.spec, prompt_len: w.prompt_len, chunks })
    }

    /// Assemble one sequence's captures and forget it.
    pub fn finish(&mut self, key: u64) -> Result<Vec<Capture>> {
        Ok(self.take_parts(key).map(|p| p.assemble()).unwrap_or_default())
    }

    /// Keep rows `rows` (positions `positions`) of `x` along `row_dim` for (key, name).
    fn keep(&mut self, key: u64, name: HookName, x: &Tensor, row_dim: usize, start: usize, positions: Vec<usize>) -> Result<()> {
        let Some(w) = self.wanted.get(&key) else { return Ok(()) };
        let last_only = w.spec.positions == CapturePositions::Last;
        // Runs of consecutive kept rows become one chunk each.
        let kept: Vec<usize> = (0..positions.len()).filter(|&i| w.spec.positions.may_keep(positions[i], w.prompt_len)).collect();
        let kept = if last_only { kept.last().copied().into_iter().collect() } else { kept };
        if kept.is_empty() {
            return Ok(());
        }
        let chunks = self.chunks.entry((key, name)).or_default();
        if last_only {
            chunks.clear();
        }
        let mut i = 0;
        while i < kept.len() {
            let mut j = i + 1;
            while j < kept.len() && kept[j] == kept[j - 1] + 1 {
                j += 1;
            }
            let part = x.narrow(row_dim, start + kept[i], j - i)?;
            let rows = CaptureChunk { positions: kept[i..j].iter().map(|&k| positions[k]).collect(), shape: part.dims().to_vec(), data: part.flatten_all()?.to_vec1::<f32>()? };
            chunks.push(Chunk { pass: self.pass, rows });
            i = j;
        }
        Ok(())
    }
}

impl HookHandler for CaptureCollector {
    fn on_hook(&mut self, name: HookName, x: &Tensor, rows: HookRows, layout: &BatchLayout) -> Result<Option<Tensor>> {
        match rows {
            HookRows::Seq(i) => {
                let seq = &layout.seqs[i];
                if self.wants(seq.key, name) {
                    self.keep(seq.key, name, x, 1, 0, (seq.pos..seq.pos + seq.len).collect())?;
                }
            }
            HookRows::Batch => {
                for (i, seq) in layout.seqs.iter().enumerate() {
                    if !self.wants(seq.key, name) {
                        continue;
                    }
                    let (start, positions): (usize, Vec<usize>) = if name.site == Site::Logits {
                        let (start, rows) = layout.logit_range(i);
                        (start, rows.map(|r| seq.pos + (r - seq.start)).collect())
                    } else {
                        (seq.start, (seq.pos..seq.pos + seq.len).collect())
                    };
                    self.keep(seq.key, name, x, 0, start, positions)?;
                }
            }
        }
        Ok(None)
    }
}
