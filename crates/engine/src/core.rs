//! `EngineCore`: owns the model, the KV cache and the scheduler; `step()` is schedule,
//! execute, update. It runs on one thread and talks in plain data only.
//!
//! Faults: every output goes to an outbox that outlives a panic, so nothing produced before a
//! failure is lost. A failure that belongs to one request (its sampling, detokenization, a
//! hook handler, its share of the step) fails that request only. A failed batched forward is
//! rerun one sequence at a time to find the culprit (batch invariance makes the others'
//! results the same as in the batch). Each failing step leaves a crash dump that
//! `glassbox replay` reruns.

use crate::block::BlockPool;
use crate::crash::{self, CrashDump, DumpedRequest, DumpedSequence, FailedRequest, StepRecord, StepRows};
use crate::detok::{Detokenizer, StopMatch};
use crate::fault::{FaultPlan, Phase};
use crate::kv_store::{KvDtype, KvStore};
use crate::sampler::Sampler;
use crate::scheduler::{ScheduledSeq, Scheduler, SchedulerConfig, SchedulerOutput, SeqId, SeqState, SeqStatus};
use crate::dump::{DumpConfig, Dumper, StepDump};
use crate::lens::LogitLens;
use crate::profile::{ProfileFiles, ProfileOptions, Profiler};
use crate::stats::{EngineStats, RequestClock};
use crate::steer::{StepHooks, Steering};
use glassbox_model::{BatchLayout, CaptureCollector, HookHandler, HookRows, HookSet, ForwardCtx, LoadedModel, LogitRows, ModelError};
use glassbox_protocol::{CaptureSpec, EngineOutput, EngineRequest, FinishReason, HookName, RequestId, Site, SteerOp, SteerSpec};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use serde_json::{json, Value};

/// KV cache size: bytes, or a fraction of the memory available at startup.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
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

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Longest sequence (prompt + output); defaults to the model's context length.
    pub max_model_len: Option<usize>,
    pub kv_cache_memory: KvMemory,
    /// The KV cache's element type (f32 exact; f16 half the memory and reads).
    #[serde(default)]
    pub kv_cache_dtype: KvDtype,
    pub block_size: usize,
    /// Seeds the per-request generators of requests without a seed.
    pub seed: u64,
    /// Where a failing step writes its crash dump (`None`: no dumps).
    pub crash_dump_dir: Option<PathBuf>,
    /// The most bytes one request's captures may take, counted at admission from its worst
    /// case (every position it may keep, for every hook and completion).
    #[serde(default = "default_max_capture_bytes")]
    pub max_capture_bytes: u64,
    /// Tensor dumps of chosen hooks, per step (`None`: off; switchable with `set_dump`).
    #[serde(default)]
    pub dump: Option<DumpConfig>,
    /// Where profiles started with `start_profile` are written.
    #[serde(default)]
    pub profile_dir: Option<PathBuf>,
}

/// Which live view `inspect` returns.
#[derive(Clone, Debug)]
pub enum Inspect {
    Requests,
    Kv { tables: bool },
    Steps { last: usize },
}

/// Why a profile could not start or stop (the server answers 409 for the first two).
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("a profile is already running (started {0:.1} s ago); stop it first with POST /stop_profile")]
    AlreadyRunning(f64),
    #[error("no profile is running; start one with POST /start_profile")]
    NotRunning,
    #[error("{0}")]
    Failed(String),
}

fn default_max_capture_bytes() -> u64 {
    256 << 20
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_num_seqs: 64,
            max_num_batched_tokens: 512,
            max_model_len: None,
            kv_cache_memory: KvMemory::Fraction(0.25),
            kv_cache_dtype: KvDtype::F32,
            block_size: 16,
            seed: 0,
            crash_dump_dir: None,
            max_capture_bytes: default_max_capture_bytes(),
            dump: None,
            profile_dir: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid engine configuration: {0}")]
    Config(String),
}

/// What a request is checked against; plain data, shared with the API layer so it can answer
/// bad requests before they reach the engine.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_model_len: usize,
    pub vocab_size: usize,
    pub kv_capacity_tokens: usize,
    pub hook_names: Arc<Vec<glassbox_protocol::HookName>>,
    /// Elements per position of each hook in `hook_names` (patterns: per key position).
    pub hook_widths: Arc<Vec<usize>>,
    pub max_capture_bytes: u64,
    /// Floats per head of head-shaped hooks.
    pub head_dim: usize,
    pub num_layers: usize,
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
        if p.max_tokens == 0 {
            return Err("max_tokens must be at least 1".into());
        }
        if req.prompt.len() + p.max_tokens > self.max_model_len {
            return Err(format!(
                "this model's maximum context length is {} tokens, but {} were requested ({} in the prompt, {} for the completion); reduce the prompt or max_tokens",
                self.max_model_len,
                req.prompt.len() + p.max_tokens,
                req.prompt.len(),
                p.max_tokens
            ));
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
            let bytes = self.capture_bytes(spec, req.prompt.len(), p.max_tokens, p.n);
            if bytes > self.max_capture_bytes {
                return Err(format!(
                    "the capture could take up to {} ({} hooks over up to {} positions, {} completion(s), {}), over the limit of {} (--max-capture-bytes); capture fewer hooks or positions, or use float16",
                    human_bytes(bytes),
                    spec.hooks.len(),
                    spec.positions.max_rows(req.prompt.len(), p.max_tokens),
                    p.n,
                    spec.dtype.name(),
                    human_bytes(self.max_capture_bytes)
                ));
            }
        }
        for s in &req.steer {
            self.validate_steer(s)?;
        }
        if let Some(l) = &req.logit_lens {
            if l.layers.is_empty() {
                return Err("logit_lens.layers must name at least one layer (or \"all\")".into());
            }
            if let Some(bad) = l.layers.iter().find(|&&x| x >= self.num_layers) {
                return Err(format!("logit_lens: layer {bad} does not exist (the model has {} layers, 0..{})", self.num_layers, self.num_layers - 1));
            }
            if !(1..=20).contains(&l.top_k) {
                return Err(format!("logit_lens.top_k must be between 1 and 20, got {}", l.top_k));
            }
            let entries = l.layers.len() * l.positions.max_rows(req.prompt.len(), p.max_tokens) * p.n;
            if entries > 65_536 {
                return Err(format!("the logit lens could return {entries} entries (layers x positions x n); the limit is 65536: ask for fewer layers or positions"));
            }
        }
        Ok(())
    }

    fn validate_steer(&self, s: &SteerSpec) -> Result<(), String> {
        let h = s.hook;
        let Some(i) = self.hook_names.iter().position(|x| *x == h) else {
            return Err(format!("this model has no hook point `{h}`"));
        };
        if h.site == Site::Pattern {
            return Err(format!("`{h}` cannot be steered: attention patterns are observed after the output is computed; steer `hook_z` instead"));
        }
        if h.site == Site::ExpertIds {
            return Err(format!("`{h}` cannot be steered: the chosen experts are observed; steer `mlp.hook_router_logits` (the choice) or `mlp.hook_expert_weights` (their weights) instead"));
        }
        let width = self.hook_widths[i];
        let head_shaped = matches!(h.site, Site::Q | Site::K | Site::V | Site::QNormed | Site::KNormed | Site::RotQ | Site::RotK | Site::Z);
        let expected = match &s.heads {
            None => width,
            Some(_) if !head_shaped => return Err(format!("`heads` applies to head-shaped hooks (hook_q/k/v/z ...), not `{h}`")),
            Some(heads) => {
                let n = width / self.head_dim.max(1);
                if let Some(bad) = heads.iter().find(|&&x| x >= n) {
                    return Err(format!("`{h}` has {n} heads; head {bad} does not exist"));
                }
                self.head_dim
            }
        };
        let vector = match &s.op {
            SteerOp::Add { scale, .. } if !scale.is_finite() => return Err(format!("the steer scale for `{h}` must be finite")),
            SteerOp::Add { vector, .. } | SteerOp::Replace { vector } => Some(vector),
            SteerOp::Ablate => None,
        };
        if let Some(v) = vector {
            if v.len() != expected {
                return Err(format!("the steering vector for `{h}` has {} values; it needs {expected} (one per {})", v.len(), if s.heads.is_some() { "element of a head" } else { "element of the activation" }));
            }
            if v.iter().any(|x| !x.is_finite()) {
                return Err(format!("the steering vector for `{h}` has a non-finite value"));
            }
        }
        Ok(())
    }

    /// The most bytes a capture can take: positions x width x element size per hook (patterns
    /// x the longest context), for each completion.
    pub fn capture_bytes(&self, spec: &CaptureSpec, prompt_len: usize, max_tokens: usize, n: usize) -> u64 {
        let rows = spec.positions.max_rows(prompt_len, max_tokens) as u64;
        let ctx = (prompt_len + max_tokens) as u64;
        let per_completion: u64 = spec
            .hooks
            .iter()
            .map(|h| {
                let width = self.hook_names.iter().position(|x| x == h).map_or(0, |i| self.hook_widths[i]) as u64;
                let width = if h.site == Site::Pattern { width.saturating_mul(ctx) } else { width };
                rows.saturating_mul(width).saturating_mul(spec.dtype.size() as u64)
            })
            .fold(0u64, u64::saturating_add);
        per_completion.saturating_mul(n as u64)
    }
}

fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} bytes"),
    }
}

/// Per-sequence state that is not the scheduler's.
struct SeqRuntime {
    request: RequestId,
    index: usize,
    sampler: Sampler,
    detok: Detokenizer,
    generated: usize,
}

/// A request in flight: its sequences and the request as submitted (seed resolved), which a
/// crash dump needs to rerun it.
struct RequestEntry {
    seqs: Vec<SeqId>,
    request: EngineRequest,
    /// Arrival order, for dumps.
    arrival: u64,
    clock: RequestClock,
}

/// One sequence's result from the forward pass: its last logits row if it completes its known
/// tokens this step, or why its share of the step failed.
type RowResult = Result<Option<Vec<f32>>, String>;

pub struct EngineCore {
    model: Arc<LoadedModel>,
    cfg: EngineConfig,
    limits: Limits,
    sched: Scheduler,
    kv: KvStore,
    seqs: HashMap<SeqId, SeqRuntime>,
    requests: HashMap<RequestId, RequestEntry>,
    collector: CaptureCollector,
    steering: Steering,
    lens: LogitLens,
    dumper: Option<Dumper>,
    profiler: Option<Profiler>,
    /// The last steps' batch composition and timing, for `/debug/steps`.
    recent_steps: std::collections::VecDeque<Value>,
    started_at: Instant,
    /// Every output decided so far and not yet handed out. Kept in `self` (not a local of
    /// `step`) so that a panic never loses outputs decided before it.
    outbox: Vec<EngineOutput>,
    /// Requests whose share of this step failed, with why; answered at the end of the step.
    step_failures: Vec<(RequestId, String)>,
    /// The step being run (for crash dumps).
    current_step: Option<StepRecord>,
    /// The last step scheduled nothing although there was work.
    stalled: bool,
    fault: Option<FaultPlan>,
    next_seq: SeqId,
    next_arrival: u64,
    seed_rng: u64,
    stats: EngineStats,
}

fn steer_salt(steer: &[SteerSpec]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    serde_json::to_string(steer).unwrap_or_default().hash(&mut h);
    h.finish() | 1
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

/// The text of a caught panic.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Run `f`; a panic becomes an error with its message.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(format!("{what} panicked: {}", panic_message(p.as_ref()))),
    }
}

impl EngineCore {
    pub fn new(model: Arc<LoadedModel>, cfg: EngineConfig) -> Result<Self, EngineError> {
        let mc = &model.model.cfg;
        if cfg.block_size == 0 || cfg.max_num_seqs == 0 || cfg.max_num_batched_tokens == 0 {
            return Err(EngineError::Config("block size, max_num_seqs and max_num_batched_tokens must be positive".into()));
        }
        let row = mc.num_kv_heads * mc.head_dim;
        let per_block = KvStore::bytes_per_block(mc.num_layers, cfg.block_size, row, cfg.kv_cache_dtype) as u64;
        let bytes = match cfg.kv_cache_memory {
            KvMemory::Bytes(b) => b,
            KvMemory::Fraction(f) => (available_memory() as f64 * f) as u64,
        };
        let num_blocks = usize::try_from(bytes / per_block.max(1)).unwrap_or(usize::MAX);
        if num_blocks == 0 {
            return Err(EngineError::Config(format!(
                "KV cache memory {bytes} bytes holds no block ({per_block} bytes each); give --kv-cache-memory more"
            )));
        }
        let kv_capacity_tokens = num_blocks.saturating_mul(cfg.block_size);
        // As vLLM: a sequence of max_model_len tokens must fit in the KV cache alone, or a
        // request could be admitted that can never finish.
        let max_model_len = match cfg.max_model_len {
            Some(m) if m > kv_capacity_tokens => {
                return Err(EngineError::Config(format!(
                    "--max-model-len {m} needs {m} tokens of KV cache, but --kv-cache-memory ({bytes} bytes) holds only {kv_capacity_tokens}; \
                     raise --kv-cache-memory to at least {} bytes or lower --max-model-len",
                    (m as u64).div_ceil(cfg.block_size as u64) * per_block
                )))
            }
            Some(m) => m.max(1),
            None => {
                let model_len = mc.max_position_embeddings.max(1);
                if model_len > kv_capacity_tokens {
                    tracing::warn!(
                        "the model's context length {model_len} does not fit in the KV cache ({kv_capacity_tokens} tokens): \
                         max model length capped to {kv_capacity_tokens}; raise --kv-cache-memory for longer sequences"
                    );
                }
                model_len.min(kv_capacity_tokens)
            }
        };
        let hook_names = model.model.hook_names();
        let hook_widths = hook_names.iter().map(|h| model.model.hook_width(h.site)).collect();
        let limits = Limits {
            max_model_len,
            vocab_size: mc.vocab_size,
            kv_capacity_tokens,
            hook_names: Arc::new(hook_names),
            hook_widths: Arc::new(hook_widths),
            max_capture_bytes: cfg.max_capture_bytes,
            head_dim: mc.head_dim,
            num_layers: mc.num_layers,
        };
        let head_dim = limits.head_dim;
        let dump = cfg.dump.clone();
        let sched_cfg = SchedulerConfig { max_num_batched_tokens: cfg.max_num_batched_tokens, max_num_seqs: cfg.max_num_seqs };
        let mut core = EngineCore {
            sched: Scheduler::new(sched_cfg, BlockPool::new(num_blocks, cfg.block_size)),
            kv: KvStore::new(mc.num_layers, num_blocks, cfg.block_size, row, cfg.kv_cache_dtype),
            seed_rng: cfg.seed,
            cfg,
            model,
            limits,
            seqs: HashMap::new(),
            requests: HashMap::new(),
            collector: CaptureCollector::default(),
            steering: Steering::new(head_dim),
            lens: LogitLens::default(),
            dumper: None,
            profiler: None,
            recent_steps: Default::default(),
            started_at: Instant::now(),
            outbox: vec![],
            step_failures: vec![],
            current_step: None,
            stalled: false,
            fault: FaultPlan::from_env(),
            next_seq: 0,
            next_arrival: 0,
            stats: EngineStats::default(),
        };
        core.set_dump(dump).map_err(EngineError::Config)?;
        Ok(core)
    }

    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.model
    }

    /// Test builds: make requests with the plan's seed fail (see `fault`).
    #[cfg(feature = "fault-injection")]
    pub fn set_fault(&mut self, plan: Option<FaultPlan>) {
        self.fault = plan;
    }

    /// Start profiling the engine (`POST /start_profile`).
    pub fn start_profile(&mut self, opts: &ProfileOptions) -> Result<(), ProfileError> {
        if let Some(p) = &self.profiler {
            return Err(ProfileError::AlreadyRunning(p.running_for()));
        }
        let dir = self.cfg.profile_dir.clone().unwrap_or_else(|| glassbox_model::fetch::cache_dir().join("profiles"));
        self.profiler = Some(Profiler::start(&dir, opts).map_err(ProfileError::Failed)?);
        Ok(())
    }

    /// Stop profiling and write the trace and summary (`POST /stop_profile`).
    pub fn stop_profile(&mut self) -> Result<ProfileFiles, ProfileError> {
        self.profiler.take().ok_or(ProfileError::NotRunning)?.finish().map_err(ProfileError::Failed)
    }

    /// Stop profiling and write the trace to `trace` (offline `--profile out.json`).
    pub fn stop_profile_to(&mut self, trace: &std::path::Path) -> Result<ProfileFiles, ProfileError> {
        self.profiler.take().ok_or(ProfileError::NotRunning)?.finish_to(trace).map_err(ProfileError::Failed)
    }

    /// Add the API side of an HTTP request to the running profile, if one runs.
    pub fn profile_api(&mut self, t: &crate::profile::ApiTrace) {
        if let Some(p) = &mut self.profiler {
            p.api(t);
        }
    }

    /// Start, change or stop tensor dumps (`POST /debug/dump`).
    pub fn set_dump(&mut self, dump: Option<DumpConfig>) -> Result<(), String> {
        self.dumper = match &dump {
            Some(d) => Some(Dumper::start(d.clone()).map_err(|e| format!("cannot dump tensors to {}: {e}", d.dir.display()))?),
            None => None,
        };
        self.cfg.dump = dump;
        Ok(())
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
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
        self.sched.has_work() || !self.outbox.is_empty()
    }

    /// The last step could schedule nothing: stepping again before a command arrives (a new
    /// request, an abort) would spin.
    pub fn stalled(&self) -> bool {
        self.stalled && self.outbox.is_empty()
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
    pub fn add_request(&mut self, mut req: EngineRequest) {
        if let Err(msg) = self.limits.validate(&req) {
            self.outbox.push(EngineOutput::error(req.id, msg));
            return;
        }
        if self.requests.contains_key(&req.id) {
            self.outbox.push(EngineOutput::error(req.id, format!("request id {} is already in use", req.id)));
            return;
        }
        // Prompt rows served from the prefix cache are not recomputed, so a capture that
        // includes prompt positions computes the whole prompt.
        let use_prefix_cache = req.capture.as_ref().is_none_or(|c| !c.positions.needs_prompt_rows())
            && req.logit_lens.as_ref().is_none_or(|l| !l.positions.needs_prompt_rows());
        // Steered requests compute other KV for the same tokens: their own prefix-cache salt.
        let salt = if req.steer.is_empty() { 0 } else { steer_salt(&req.steer) };
        let mut ids = Vec::with_capacity(req.sampling.n);
        let base_seed = *req.sampling.seed.get_or_insert_with(|| {
            self.seed_rng = self.seed_rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            self.seed_rng
        });
        for index in 0..req.sampling.n {
            let id = self.next_seq;
            self.next_seq += 1;
            let leader = ids.first().copied();
            self.sched.add(id, SeqState::new(req.prompt.clone(), salt, use_prefix_cache, leader));
            self.steering.add(id, req.steer.clone(), req.prompt.len());
            if let Some(l) = &req.logit_lens {
                self.lens.add(id, l.clone(), req.prompt.len());
            }
            if let Some(spec) = &req.capture {
                self.collector.want(id, spec.clone(), req.prompt.len());
            }
            self.seqs.insert(
                id,
                SeqRuntime {
                    request: req.id,
                    index,
                    sampler: Sampler::new(req.sampling.clone(), base_seed.wrapping_add(index as u64)),
                    detok: Detokenizer::new(req.sampling.stop.clone()),
                    generated: 0,
                },
            );
            ids.push(id);
        }
        self.next_arrival += 1;
        tracing::debug!(request_id = req.tag.as_deref().unwrap_or(""), engine_id = req.id, prompt_tokens = req.prompt.len(), n = req.sampling.n, "queued");
        self.requests.insert(req.id, RequestEntry { seqs: ids, request: req, arrival: self.next_arrival, clock: RequestClock::new(Instant::now()) });
        self.stalled = false;
    }

    /// Abort a request at any point; its blocks are freed now and it is answered with `abort`.
    pub fn abort(&mut self, id: RequestId) {
        self.finish_request(id, FinishReason::Abort);
    }

    /// One engine step: schedule, execute, update. Returns every output decided since the
    /// last step (rejections and aborts included).
    pub fn step(&mut self) -> Vec<EngineOutput> {
        let step_started = Instant::now();
        // Activation blocks freed in this step serve the next one's (until no work is left).
        glassbox_model::alloc::keep_freed();
        let _span = tracing::trace_span!("step", n = self.stats.steps + 1).entered();
        let t_step = self.profiler.is_some().then_some(step_started);
        let plan = self.sched.schedule();
        // A preempted sequence keeps its captured rows: the rows it recomputes arrive again
        // (deduplicated at assembly), the rows the prefix cache serves back do not.
        self.stats.preemptions += plan.preempted.len() as u64;
        for p in &plan.preempted {
            if let Some(e) = self.seqs.get(p).and_then(|rt| self.requests.get_mut(&rt.request)) {
                e.clock.preemptions += 1;
            }
        }
        for &f in &plan.failed {
            if let Some(req) = self.seqs.get(&f).map(|r| r.request) {
                let msg = format!(
                    "the sequence needs more KV cache than the whole cache holds ({} tokens); give the server more --kv-cache-memory or ask for fewer tokens",
                    self.limits.kv_capacity_tokens
                );
                self.finish_request(req, FinishReason::Error(msg));
            }
        }
        self.stalled = plan.is_empty() && self.sched.has_work();
        if !plan.is_empty() {
            self.stats.steps += 1;
            self.current_step = Some(self.step_record(&plan));
            let plan = self.prepare(plan);
            for s in &plan.scheduled {
                let Some(req) = self.seqs.get(&s.id).map(|rt| rt.request) else { continue };
                let Some(e) = self.requests.get_mut(&req) else { continue };
                if e.clock.scheduled(self.stats.steps, step_started) {
                    if let Some(p) = &mut self.profiler {
                        p.request_span(req, "queued", e.clock.arrived, step_started, json!({"prompt_tokens": e.request.prompt.len()}));
                    }
                }
            }
            let t_prepared = self.profiler.is_some().then(Instant::now);
            let rows = self.execute(&plan);
            let t_forward = self.profiler.is_some().then(Instant::now);
            self.update(&plan, rows);
            self.answer_failures();
            if let (Some(t0), Some(t1), Some(t2)) = (t_step, t_prepared, t_forward) {
                self.profile_step(&plan, [t0, t1, t2, Instant::now()]);
            }
            self.record_step(step_started);
            let tokens: usize = plan.scheduled.iter().map(|s| s.len).sum();
            self.stats.step_tokens.observe(tokens as f64);
            self.stats.step_seconds.observe(step_started.elapsed().as_secs_f64());
            self.current_step = None;
        }
        if !self.sched.has_work() {
            // Idle after this step: the activation blocks kept for reuse go back to the system.
            glassbox_model::alloc::release();
        }
        std::mem::take(&mut self.outbox)
    }

    /// Keep the step's composition and duration in the ring buffer behind `/debug/steps`.
    fn record_step(&mut self, started: Instant) {
        const KEPT: usize = 256;
        let Some(step) = &self.current_step else { return };
        let batch: Vec<Value> =
            step.rows.iter().map(|r| json!({"seq": r.seq, "request": r.request, "completion": r.index, "start": r.start, "tokens": r.len})).collect();
        let entry = json!({
            "step": step.number,
            "at_ms": started.duration_since(self.started_at).as_secs_f64() * 1e3,
            "duration_ms": started.elapsed().as_secs_f64() * 1e3,
            "tokens": step.rows.iter().map(|r| r.len).sum::<usize>(),
            "preempted": step.preempted.len(),
            "batch": batch,
        });
        if self.recent_steps.len() == KEPT {
            self.recent_steps.pop_front();
        }
        self.recent_steps.push_back(entry);
    }

    /// Live views for the debug endpoints, as plain JSON: `requests`, `kv`, `steps`.
    pub fn inspect(&self, what: &Inspect) -> Value {
        match what {
            Inspect::Requests => Value::Array(
                self.requests_in_order()
                    .into_iter()
                    .filter_map(|id| self.requests.get(&id).map(|e| (id, e)))
                    .map(|(id, e)| {
                        let seqs: Vec<Value> = e
                            .seqs
                            .iter()
                            .filter_map(|s| {
                                let st = self.sched.seqs.get(s)?;
                                Some(json!({
                                    "completion": self.seqs.get(s).map_or(0, |r| r.index),
                                    "state": st.status().as_str(),
                                    "in_state_ms": st.time_in_status().as_secs_f64() * 1e3,
                                    "tokens_computed": st.num_computed,
                                    "tokens_total": st.tokens.len(),
                                    "generated": st.tokens.len() - st.prompt_len,
                                    "blocks": st.blocks.len(),
                                    "preemptions": st.preemptions,
                                }))
                            })
                            .collect();
                        let r = &e.request;
                        json!({
                            "id": id,
                            "age_ms": e.clock.arrived.elapsed().as_secs_f64() * 1e3,
                            "prompt_tokens": r.prompt.len(),
                            "max_tokens": r.sampling.max_tokens,
                            "capture": r.capture.as_ref().map(|c| json!({"hooks": c.hooks.len(), "positions": format!("{:?}", c.positions).to_lowercase()})),
                            "steer": r.steer.iter().map(|s| s.hook.to_string()).collect::<Vec<_>>(),
                            "sequences": seqs,
                        })
                    })
                    .collect(),
            ),
            Inspect::Kv { tables } => {
                let pool = &self.sched.pool;
                let mut v = json!({
                    "blocks_total": pool.num_blocks(),
                    "blocks_used": pool.num_used(),
                    "blocks_free": pool.num_free(),
                    "block_size": pool.block_size,
                    "prefix_cached_blocks": pool.num_cached(),
                    "prefix_hit_rate": pool.hit_rate(),
                });
                if *tables {
                    let t: serde_json::Map<String, Value> =
                        self.seqs.iter().filter_map(|(s, rt)| Some((format!("{}/{}", rt.request, rt.index), json!(self.sched.seqs.get(s)?.blocks)))).collect();
                    v["block_tables"] = Value::Object(t);
                }
                v
            }
            Inspect::Steps { last } => Value::Array(self.recent_steps.iter().rev().take(*last).rev().cloned().collect()),
        }
    }

    /// Record a step in the running profile: its phases (schedule and prepare, forward,
    /// update = sampling, detokenization, stop checks) with the batch composition, and each
    /// request's share; auto-stop after `num_steps`.
    fn profile_step(&mut self, plan: &SchedulerOutput, [t0, t1, t2, t3]: [Instant; 4]) {
        let (Some(prof), Some(step)) = (self.profiler.as_mut(), &self.current_step) else { return };
        let mut per_request = vec![];
        let (mut prefill_rows, mut decode_rows) = (0, 0);
        // The rows that ran (a sequence that failed its preparation left the plan).
        for r in step.rows.iter().filter(|r| plan.scheduled.iter().any(|s| s.id == r.seq)) {
            let prefill = r.start < r.prompt_len;
            if prefill {
                prefill_rows += r.len;
            } else {
                decode_rows += r.len;
            }
            per_request.push(json!({"request": r.request, "completion": r.index, "tokens": r.len, "prefill": prefill}));
            let name = if prefill { "prefill chunk" } else { "decode" };
            prof.request_span(r.request, name, t1, t2, json!({"completion": r.index, "tokens": r.len, "positions": [r.start, r.start + r.len]}));
        }
        for o in self.outbox.iter().filter(|o| o.finish.is_some()) {
            prof.request_mark(o.id, "finished", t3, json!({"completion": o.index, "reason": o.finish.as_ref().map(|f| f.as_str()), "completion_tokens": o.completion_tokens}));
        }
        let step = self.stats.steps;
        prof.span("schedule + prepare", t0, t1, json!({"step": step}));
        prof.span("forward", t1, t2, json!({"step": step, "rows": prefill_rows + decode_rows}));
        prof.span("update", t2, t3, json!({"step": step}));
        prof.span("step", t0, t3, json!({"step": step, "requests": per_request.len(), "prefill_rows": prefill_rows, "decode_rows": decode_rows, "batch": per_request, "preempted": plan.preempted.len()}));
        if prof.step_done() {
            if let Some(p) = self.profiler.take() {
                match p.finish() {
                    Ok(f) => tracing::info!("profile auto-stopped after {} steps: {} and {}", f.steps, f.trace.display(), f.summary.display()),
                    Err(e) => tracing::error!("writing the profile failed: {e}"),
                }
            }
        }
    }

    /// After a panic escaped `step` (a bug outside any one request's work): answer every
    /// request in flight with an error, keep what the step had already decided, write a crash
    /// dump. The engine goes on with an empty queue.
    pub fn recover(&mut self, panic: &str) -> Vec<EngineOutput> {
        let msg = format!("internal error in the engine step: {panic}");
        tracing::error!("{msg}");
        let everyone: Vec<(RequestId, String)> = self.requests_in_order().into_iter().map(|id| (id, msg.clone())).collect();
        self.step_failures.extend(everyone);
        self.answer_failures();
        self.current_step = None;
        std::mem::take(&mut self.outbox)
    }

    /// Write a dump of the engine's state now (SIGQUIT, `/debug/dump_state`).
    pub fn dump_state(&self, reason: &str) -> Result<PathBuf, String> {
        let dir = self.cfg.crash_dump_dir.as_ref().ok_or("no crash dump directory is configured")?;
        crash::write(dir, "state", &self.crash_dump(reason, vec![])).map_err(|e| format!("cannot write the dump under {}: {e}", dir.display()))
    }

    /// Everything needed to rerun the requests in flight.
    pub fn crash_dump(&self, reason: &str, failed: Vec<FailedRequest>) -> CrashDump {
        let requests = self
            .requests_in_order()
            .into_iter()
            .filter_map(|id| self.requests.get(&id))
            .map(|e| DumpedRequest {
                request: e.request.clone(),
                sequences: e
                    .seqs
                    .iter()
                    .filter_map(|s| {
                        let st = self.sched.seqs.get(s)?;
                        Some(DumpedSequence {
                            index: self.seqs.get(s).map_or(0, |r| r.index),
                            generated: st.tokens[st.prompt_len..].to_vec(),
                            num_computed: st.num_computed,
                            running: st.status() == SeqStatus::Running,
                        })
                    })
                    .collect(),
            })
            .collect();
        CrashDump {
            reason: reason.to_string(),
            time: chrono::Utc::now().to_rfc3339(),
            build: crash::BuildInfo::current(),
            model: crash::ModelInfo {
                name: self.model.name.clone(),
                path: self.model.source.path().to_path_buf(),
                dequantize: self.model.options.dequantize,
                batch_invariant: self.model.options.batch_invariant,
            },
            config: self.cfg.clone(),
            step: self.current_step.clone(),
            failed,
            requests,
            fault: self.fault,
        }
    }

    fn requests_in_order(&self) -> Vec<RequestId> {
        let by_arrival: BTreeMap<u64, RequestId> = self.requests.iter().map(|(&id, e)| (e.arrival, id)).collect();
        by_arrival.into_values().collect()
    }

    fn step_record(&self, plan: &SchedulerOutput) -> StepRecord {
        let mut row = 0;
        let rows = plan
            .scheduled
            .iter()
            .map(|s| {
                let rt = self.seqs.get(&s.id);
                let prompt_len = self.sched.seqs.get(&s.id).map_or(0, |st| st.prompt_len);
                let r = StepRows { seq: s.id, request: rt.map_or(0, |r| r.request), index: rt.map_or(0, |r| r.index), row, prompt_len, start: s.start, len: s.len };
                row += s.len;
                r
            })
            .collect();
        StepRecord { number: self.stats.steps, rows, preempted: plan.preempted.clone() }
    }

    /// Test builds: the fault plan, if it targets `phase` of request `req`. (Takes the two
    /// fields it reads, so it can be called while a sequence's state is borrowed.)
    fn fault_for(fault: &Option<FaultPlan>, requests: &HashMap<RequestId, RequestEntry>, phase: Phase, req: RequestId) -> Option<FaultPlan> {
        let f = fault.as_ref()?;
        f.targets(phase, requests.get(&req)?.request.sampling.seed).then_some(*f)
    }

    /// Test builds: strike if the fault plan targets `phase` of this request.
    fn fault(&self, phase: Phase, req: RequestId) -> Result<(), String> {
        Self::fault_for(&self.fault, &self.requests, phase, req).map_or(Ok(()), |f| f.strike(req))
    }

    /// Each sequence's own preparation for the step; a sequence that fails here leaves the
    /// plan (its request is answered with the error at the end of the step).
    fn prepare(&mut self, mut plan: SchedulerOutput) -> SchedulerOutput {
        let reqs: Vec<RequestId> = plan.scheduled.iter().filter_map(|s| self.seqs.get(&s.id).map(|r| r.request)).collect();
        for req in reqs {
            if let Err(e) = guarded("preparing the step", || self.fault(Phase::Schedule, req)) {
                self.step_failures.push((req, e));
            }
        }
        let failed: Vec<RequestId> = self.step_failures.iter().map(|f| f.0).collect();
        plan.scheduled.retain(|s| self.seqs.get(&s.id).is_some_and(|r| !failed.contains(&r.request)));
        plan
    }

    /// The forward pass over the whole plan; if it fails, each sequence alone, so a failure
    /// is pinned on the sequence that causes it and the others go on unchanged.
    fn execute(&mut self, plan: &SchedulerOutput) -> Vec<RowResult> {
        if plan.scheduled.is_empty() {
            return vec![];
        }
        match self.forward(&plan.scheduled, true) {
            Ok(rows) => rows.into_iter().map(Ok).collect(),
            Err(e) if plan.scheduled.len() == 1 => vec![Err(e)],
            Err(e) => {
                tracing::warn!("a batched forward pass failed ({e}); rerunning its {} sequences one at a time", plan.scheduled.len());
                plan.scheduled.iter().map(|s| self.forward(std::slice::from_ref(s), false).map(|mut rows| rows.pop().flatten())).collect()
            }
        }
    }

    /// One forward pass over these sequences' scheduled tokens. Returns, per sequence, the
    /// last logits row of each that completes its known tokens. A failure (error or panic)
    /// leaves no trace: KV rows written for these positions are rewritten by the retry, and
    /// rows captured in this pass are dropped.
    fn forward(&mut self, scheduled: &[ScheduledSeq], may_dump: bool) -> Result<Vec<Option<Vec<f32>>>, String> {
        let mut layout = BatchLayout::default();
        let mut tokens = Vec::with_capacity(scheduled.iter().map(|s| s.len).sum());
        let mut tables = HashMap::with_capacity(scheduled.len());
        let logits_hook = HookName::global(Site::Logits);
        let mut hookset = HookSet::default();
        let mut fault_key = None;
        for ScheduledSeq { id, start, len } in scheduled {
            let seq = &self.sched.seqs[id];
            tokens.extend_from_slice(&seq.tokens[*start..start + len]);
            let completes = start + len == seq.tokens.len();
            let wants_all = self.collector.wants(*id, logits_hook);
            let rows = match (completes, wants_all) {
                (_, true) => LogitRows::All,
                (true, false) => LogitRows::Last,
                (false, false) => LogitRows::None,
            };
            layout.push(*id, *len, *start, rows);
            tables.insert(*id, seq.blocks.clone());
            // Only sequences in this step decide which hooks run.
            if let Some(set) = self.collector.hook_set_of(*id) {
                hookset.union(set);
            }
            if let Some(set) = self.steering.hook_set_of(*id) {
                hookset.union(set);
            }
            if let Some(set) = self.lens.hook_set_of(*id) {
                hookset.union(set);
            }
            let req = self.seqs[id].request;
            if let Some(f) = Self::fault_for(&self.fault, &self.requests, Phase::Hook, req) {
                fault_key = Some((*id, req, f));
                hookset.insert(HookName::block(0, Site::ResidPost));
            }
        }
        // Test builds: the requests of this pass that a forward fault targets.
        let forward_fault: Vec<(FaultPlan, RequestId)> = scheduled
            .iter()
            .map(|s| self.seqs[&s.id].request)
            .filter_map(|r| Some((Self::fault_for(&self.fault, &self.requests, Phase::Forward, r)?, r)))
            .collect();
        // Tensor dumps: the whole batch of this step, for the dump's hooks.
        let dumping = may_dump && self.dumper.as_ref().is_some_and(|d| d.wants(self.stats.steps));
        let dump_set = match (&self.dumper, dumping) {
            (Some(d), true) => {
                hookset.union(&d.set);
                Some(d.set.clone())
            }
            _ => None,
        };
        let mut step_dump = StepDump::default();
        let completes: Vec<bool> = scheduled.iter().map(|s| s.start + s.len == self.sched.seqs[&s.id].tokens.len()).collect();
        self.collector.begin_pass();
        let model = self.model.clone();
        // A profile with layers: per-layer and per-op timings of this pass.
        let mut ops = self.profiler.as_ref().is_some_and(|p| p.with_layers).then(Vec::new);
        let (kv, collector, steering, lens) = (&mut self.kv, &mut self.collector, &self.steering, &mut self.lens);
        let result = guarded("the forward pass", || {
            for (f, req) in &forward_fault {
                f.strike(*req)?;
            }
            let mut cache = kv.with_tables(&tables);
            let mut hooks = StepHooks { steering, collector, lens, model: &model.model, dump: dump_set.as_ref().map(|s| (s, &mut step_dump)) };
            let mut faulty;
            let handler: &mut dyn HookHandler = match fault_key {
                Some((key, req, plan)) => {
                    faulty = FaultyHook { inner: &mut hooks, key, req, plan };
                    &mut faulty
                }
                None => &mut hooks,
            };
            let mut ctx = ForwardCtx::new(&layout, &mut cache).with_hooks(&hookset, handler);
            if let Some(ops) = ops.as_mut() {
                ctx = ctx.with_ops(ops);
            }
            let logits = model.model.forward(&tokens, &mut ctx).map_err(|e| e.to_string())?;
            let vocab = logits.dims2().map_err(|e| e.to_string())?.1;
            // The last logits row of each sequence that completes, in plan order: only those
            // rows are copied out of the step's logits.
            glassbox_model::weights::with_f32(&logits, |flat| {
                completes
                    .iter()
                    .enumerate()
                    .map(|(i, &done)| {
                        let (first, range) = layout.logit_range(i);
                        let row = first + range.len();
                        (done && !range.is_empty()).then(|| flat[(row - 1) * vocab..row * vocab].to_vec())
                    })
                    .collect()
            })
            .map_err(|e| e.to_string())
        });
        if let (Some(p), Some(ops)) = (self.profiler.as_mut(), ops) {
            p.ops(&ops);
        }
        if result.is_err() {
            self.collector.rollback_pass();
        } else if let (true, Some(d)) = (dumping, self.dumper.as_mut()) {
            let owners: Vec<(RequestId, usize)> = scheduled.iter().map(|s| self.seqs.get(&s.id).map_or((0, 0), |r| (r.request, r.index))).collect();
            d.send(self.stats.steps, &layout, &owners, step_dump);
            self.stats.dumps_written += 1;
        }
        result
    }

    fn update(&mut self, plan: &SchedulerOutput, rows: Vec<RowResult>) {
        // Test builds: a fault here is outside every per-request guard (see `recover`).
        let reqs: Vec<RequestId> = plan.scheduled.iter().filter_map(|s| self.seqs.get(&s.id).map(|r| r.request)).collect();
        if let Err(e) = reqs.iter().try_for_each(|&r| self.fault(Phase::Step, r)) {
            panic!("{e}");
        }
        for (s, row) in plan.scheduled.iter().zip(rows) {
            let Some(req) = self.seqs.get(&s.id).map(|r| r.request) else { continue };
            let row = match row {
                Ok(row) => row,
                Err(e) => {
                    self.step_failures.push((req, format!("engine step failed: {e}")));
                    continue;
                }
            };
            let seq = &self.sched.seqs[&s.id];
            if s.start < seq.prompt_len {
                self.stats.prompt_tokens_computed += s.len.min(seq.prompt_len - s.start) as u64;
            }
            self.sched.computed(s.id, s.len);
            let Some(row) = row else { continue };
            match guarded("sampling", || self.sample(s.id, req, &row)) {
                Ok((out, finished)) => {
                    let token = out.new_tokens[0];
                    self.outbox.push(out);
                    if finished {
                        self.finish_seq(s.id);
                    } else {
                        self.sched.append_token(s.id, token);
                    }
                }
                Err(e) => self.step_failures.push((req, e)),
            }
        }
    }

    /// Sample the next token of sequence `id`, detokenize it and check stop conditions.
    /// Returns its output and whether the sequence has finished (captures attached).
    fn sample(&mut self, id: SeqId, req: RequestId, row: &[f32]) -> Result<(EngineOutput, bool), String> {
        self.fault(Phase::Sample, req)?;
        let eos = &self.model.eos_token_ids;
        let seq = &self.sched.seqs[&id];
        let (prompt_len, total, cached) = (seq.prompt_len, seq.tokens.len(), seq.cached_tokens);
        let rt = self.seqs.get_mut(&id).ok_or("sequence vanished")?;
        let p = rt.sampler.params().clone();
        let mut banned = vec![];
        if rt.generated < p.min_tokens {
            if !p.ignore_eos {
                banned.extend(eos);
            }
            banned.extend(&p.stop_token_ids);
        }
        let sampled = rt.sampler.sample(row, &seq.tokens, &banned);
        let token = sampled.token;
        rt.generated += 1;
        if let Some(f) = Self::fault_for(&self.fault, &self.requests, Phase::Detokenize, req) {
            f.strike(req)?;
        }
        let stop_hit = matches!(rt.detok.push(&self.model.tokenizer, token)?, StopMatch::Stop);
        let eos_hit = !p.ignore_eos && eos.contains(&token);
        let finish = if eos_hit || p.stop_token_ids.contains(&token) || stop_hit {
            Some(FinishReason::Stop)
        } else if rt.generated >= p.max_tokens || total + 1 >= self.limits.max_model_len {
            Some(FinishReason::Length)
        } else {
            None
        };
        let mut out = EngineOutput {
            id: rt.request,
            index: rt.index,
            new_tokens: vec![token],
            text: rt.detok.take(finish.is_some()),
            logprobs: sampled.logprob.into_iter().collect(),
            finish: finish.clone(),
            capture: None,
            logit_lens: vec![],
            prompt_tokens: prompt_len,
            completion_tokens: rt.generated,
            cached_tokens: cached,
            timings: None,
        };
        let now = Instant::now();
        if let Some(e) = self.requests.get_mut(&req) {
            e.clock.token(now);
            if let Some(f) = &finish {
                let t = e.clock.timings(now);
                tracing::debug!(request_id = e.request.tag.as_deref().unwrap_or(""), engine_id = req, completion = out.index, reason = f.as_str(), tokens = out.completion_tokens, queued_s = t.queued, prefill_s = t.prefill, decode_s = t.decode, steps = t.steps, "finished");
                out.timings = Some(t);
            }
        }
        if finish.is_some() {
            out.logit_lens = self.lens.finish(id);
            // Handed over as captured; the receiver assembles (not on this thread).
            out.capture = self.collector.take_parts(id);
        }
        Ok((out, finish.is_some()))
    }

    /// Drop everything the engine holds for sequence `id` (its blocks are freed). Every
    /// per-sequence table is cleared here, and only here.
    fn forget_seq(&mut self, id: SeqId) -> Option<(SeqRuntime, Option<SeqState>)> {
        let rt = self.seqs.remove(&id)?;
        let state = self.sched.remove(id);
        self.collector.discard(id);
        self.steering.remove(id);
        self.lens.remove(id);
        Some((rt, state))
    }

    /// Forget a sequence that has sent its finishing output.
    fn finish_seq(&mut self, id: SeqId) {
        let Some((rt, _)) = self.forget_seq(id) else { return };
        if let Some(e) = self.requests.get_mut(&rt.request) {
            e.seqs.retain(|&x| x != id);
            if e.seqs.is_empty() {
                self.requests.remove(&rt.request);
            }
        }
    }

    /// End every unfinished sequence of a request with `reason` (abort or error) and free its
    /// blocks. Each sequence gets exactly one finishing output.
    fn finish_request(&mut self, req: RequestId, reason: FinishReason) {
        let Some(entry) = self.requests.remove(&req) else { return };
        let timings = entry.clock.timings(Instant::now());
        tracing::debug!(request_id = entry.request.tag.as_deref().unwrap_or(""), engine_id = req, reason = reason.as_str(), "finished");
        for s in entry.seqs {
            let Some((rt, state)) = self.forget_seq(s) else { continue };
            let mut out = EngineOutput::error(req, "");
            out.index = rt.index;
            out.finish = Some(reason.clone());
            out.prompt_tokens = state.as_ref().map_or(0, |st| st.prompt_len);
            out.completion_tokens = rt.generated;
            out.timings = Some(timings.clone());
            self.outbox.push(out);
        }
    }

    /// Answer the requests whose share of this step failed, after writing one crash dump
    /// that holds them (and everything else in flight).
    fn answer_failures(&mut self) {
        if self.step_failures.is_empty() {
            return;
        }
        let mut failures = std::mem::take(&mut self.step_failures);
        // Each request once (its first failure), and only if it is still in flight.
        let mut seen = std::collections::HashSet::new();
        failures.retain(|(r, _)| self.requests.contains_key(r) && seen.insert(*r));
        let reason = failures.first().map(|f| f.1.clone()).unwrap_or_default();
        let failed = failures.iter().map(|(r, m)| FailedRequest { request: *r, message: m.clone() }).collect();
        let dump = self.cfg.crash_dump_dir.as_ref().map(|dir| crash::write(dir, "crash", &self.crash_dump(&reason, failed)));
        let suffix = match dump {
            Some(Ok(path)) => {
                tracing::error!("step failed for {} request(s): {reason}; crash dump written to {}", failures.len(), path.display());
                format!(" (crash dump: {})", path.display())
            }
            Some(Err(e)) => {
                tracing::error!("step failed: {reason}; writing the crash dump failed: {e}");
                String::new()
            }
            None => {
                tracing::error!("step failed for {} request(s): {reason}", failures.len());
                String::new()
            }
        };
        for (req, msg) in failures {
            self.finish_request(req, FinishReason::Error(format!("{msg}{suffix}")));
        }
    }
}

/// Test builds: a hook handler that fails on the rows of the chosen request, in front of the
/// capture collector.
struct FaultyHook<'a> {
    inner: &'a mut dyn HookHandler,
    key: SeqId,
    req: RequestId,
    plan: FaultPlan,
}

impl HookHandler for FaultyHook<'_> {
    fn on_hook(&mut self, name: HookName, x: &candle_core::Tensor, rows: HookRows, layout: &BatchLayout) -> glassbox_model::Result<Option<candle_core::Tensor>> {
        if layout.seqs.iter().any(|s| s.key == self.key) {
            self.plan.strike(self.req).map_err(ModelError::BadConfig)?;
        }
        self.inner.on_hook(name, x, rows, layout)
    }
}
