//! Plain data that crosses the engine boundary.
//!
//! Architecture invariant: nothing here holds a tensor, a channel, a lock or a callback.
//! Requests go in, per-step outputs come out, captures travel as bytes + shape + dtype, so
//! the engine could live in another thread or process without change.

pub mod capture;
pub mod hook;

pub use capture::{CaptureChunk, CaptureParts};
pub use hook::{close_names, resolve_patterns, HookError, HookName, HookPattern, Site};

use serde::{Deserialize, Serialize};

pub type RequestId = u64;

/// How to pick the next token. Defaults are greedy with no limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means no limit.
    pub top_k: usize,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
    pub max_tokens: usize,
    pub min_tokens: usize,
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    /// Return this many top alternatives with each token's logprob (`None`: no logprobs).
    pub logprobs: Option<usize>,
    /// Number of completions sharing the prompt.
    pub n: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: 16,
            min_tokens: 0,
            ignore_eos: false,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            logprobs: None,
            n: 1,
        }
    }
}

/// Which token positions a capture keeps. Positions count from 0 over the prompt and the
/// generated tokens that went through the model (the last sampled token never does).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CapturePositions {
    All,
    Last,
    Prompt,
    Generated,
    /// These positions; negative ones count from the end (-1 is the last).
    At(Vec<i64>),
}

impl CapturePositions {
    /// At most how many positions a request with this prompt and `max_tokens` keeps.
    pub fn max_rows(&self, prompt_len: usize, max_tokens: usize) -> usize {
        match self {
            CapturePositions::All => prompt_len + max_tokens,
            CapturePositions::Last => 1,
            CapturePositions::Prompt => prompt_len,
            CapturePositions::Generated => max_tokens,
            CapturePositions::At(v) => v.len(),
        }
    }

    /// While a sequence runs: can a row at `pos` still be returned? (Which row is last, and
    /// where negative positions land, is known only at the end.)
    pub fn may_keep(&self, pos: usize, prompt_len: usize) -> bool {
        match self {
            CapturePositions::All | CapturePositions::Last => true,
            CapturePositions::Prompt => pos < prompt_len,
            CapturePositions::Generated => pos >= prompt_len,
            CapturePositions::At(v) => v.iter().any(|&i| i < 0 || i as usize == pos),
        }
    }

    /// At the end, with positions `0..end` computed: is `pos` returned?
    pub fn keeps(&self, pos: usize, prompt_len: usize, end: usize) -> bool {
        match self {
            CapturePositions::Last => pos + 1 == end,
            CapturePositions::At(v) => v.iter().any(|&i| (if i < 0 { end as i64 + i } else { i }) == pos as i64),
            _ => self.may_keep(pos, prompt_len),
        }
    }

    /// Rows the prompt's prefix-cache hits would skip are needed: the whole prompt is computed.
    pub fn needs_prompt_rows(&self) -> bool {
        !matches!(self, CapturePositions::Generated | CapturePositions::Last)
    }
}

impl std::str::FromStr for CapturePositions {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Self::All),
            "last" => Ok(Self::Last),
            "prompt" => Ok(Self::Prompt),
            "generated" => Ok(Self::Generated),
            _ => Err(format!("unknown capture positions `{s}` (expected all, last, prompt, generated or a list of positions)")),
        }
    }
}

/// What to capture for one request: resolved hook names (never globs), positions, and the
/// element type the values are returned in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaptureSpec {
    pub hooks: Vec<HookName>,
    pub positions: CapturePositions,
    #[serde(default)]
    pub dtype: DType,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DType {
    #[default]
    #[serde(rename = "float32")]
    F32,
    #[serde(rename = "float16")]
    F16,
    #[serde(rename = "bfloat16")]
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The API's name (numpy/torch style).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }

    pub fn parse(s: &str) -> Option<DType> {
        [DType::F32, DType::F16, DType::BF16].into_iter().find(|d| d.name() == s)
    }

    /// Little-endian bytes of `values` in this type (f16/bf16 round to nearest).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
            DType::BF16 => values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
        }
    }

    /// The values of little-endian `bytes` of this type, as f32 (exact: f16 and bf16 widen
    /// without loss).
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            DType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            DType::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            DType::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        }
    }
}

/// One captured activation as plain data: little-endian bytes, row-major `shape`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Capture {
    pub hook: HookName,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub data: Vec<u8>,
    /// Absolute token positions of the rows (the `T` axis).
    pub positions: Vec<usize>,
}

impl Capture {
    /// The values as f32 (exact for every dtype).
    pub fn to_f32(&self) -> Vec<f32> {
        self.dtype.decode(&self.data)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum FinishReason {
    Stop,
    Length,
    Abort,
    Error(String),
}

impl FinishReason {
    /// The OpenAI-style name.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
            FinishReason::Error(_) => "error",
        }
    }
}

/// A token's log-probability and its top alternatives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// A request as the engine sees it: tokens, not text. Plain data; it carries no channel.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineRequest {
    pub id: RequestId,
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub capture: Option<CaptureSpec>,
    /// Interventions on this request's activations (others in the batch are untouched).
    #[serde(default)]
    pub steer: Vec<SteerSpec>,
    /// The final norm and unembedding applied to chosen layers' residual streams.
    #[serde(default)]
    pub logit_lens: Option<LensSpec>,
    /// The client-visible request id (`X-Request-Id`), carried into the engine's log lines
    /// and profile tracks; never interpreted.
    #[serde(default)]
    pub tag: Option<String>,
}

/// Logit lens: at `hook_resid_post` of each layer, the top tokens of `softmax(unembed(norm(x)))`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LensSpec {
    pub layers: Vec<usize>,
    pub top_k: usize,
    pub positions: CapturePositions,
}

/// One layer's prediction at one position: `(token id, probability)`, most likely first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LensEntry {
    pub layer: usize,
    pub position: usize,
    pub top: Vec<(u32, f32)>,
}

/// One intervention on one hook point of one request: applied to the rows of the chosen
/// positions, before anything downstream (captures included) sees them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SteerSpec {
    pub hook: HookName,
    pub op: SteerOp,
    pub positions: SteerPositions,
    /// Head-shaped hooks (`hook_q`, `hook_z`, ...): only these heads; `None` is the whole row.
    pub heads: Option<Vec<usize>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SteerOp {
    /// `x + scale * vector`.
    Add { vector: Vec<f32>, scale: f32 },
    /// `vector` in place of `x`.
    Replace { vector: Vec<f32> },
    /// Zero.
    Ablate,
}

/// Which positions a steer touches. Steering prompt positions changes the prompt's KV cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SteerPositions {
    All,
    Prompt,
    Generated,
    At(Vec<usize>),
}

impl SteerPositions {
    pub fn touches(&self, pos: usize, prompt_len: usize) -> bool {
        match self {
            SteerPositions::All => true,
            SteerPositions::Prompt => pos < prompt_len,
            SteerPositions::Generated => pos >= prompt_len,
            SteerPositions::At(v) => v.contains(&pos),
        }
    }
}

/// What one step produced for one sequence (`index` tells the `n` > 1 completions apart).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EngineOutput {
    pub id: RequestId,
    pub index: usize,
    pub new_tokens: Vec<u32>,
    /// Newly final text (never a broken UTF-8 sequence, never part of a stop string).
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<FinishReason>,
    /// On the finishing output of a sequence that asked for captures: its captured rows, to be
    /// assembled by the receiver (`CaptureParts::assemble`), off the engine thread.
    pub capture: Option<CaptureParts>,
    /// Filled on the finishing output of a sequence that asked for the logit lens, ordered by
    /// position, then layer.
    #[serde(default)]
    pub logit_lens: Vec<LensEntry>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
    /// On a finishing output: where the request's time in the engine went.
    #[serde(default)]
    pub timings: Option<RequestTimings>,
}

/// Where one request's time in the engine went, in seconds from its arrival at the engine.
/// Prefill is first scheduled to first token, decode first token to finish (vLLM's split).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestTimings {
    /// Arrival to first scheduled (time in queue).
    pub queued: f64,
    /// Arrival to its first sampled token, if it got one.
    pub first_token: Option<f64>,
    pub prefill: f64,
    pub decode: f64,
    /// Arrival to finish.
    pub total: f64,
    /// Engine steps the request took part in.
    pub steps: u64,
    pub preemptions: u64,
}

impl EngineOutput {
    pub fn error(id: RequestId, message: impl Into<String>) -> Self {
        EngineOutput {
            id,
            index: 0,
            new_tokens: vec![],
            text: String::new(),
            logprobs: vec![],
            finish: Some(FinishReason::Error(message.into())),
            capture: None,
            logit_lens: vec![],
            prompt_tokens: 0,
            completion_tokens: 0,
            cached_tokens: 0,
            timings: None,
        }
    }
}
