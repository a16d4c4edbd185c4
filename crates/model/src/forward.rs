//! [`ForwardCtx`]: everything one forward pass needs besides the weights and the tokens — the
//! batch layout, the KV cache, the hooks someone asked for, and (when a profile with layers
//! runs) a place for per-layer and per-op timings.
//!
//! Architecture invariant: with no hooks and no op trace, each hook site and each timed op
//! costs one branch and the numerics are those of a pass without a context at all.

use crate::batch::{BatchLayout, KvCache};
use crate::error::Result;
use crate::hooks::{HookHandler, HookRows, HookSet};
use crate::qkernels::QInput;
use candle_core::Tensor;
use glassbox_protocol::HookName;
use std::time::Instant;

/// One timed piece of a forward pass (recorded only when an op trace is attached).
#[derive(Clone, Debug)]
pub struct OpSpan {
    /// The block it ran in; `None` for the embedding, the final norm and the unembedding.
    pub layer: Option<usize>,
    /// `layer` for a whole block, else the op (`q_proj`, `attention`, `hook`, ...).
    pub op: &'static str,
    /// For `hook` spans: which hook's handler ran.
    pub hook: Option<HookName>,
    pub start: Instant,
    pub end: Instant,
}

static NO_HOOKS: HookSet = HookSet::EMPTY;

pub struct ForwardCtx<'a> {
    pub layout: &'a BatchLayout,
    pub cache: &'a mut dyn KvCache,
    active: &'a HookSet,
    handler: Option<&'a mut dyn HookHandler>,
    ops: Option<&'a mut Vec<OpSpan>>,
}

impl<'a> ForwardCtx<'a> {
    /// A plain pass: no hooks, no timings.
    pub fn new(layout: &'a BatchLayout, cache: &'a mut dyn KvCache) -> Self {
        ForwardCtx { layout, cache, active: &NO_HOOKS, handler: None, ops: None }
    }

    /// Call `handler` at the hook points in `active` (and only there).
    pub fn with_hooks(mut self, active: &'a HookSet, handler: &'a mut dyn HookHandler) -> Self {
        self.active = active;
        self.handler = Some(handler);
        self
    }

    /// Record per-layer and per-op timings into `ops`.
    pub fn with_ops(mut self, ops: &'a mut Vec<OpSpan>) -> Self {
        self.ops = Some(ops);
        self
    }

    #[inline]
    pub fn wants(&self, name: HookName) -> bool {
        self.active.contains(name)
    }

    /// A hook over the step's rows.
    #[inline]
    pub fn hook(&mut self, name: HookName, x: Tensor) -> Result<Tensor> {
        if !self.active.contains(name) {
            return Ok(x);
        }
        Ok(self.call(name, &x, HookRows::Batch)?.unwrap_or(x))
    }

    /// A hook over a projection input: when a handler replaces it, the replacement's 8-bit
    /// forms are made afresh.
    #[inline]
    pub fn hook_input(&mut self, name: HookName, x: QInput) -> Result<QInput> {
        if !self.active.contains(name) {
            return Ok(x);
        }
        Ok(match self.call(name, x.tensor(), HookRows::Batch)? {
            Some(r) => QInput::new(r),
            None => x,
        })
    }

    /// A hook over the step's rows whose caller keeps them elsewhere (q, k and v in place):
    /// the handler's replacement, if any. Only for names the caller checked with `wants`.
    pub fn hook_replace(&mut self, name: HookName, x: Tensor) -> Result<Option<Tensor>> {
        if !self.active.contains(name) {
            return Ok(None);
        }
        self.call(name, &x, HookRows::Batch)
    }

    /// A hook over one sequence's tensor (attention patterns).
    #[inline]
    pub fn hook_seq(&mut self, name: HookName, seq: usize, x: Tensor) -> Result<Tensor> {
        if !self.active.contains(name) {
            return Ok(x);
        }
        Ok(self.call(name, &x, HookRows::Seq(seq))?.unwrap_or(x))
    }

    /// The handler's replacement for `x`, if it gives one.
    #[cold]
    fn call(&mut self, name: HookName, x: &Tensor, rows: HookRows) -> Result<Option<Tensor>> {
        let t = self.start();
        let out = match &mut self.handler {
            Some(h) => h.on_hook(name, x, rows, self.layout)?,
            None => None,
        };
        if let (Some(ops), Some(start)) = (&mut self.ops, t) {
            ops.push(OpSpan { layer: name.layer.map(|l| l as usize), op: "hook", hook: Some(name), start, end: Instant::now() });
        }
        Ok(out)
    }

    /// The start of a timed op: `Some(now)` only while an op trace is attached.
    #[inline]
    pub fn start(&self) -> Option<Instant> {
        self.ops.as_ref().map(|_| Instant::now())
    }

    /// The end of a timed op begun with [`ForwardCtx::start`].
    #[inline]
    pub fn done(&mut self, start: Option<Instant>, layer: Option<usize>, op: &'static str) {
        if let (Some(ops), Some(start)) = (&mut self.ops, start) {
            ops.push(OpSpan { layer, op, hook: None, start, end: Instant::now() });
        }
    }

    /// Run `f` as op `op` of `layer` (timed when an op trace is attached).
    #[inline]
    pub fn timed<T>(&mut self, layer: Option<usize>, op: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let t = self.start();
        let out = f()?;
        self.done(t, layer, op);
        Ok(out)
    }
}
