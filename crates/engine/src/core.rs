//! `EngineCore`: owns the model, the KV cache and the scheduler; `step()` is schedule,
//! execute, update. It runs on one thread and talks in plain data only.

use crate::block::BlockPool;
use crate::detok::{Detokenizer, StopMatch};
use crate::kv_store::KvStore;
use crate::sampler::Sampler;
use crate::scheduler::{ScheduledSeq, Scheduler, SchedulerConfig, SchedulerOutput, SeqId, SeqState};
use glassbox_model::{BatchLayout, CaptureCollector, HookHandler, HookSet, Hooks, LoadedModel, LogitRows};
use glassbox_protocol::{CapturePositions, EngineOutput, EngineRequest, FinishReason, RequestId, Site};
use std::collections::HashMap;
use std::sync::Arc;

/// KV cache size: bytes, or a fraction of the memory available at startup.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KvMemory {
    Bytes(u64),
    Fraction(f64),
}

impl std::str::FromStr for KvMemory {
    type Err = String;
    /// `0.2` (fraction of free RAM), `512MiB`, `2GB`, `1073741824`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(f) = s.parse::<f64>() {
            if f > 0.0 && f <= 1.0 {
                return Ok(KvMemory::Fraction(f));
            }
            if f > 1.0 && f.fract() == 0.0 {
                return Ok(KvMemory::Bytes(f as u64));
            }
        }
        let lower = s.to_ascii_lowercase();
        let units: [(&str, u64); 6] = [("kib", 1 << 10), ("mib", 1 << 20), ("gib", 1 << 30), ("kb", 1000), ("mb", 1_000_000), ("gb", 1_000_000_000)];
        for (suffix, mult) in units {
            if let Some(num) = lower.strip_suffix(suffix) {
                if let Ok(v) = num.trim().parse::<f64>() {
                    if v > 0.0 {
                        return Ok(KvMemory::Bytes((v * mult as f64) as u64));
                    }
                }
            }
        }
        Err(format!("cannot read KV cache memory `{s}`: give a fraction of free RAM (0.2) or a size (512MiB, 2GB)"))
    }
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Longest sequence (prompt + output); defaults to the model's context length.
    pub max_model_len: Option<usize>,
    pub kv_cache_memory: KvMemory,
    pub block_size: usize,
    /// Seeds the per-request generators of requests without a seed.
    pub seed: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_num_seqs: 64,
            max_num_batched_tokens: 512,
            max_model_len: None,
            kv_cache_memory: KvMemory::Fraction(0.25),
            block_size: 16,
            seed: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid engine configuration: {0}")]
    Config(String),
}

/// A snapshot for metrics; plain data.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_total: usize,
    pub kv_blocks_used: usize,
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    pub preemptions: u64,
    pub steps: u64,
    pub prompt_tokens_computed: u64,
}

impl EngineStats {
    pub fn kv_usage(&self) -> f64 {
        if self.kv_blocks_total == 0 {
            0.0
        } else {
            self.kv_blocks_used as f64 / self.kv_blocks_total as f64
        }
    }
    pub fn prefix_hit_rate(&self) -> f64 {
        if self.prefix_queries == 0 {
            0.0
        } else {
            self.prefix_hits as f64 / self.prefix_queries as f64
        }
    }
}

/// What a request is checked against; plain data, shared with the API layer so it can answer
/// bad requests before they reach the engine.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_model_len: usize,
    pub vocab_size: usize,
    pub kv_capacity_tokens: usize,
    pub hook_names: Arc<Vec<glassbox_protocol::HookName>>,
}

impl Limits {
    /// Why a request cannot run, if it cannot.
    pub fn validate(&self, req: &EngineRequest) -> Result<(), String> {
        let p = &req.sampling;
        let vocab = self.vocab_size;
        if req.prompt.is_empty() {
            return Err("the prompt is empty".into());
        }
        if let Some(t) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(format!("token id {t} is outside the vocabulary (size {vocab})"));
        }
        if req.prompt.len() >= self.max_model_len {
            return Err(format!(
                "this model's maximum context length is {} tokens, but the prompt has {} tokens (leave room for at least one generated token)",
                self.max_model_len,
                req.prompt.len()
            ));
        }
        if req.prompt.len() + 1 > self.kv_capacity_tokens {
            return Err(format!(
                "the prompt needs {} tokens of KV cache but only {} fit; start with more --kv-cache-memory",
                req.prompt.len() + 1,
                self.kv_capacity_tokens
            ));
        }
        if p.max_tokens == 0 {
            return Err("max_tokens must be at least 1".into());
        }
        if p.n == 0 {
            return Err("n must be at least 1".into());
        }
        if p.min_tokens > p.max_tokens {
            return Err(format!("min_tokens ({}) must not exceed max_tokens ({})", p.min_tokens, p.max_tokens));
        }
        if !(p.temperature >= 0.0 && p.temperature.is_finite()) {
            return Err("temperature must be a finite number >= 0".into());
        }
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            return Err("top_p must be in (0, 1]".into());
        }
        if !(0.0..=1.0).contains(&p.min_p) {
            return Err("min_p must be in [0, 1]".into());
        }
        if !(p.repetition_penalty > 0.0 && p.repetition_penalty.is_finite()) {
            return Err("repetition_penalty must be a finite number > 0".into());
        }
        if !p.presence_penalty.is_finite() || !p.frequency_penalty.is_finite() {
            return Err("presence_penalty and frequency_penalty must be finite".into());
        }
        if let Some(spec) = &req.capture {
            if let Some(bad) = spec.hooks.iter().find(|h| !self.hook_names.contains(h)) {
                return Err(format!("this model has no hook point `{bad}`"));
            }
        }
        Ok(())
    }
}

/// Per-sequence state that is not the scheduler's.
struct SeqRuntime {
    request: RequestId,
    index: usize,
    sampler: Sampler,
    detok: Detokenizer,
    generated: usize,
    captures: bool,
}

pub struct EngineCore {
    model: Arc<LoadedModel>,
    limits: Limits,
    sched: Scheduler,
    kv: KvStore,
    seqs: HashMap<SeqId, SeqRuntime>,
    requests: HashMap<RequestId, Vec<SeqId>>,
    collector: CaptureCollector,
    /// Outputs decided outside a step (rejections, aborts), sent with the next step.
    pending: Vec<EngineOutput>,
    next_seq: SeqId,
    seed_rng: u64,
    stats: EngineStats,
}

fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(4 << 30)
}

impl EngineCore {
    pub fn new(model: Arc<LoadedModel>, cfg: EngineConfig) -> Result<Self, EngineError> {
        let mc = &model.model.cfg;
        if cfg.block_size == 0 || cfg.max_num_seqs == 0 || cfg.max_num_batched_tokens == 0 {
            return Err(EngineError::Config("block size, max_num_seqs and max_num_batched_tokens must be positive".into()));
        }
        let max_model_len = cfg.max_model_len.unwrap_or(mc.max_position_embeddings).max(1);
        let row = mc.num_kv_heads * mc.head_dim;
        let per_block = KvStore::bytes_per_block(mc.num_layers, cfg.block_size, row) as u64;
        let bytes = match cfg.kv_cache_memory {
            KvMemory::Bytes(b) => b,
            KvMemory::Fraction(f) => (available_memory() as f64 * f) as u64,
        };
        let num_blocks = (bytes / per_block) as usize;
        if num_blocks == 0 {
            return Err(EngineError::Config(format!(
                "KV cache memory {bytes} bytes holds no block ({per_block} bytes each); give --kv-cache-memory more"
            )));
        }
        let limits = Limits {
            max_model_len,
            vocab_size: mc.vocab_size,
            kv_capacity_tokens: num_blocks * cfg.block_size,
            hook_names: Arc::new(model.model.hook_names()),
        };
        let sched_cfg = SchedulerConfig { max_num_batched_tokens: cfg.max_num_batched_tokens, max_num_seqs: cfg.max_num_seqs };
        Ok(EngineCore {
            sched: Scheduler::new(sched_cfg, BlockPool::new(num_blocks, cfg.block_size)),
            kv: KvStore::new(mc.num_layers, num_blocks, cfg.block_size, row),
            model,
            limits,
            seqs: HashMap::new(),
            requests: HashMap::new(),
            collector: CaptureCollector::default(),
            pending: vec![],
            next_seq: 0,
            seed_rng: cfg.seed,
            stats: EngineStats::default(),
        })
    }

    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.model
    }

    /// Tokens the KV cache can hold.
    pub fn kv_capacity_tokens(&self) -> usize {
        self.limits.kv_capacity_tokens
    }

    /// Ids of the requests the engine holds.
    pub fn request_ids(&self) -> Vec<RequestId> {
        self.requests.keys().copied().collect()
    }

    /// Is any sequence of this request still in the engine?
    pub fn has_request(&self, id: RequestId) -> bool {
        self.requests.contains_key(&id)
    }

    pub fn has_work(&self) -> bool {
        self.sched.has_work() || !self.pending.is_empty()
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            running: self.sched.num_running(),
            waiting: self.sched.num_waiting(),
            kv_blocks_total: self.sched.pool.num_blocks(),
            kv_blocks_used: self.sched.pool.num_used(),
            prefix_queries: self.sched.pool.prefix_queries,
            prefix_hits: self.sched.pool.prefix_hits,
            ..self.stats.clone()
        }
    }

    /// The limits requests are checked against (a copy the API layer can use).
    pub fn limits(&self) -> Limits {
        self.limits.clone()
    }

    /// Queue a request. A request that cannot run is answered with an error output.
    pub fn add_request(&mut self, req: EngineRequest) {
        if let Err(msg) = self.limits.validate(&req) {
            self.pending.push(EngineOutput::error(req.id, msg));
            return;
        }
        if self.requests.contains_key(&req.id) {
            self.pending.push(EngineOutput::error(req.id, format!("request id {} is already in use", req.id)));
            return;
        }
        let captures = req.capture.is_some();
        // Prompt rows served from the prefix cache are not recomputed, so a capture that
        // includes prompt positions computes the whole prompt.
        let use_prefix_cache = req.capture.as_ref().is_none_or(|c| matches!(c.positions, CapturePositions::Generated | CapturePositions::Last));
        let mut ids = Vec::with_capacity(req.sampling.n);
        let base_seed = req.sampling.seed.unwrap_or_else(|| {
            self.seed_rng = self.seed_rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            self.seed_rng
        });
        for index in 0..req.sampling.n {
            let id = self.next_seq;
            self.next_seq += 1;
            let leader = ids.first().copied();
            self.sched.add(id, SeqState::new(req.prompt.clone(), 0, use_prefix_cache, leader));
            if let Some(spec) = &req.capture {
                self.collector.want(id, spec.clone());
            }
            self.seqs.insert(
                id,
                SeqRuntime {
                    request: req.id,
                    index,
                    sampler: Sampler::new(req.sampling.clone(), base_seed.wrapping_add(index as u64)),
                    detok: Detokenizer::new(req.sampling.stop.clone()),
                    generated: 0,
                    captures,
                },
            );
            ids.push(id);
        }
        self.requests.insert(req.id, ids);
    }

    /// Abort a request at any point; its blocks are freed now and it is answered with `abort`.
    pub fn abort(&mut self, id: RequestId) {
        let Some(seqs) = self.requests.remove(&id) else { return };
        for s in seqs {
            if let Some(rt) = self.seqs.remove(&s) {
                let state = self.sched.remove(s);
                let _ = self.collector.finish(s, 0);
                let mut out = EngineOutput::error(id, "");
                out.index = rt.index;
                out.finish = Some(FinishReason::Abort);
                out.prompt_tokens = state.as_ref().map_or(0, |st| st.prompt_len);
                out.completion_tokens = rt.generated;
                self.pending.push(out);
            }
        }
    }

    /// Drop queued outputs (used after a failed step has answered everyone).
    pub fn drain_pending(&mut self) {
        self.pending.clear();
    }

    /// One engine step: schedule, execute, update.
    pub fn step(&mut self) -> Vec<EngineOutput> {
        let mut outputs = std::mem::take(&mut self.pending);
        let plan = self.sched.schedule();
        for &p in &plan.preempted {
            // Recomputed later from scratch: its captured rows will come again.
            self.collector.restart(p);
            self.stats.preemptions += 1;
        }
        if plan.is_empty() {
            return outputs;
        }
        self.stats.steps += 1;
        match self.execute(&plan) {
            Ok(logits) => self.update(&plan, logits, &mut outputs),
            Err(e) => {
                // The step failed: everyone in it gets the error, the engine goes on.
                let msg = format!("engine step failed: {e}");
                let failed: Vec<RequestId> = plan.scheduled.iter().filter_map(|s| self.seqs.get(&s.id).map(|r| r.request)).collect();
                for req in failed {
                    self.fail_request(req, &msg, &mut outputs);
                }
            }
        }
        outputs
    }

    fn fail_request(&mut self, req: RequestId, msg: &str, outputs: &mut Vec<EngineOutput>) {
        for s in self.requests.remove(&req).unwrap_or_default() {
            if let Some(rt) = self.seqs.remove(&s) {
                self.sched.remove(s);
                let _ = self.collector.finish(s, 0);
                let mut out = EngineOutput::error(req, msg);
                out.index = rt.index;
                outputs.push(out);
            }
        }
    }

    /// Logits rows of each scheduled sequence that completes its known tokens this step.
    fn execute(&mut self, plan: &SchedulerOutput) -> glassbox_model::Result<Vec<Option<Vec<f32>>>> {
        let mut layout = BatchLayout::default();
        let mut tokens = Vec::with_capacity(plan.num_tokens());
        let mut tables = HashMap::with_capacity(plan.scheduled.len());
        let logits_hook = glassbox_protocol::HookName::global(Site::Logits);
        for ScheduledSeq { id, start, len } in &plan.scheduled {
            let seq = &self.sched.seqs[id];
            tokens.extend_from_slice(&seq.tokens[*start..start + len]);
            let completes = start + len == seq.tokens.len();
            let wants_all = self.seqs[id].captures && self.collector.wants(*id, logits_hook);
            let rows = match (completes, wants_all) {
                (_, true) => LogitRows::All,
                (true, false) => LogitRows::Last,
                (false, false) => LogitRows::None,
            };
            layout.push(*id, *len, *start, rows);
            tables.insert(*id, seq.blocks.clone());
            if *start < seq.prompt_len {
                self.stats.prompt_tokens_computed += (*len).min(seq.prompt_len - start) as u64;
            }
        }
        let hookset: HookSet = if self.collector.is_empty() { HookSet::default() } else { self.collector.hook_set() };
        let mut cache = self.kv.with_tables(&tables);
        let logits = if hookset.is_empty() {
            self.model.model.forward(&tokens, &layout, &mut cache, &mut Hooks::none())?
        } else {
            let handler: &mut dyn HookHandler = &mut self.collector;
            self.model.model.forward(&tokens, &layout, &mut cache, &mut Hooks::new(&hookset, handler))?
        };
        let logits = logits.to_vec2::<f32>()?;
        // The last logits row of each sequence that completes, in plan order.
        let mut rows = Vec::with_capacity(plan.scheduled.len());
        for (i, s) in plan.scheduled.iter().enumerate() {
            let seq = &self.sched.seqs[&s.id];
            let completes = s.start + s.len == seq.tokens.len();
            let (first, range) = layout.logit_range(i);
            rows.push((completes && !range.is_empty()).then(|| logits[first + range.len() - 1].clone()));
        }
        Ok(rows)
    }

    fn update(&mut self, plan: &SchedulerOutput, logits: Vec<Option<Vec<f32>>>, outputs: &mut Vec<EngineOutput>) {
        let eos = self.model.eos_token_ids.clone();
        for (s, row) in plan.scheduled.iter().zip(logits) {
            self.sched.computed(s.id, s.len);
            let Some(row) = row else { continue };
            let seq = &self.sched.seqs[&s.id];
            let (prompt_len, total) = (seq.prompt_len, seq.tokens.len());
            let cached = seq.cached_tokens;
            let Some(rt) = self.seqs.get_mut(&s.id) else { continue };
            let p = rt.sampler.params().clone();
            let mut banned = vec![];
            if rt.generated < p.min_tokens {
                if !p.ignore_eos {
                    banned.extend(&eos);
                }
                banned.extend(&p.stop_token_ids);
            }
            let sampled = rt.sampler.sample(&row, &seq.tokens, &banned);
            let token = sampled.token;
            rt.generated += 1;
            let stop_hit = matches!(rt.detok.push(&self.model.tokenizer, token), StopMatch::Stop);
            let eos_hit = !p.ignore_eos && eos.contains(&token);
            let finish = if eos_hit || p.stop_token_ids.contains(&token) || stop_hit {
                Some(FinishReason::Stop)
            } else if rt.generated >= p.max_tokens || total + 1 >= self.limits.max_model_len {
                Some(FinishReason::Length)
            } else {
                None
            };
            let text = rt.detok.take(finish.is_some());
            let mut out = EngineOutput {
                id: rt.request,
                index: rt.index,
                new_tokens: vec![token],
                text,
                logprobs: sampled.logprob.into_iter().collect(),
                finish: finish.clone(),
                captures: vec![],
                prompt_tokens: prompt_len,
                completion_tokens: rt.generated,
                cached_tokens: cached,
            };
            if finish.is_some() {
                let (request, captures) = (rt.request, rt.captures);
                if captures {
                    match self.collector.finish(s.id, prompt_len) {
                        Ok(c) => out.captures = c,
                        Err(e) => out.finish = Some(FinishReason::Error(format!("assembling captures failed: {e}"))),
                    }
                }
                self.seqs.remove(&s.id);
                self.sched.remove(s.id);
                if let Some(list) = self.requests.get_mut(&request) {
                    list.retain(|&x| x != s.id);
                    if list.is_empty() {
                        self.requests.remove(&request);
                    }
                }
            } else {
                self.sched.append_token(s.id, token);
            }
            outputs.push(out);
        }
    }
}
