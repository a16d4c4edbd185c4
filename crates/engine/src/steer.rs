//! Per-request steering: a hook handler that changes the rows of the sequences that asked,
//! and passes every row of every other sequence through bit for bit.
//!
//! The handler sees the step's flat batch (as every hook handler does) and returns a
//! replacement tensor only when some sequence of the step steers that hook at a position in
//! this step. Captures run after it and see the steered values.

use crate::scheduler::SeqId;
use glassbox_model::{BatchLayout, CaptureCollector, HookHandler, HookRows, HookSet, ModelError, Result};
use glassbox_protocol::{HookName, Site, SteerOp, SteerSpec};
use candle_core::Tensor;
use std::collections::HashMap;

struct SeqSteers {
    set: HookSet,
    steers: Vec<SteerSpec>,
    prompt_len: usize,
}

/// What every steered sequence asked for.
#[derive(Default)]
pub struct Steering {
    by_seq: HashMap<SeqId, SeqSteers>,
    /// Floats per head for head-shaped hooks.
    head_dim: usize,
}

impl Steering {
    pub fn new(head_dim: usize) -> Self {
        Steering { by_seq: HashMap::new(), head_dim }
    }

    pub fn add(&mut self, seq: SeqId, steers: Vec<SteerSpec>, prompt_len: usize) {
        if steers.is_empty() {
            return;
        }
        let set = steers.iter().map(|s| s.hook).collect();
        self.by_seq.insert(seq, SeqSteers { set, steers, prompt_len });
    }

    pub fn remove(&mut self, seq: SeqId) {
        self.by_seq.remove(&seq);
    }

    pub fn hook_set_of(&self, seq: SeqId) -> Option<&HookSet> {
        self.by_seq.get(&seq).map(|s| &s.set)
    }

    /// The steered version of `x`, if any row of it is steered.
    fn apply(&self, name: HookName, x: &Tensor, rows: &HookRows, layout: &BatchLayout) -> Result<Option<Tensor>> {
        let HookRows::Batch = rows else { return Ok(None) };
        let mut data: Option<Vec<f32>> = None;
        let width = x.elem_count() / x.dim(0)?.max(1);
        for (i, seq) in layout.seqs.iter().enumerate() {
            let Some(s) = self.by_seq.get(&seq.key) else { continue };
            if !s.set.contains(name) {
                continue;
            }
            // (row in x, absolute position) for this sequence's rows.
            let rows: Vec<(usize, usize)> = if name.site == Site::Logits {
                let (first, range) = layout.logit_range(i);
                range.enumerate().map(|(k, r)| (first + k, seq.pos + (r - seq.start))).collect()
            } else {
                (0..seq.len).map(|k| (seq.start + k, seq.pos + k)).collect()
            };
            for spec in s.steers.iter().filter(|sp| sp.hook == name) {
                for &(row, pos) in &rows {
                    if !spec.positions.touches(pos, s.prompt_len) {
                        continue;
                    }
                    let buf = match &mut data {
                        Some(d) => d,
                        None => data.insert(x.flatten_all()?.to_vec1::<f32>()?),
                    };
                    let r = &mut buf[row * width..(row + 1) * width];
                    match &spec.heads {
                        None => steer_slice(r, &spec.op),
                        Some(heads) => {
                            for &h in heads {
                                let slice = r.get_mut(h * self.head_dim..(h + 1) * self.head_dim).ok_or_else(|| ModelError::BadConfig(format!("head {h} out of range for {name}")))?;
                                steer_slice(slice, &spec.op);
                            }
                        }
                    }
                }
            }
        }
        match data {
            Some(d) => Ok(Some(Tensor::from_vec(d, x.shape(), x.device())?)),
            None => Ok(None),
        }
    }
}

fn steer_slice(r: &mut [f32], op: &SteerOp) {
    match op {
        SteerOp::Add { vector, scale } => r.iter_mut().zip(vector).for_each(|(x, v)| *x += scale * v),
        SteerOp::Replace { vector } => r.copy_from_slice(&vector[..r.len()]),
        SteerOp::Ablate => r.fill(0.0),
    }
}

/// The step's hook handler: steering first, then the logit lens and captures of the
/// (steered) values.
pub struct StepHooks<'a> {
    pub steering: &'a Steering,
    pub collector: &'a mut CaptureCollector,
    pub lens: &'a mut crate::lens::LogitLens,
    pub model: &'a glassbox_model::DecoderModel,
    /// Tensor dumps of this step: which hooks, and where they go.
    pub dump: Option<(&'a HookSet, &'a mut crate::dump::StepDump)>,
}

impl HookHandler for StepHooks<'_> {
    fn on_hook(&mut self, name: HookName, x: &Tensor, rows: HookRows, layout: &BatchLayout) -> Result<Option<Tensor>> {
        let steered = self.steering.apply(name, x, &rows, layout)?;
        let value = steered.as_ref().unwrap_or(x);
        self.lens.observe(self.model, name, value, &rows, layout)?;
        if let Some((set, dump)) = &mut self.dump {
            dump.observe(set, name, value, &rows)?;
        }
        self.collector.on_hook(name, value, rows, layout)?;
        Ok(steered)
    }
}
