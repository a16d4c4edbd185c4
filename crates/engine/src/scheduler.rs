//! The scheduler: which sequences run this step, and how many of their tokens.
//!
//! There are no prefill and decode phases: a sequence knows how many of its tokens are
//! computed and how many exist (prompt + generated). Each step gives running sequences their
//! missing tokens first, then admits waiting ones, within a token budget and a sequence limit.
//! A long prompt simply takes several steps (chunked prefill). When KV blocks run out, the
//! latest-arrived running sequence is preempted: its blocks are freed and it is recomputed
//! later (its full blocks usually come back from the prefix cache). A sequence that cannot
//! run even with the whole cache to itself is handed back as `failed` (the engine answers it
//! with an error), so nothing waits forever.
//!
//! Architecture invariant: no tensors here; this module is tested with scripts, no model.

use crate::block::{block_hashes, BlockHash, BlockId, BlockPool};
use std::collections::{HashMap, VecDeque};

pub type SeqId = u64;

/// Where a sequence is in its life. Finished sequences are removed, not kept in a state.
///
/// ```text
/// Waiting ──admit──> Running ──out of KV blocks──> Preempted ──readmit──> Running
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqStatus {
    /// Queued, never scheduled.
    Waiting,
    /// Holds KV blocks and is scheduled every step until it finishes.
    Running,
    /// Its blocks were taken back; it waits (at the front) to recompute its tokens.
    Preempted,
}

impl SeqStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SeqStatus::Waiting => "waiting",
            SeqStatus::Running => "running",
            SeqStatus::Preempted => "preempted",
        }
    }
}

/// A sequence's scheduling state.
#[derive(Clone, Debug)]
pub struct SeqState {
    status: SeqStatus,
    /// When it entered `status`.
    since: std::time::Instant,
    /// Prompt and generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub num_computed: usize,
    pub blocks: Vec<BlockId>,
    /// Hashes of the full blocks registered so far.
    hashes: Vec<BlockHash>,
    /// Separates prefix-cache entries of requests whose KV differs for equal tokens.
    pub salt: u64,
    /// Requests that capture activations compute their whole prompt.
    pub use_prefix_cache: bool,
    /// `n` > 1: wait until this sequence has computed the shared prompt, then reuse its blocks.
    pub leader: Option<SeqId>,
    /// Prompt tokens served from the prefix cache at first admission.
    pub cached_tokens: usize,
    pub preemptions: u32,
}

impl SeqState {
    pub fn status(&self) -> SeqStatus {
        self.status
    }

    /// How long it has been in its status.
    pub fn time_in_status(&self) -> std::time::Duration {
        self.since.elapsed()
    }

    /// The one place a status changes; only the transitions drawn on [`SeqStatus`] happen.
    fn enter(&mut self, to: SeqStatus) {
        use SeqStatus::*;
        debug_assert!(matches!((self.status, to), (Waiting | Preempted, Running) | (Running, Preempted)), "{:?} -> {to:?}", self.status);
        self.status = to;
        self.since = std::time::Instant::now();
    }

    pub fn new(tokens: Vec<u32>, salt: u64, use_prefix_cache: bool, leader: Option<SeqId>) -> Self {
        SeqState {
            status: SeqStatus::Waiting,
            since: std::time::Instant::now(),
            prompt_len: tokens.len(),
            tokens,
            num_computed: 0,
            blocks: vec![],
            hashes: vec![],
            salt,
            use_prefix_cache,
            leader,
            cached_tokens: 0,
            preemptions: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
}

/// One sequence's share of a step: compute `tokens[start..start + len]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub id: SeqId,
    pub start: usize,
    pub len: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedulerOutput {
    pub scheduled: Vec<ScheduledSeq>,
    pub preempted: Vec<SeqId>,
    /// Sequences that need more KV blocks than the whole cache holds: taken out of the
    /// queues, blocks freed; the caller finishes them (and removes them).
    pub failed: Vec<SeqId>,
}

impl SchedulerOutput {
    pub fn num_tokens(&self) -> usize {
        self.scheduled.iter().map(|s| s.len).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }
}

pub struct Scheduler {
    pub cfg: SchedulerConfig,
    pub pool: BlockPool,
    pub seqs: HashMap<SeqId, SeqState>,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, pool: BlockPool) -> Self {
        Scheduler { cfg, pool, seqs: HashMap::new(), waiting: VecDeque::new(), running: Vec::new() }
    }

    pub fn block_size(&self) -> usize {
        self.pool.block_size
    }

    pub fn add(&mut self, id: SeqId, seq: SeqState) {
        self.seqs.insert(id, seq);
        self.waiting.push_back(id);
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Blocks a sequence of `tokens` tokens needs at most.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.pool.block_size)
    }

    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        let mut budget = self.cfg.max_num_batched_tokens;

        // Running sequences first, oldest first; preempt from the newest when blocks run out.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let seq = &self.seqs[&id];
            let len = (seq.tokens.len() - seq.num_computed).min(budget);
            if len == 0 {
                i += 1;
                continue;
            }
            loop {
                if self.grow(id, len) {
                    let start = self.seqs[&id].num_computed;
                    out.scheduled.push(ScheduledSeq { id, start, len });
                    budget -= len;
                    i += 1;
                    break;
                }
                let Some(victim) = self.running.pop() else { break };
                if victim == id && self.running.is_empty() {
                    // Alone and still out of blocks: waiting cannot help it.
                    self.release_blocks(id);
                    out.failed.push(id);
                    break;
                }
                self.preempt(victim);
                out.preempted.push(victim);
                out.scheduled.retain(|s| s.id != victim);
                if victim == id {
                    break;
                }
            }
        }

        // Then waiting sequences in arrival order, unless this step had to preempt.
        if out.preempted.is_empty() {
            let mut k = 0;
            while k < self.waiting.len() && budget > 0 && self.running.len() < self.cfg.max_num_seqs {
                let id = self.waiting[k];
                if !self.leader_ready(id) {
                    k += 1;
                    continue;
                }
                let asked = self.lookup_prefix(id);
                let seq = &self.seqs[&id];
                let len = (seq.tokens.len() - seq.num_computed).min(budget);
                if !self.grow(id, len) {
                    self.release_blocks(id);
                    if self.running.is_empty() {
                        // Every block is free and it still does not fit: it never will.
                        self.waiting.remove(k);
                        out.failed.push(id);
                        continue;
                    }
                    break;
                }
                if let Some(asked) = asked {
                    let found = self.seqs[&id].num_computed / self.pool.block_size;
                    self.pool.record_lookup(asked, found);
                }
                self.waiting.remove(k);
                let seq = self.seqs.get_mut(&id).expect("waiting sequence exists");
                seq.enter(SeqStatus::Running);
                out.scheduled.push(ScheduledSeq { id, start: seq.num_computed, len });
                self.running.push(id);
                budget -= len;
            }
        }
        out
    }

    /// Followers of an `n` > 1 request start once the leader's prompt is computed (or the
    /// leader is gone), so the prompt's full blocks are shared through the prefix cache.
    fn leader_ready(&self, id: SeqId) -> bool {
        match self.seqs[&id].leader.and_then(|l| self.seqs.get(&l)) {
            Some(leader) => leader.num_computed >= leader.prompt_len,
            None => true,
        }
    }

    /// At admission of a sequence with nothing computed: take its cached full blocks.
    /// At least one token is always left to compute, so the step yields logits.
    /// Returns how many full blocks were looked up (for the hit rate), if any lookup happened.
    fn lookup_prefix(&mut self, id: SeqId) -> Option<usize> {
        let bs = self.pool.block_size;
        let seq = &self.seqs[&id];
        if !seq.use_prefix_cache || seq.num_computed > 0 || !seq.blocks.is_empty() {
            return None;
        }
        let known = &seq.tokens[..seq.tokens.len() - 1];
        let hashes = block_hashes(known, bs, seq.salt);
        let hit = self.pool.lookup_prefix(&hashes, known, seq.salt);
        let seq = self.seqs.get_mut(&id).expect("sequence exists");
        seq.num_computed = hit.len() * bs;
        seq.hashes = hashes[..hit.len()].to_vec();
        // Counted once, at first admission (a preempted sequence's hits are its own blocks).
        if seq.status == SeqStatus::Waiting {
            seq.cached_tokens = seq.num_computed;
        }
        seq.blocks = hit;
        Some(hashes.len())
    }

    /// Make room for `len` more tokens of `id`.
    fn grow(&mut self, id: SeqId, len: usize) -> bool {
        let seq = &self.seqs[&id];
        let need = self.blocks_for(seq.num_computed + len).saturating_sub(seq.blocks.len());
        if need == 0 {
            return true;
        }
        match self.pool.allocate(need) {
            Some(blocks) => {
                self.seqs.get_mut(&id).expect("sequence exists").blocks.extend(blocks);
                true
            }
            None => false,
        }
    }

    fn release_blocks(&mut self, id: SeqId) {
        let seq = self.seqs.get_mut(&id).expect("sequence exists");
        let blocks = std::mem::take(&mut seq.blocks);
        seq.hashes.clear();
        seq.num_computed = 0;
        self.pool.free(&blocks);
    }

    fn preempt(&mut self, id: SeqId) {
        self.release_blocks(id);
        let seq = self.seqs.get_mut(&id).expect("sequence exists");
        seq.enter(SeqStatus::Preempted);
        seq.preemptions += 1;
        self.waiting.push_front(id);
    }

    /// After the step: `len` more tokens of `id` are in the KV cache. Full blocks are named
    /// for the prefix cache.
    pub fn computed(&mut self, id: SeqId, len: usize) {
        let bs = self.pool.block_size;
        let Some(seq) = self.seqs.get_mut(&id) else { return };
        seq.num_computed += len;
        let full = seq.num_computed / bs;
        while seq.hashes.len() < full {
            let i = seq.hashes.len();
            let chunk = &seq.tokens[i * bs..(i + 1) * bs];
            let h = crate::block::block_hash(seq.hashes.last().copied(), chunk, seq.salt);
            seq.hashes.push(h);
            let parent = i.checked_sub(1).map(|p| seq.blocks[p]);
            self.pool.register(seq.blocks[i], h, parent, chunk, seq.salt);
        }
    }

    pub fn append_token(&mut self, id: SeqId, token: u32) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.tokens.push(token);
        }
    }

    /// Remove a sequence (finished or aborted) and free its blocks.
    pub fn remove(&mut self, id: SeqId) -> Option<SeqState> {
        let mut seq = self.seqs.remove(&id)?;
        self.pool.free(&seq.blocks);
        seq.blocks.clear();
        self.waiting.retain(|&s| s != id);
        self.running.retain(|&s| s != id);
        Some(seq)
    }

    /// Running sequences in scheduling order (for tests and stats).
    pub fn running(&self) -> &[SeqId] {
        &self.running
    }
}

#[cfg(test)]
mod tests;
