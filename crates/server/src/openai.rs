//! OpenAI (and vLLM-extension) request bodies. Unknown fields are ignored, as vLLM does.

use serde::Deserialize;
use utoipa::ToSchema;

/// A string or a list of strings (`stop`).
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StringOrList::One(s) => vec![s],
            StringOrList::Many(v) => v,
        }
    }
}

/// `prompt`: text, texts, token ids, or lists of token ids.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields shared by both endpoints.
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
pub struct Common {
    pub model: Option<String>,
    #[schema(minimum = 1)]
    #[serde(default, deserialize_with = "integer")]
    pub max_tokens: Option<i64>,
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f32>,
    #[schema(exclusive_minimum = 0, maximum = 1)]
    pub top_p: Option<f32>,
    #[schema(minimum = 1, maximum = 128)]
    #[serde(default, deserialize_with = "integer")]
    pub n: Option<i64>,
    pub stop: Option<StringOrList>,
    #[serde(default, deserialize_with = "seed")]
    pub seed: Option<u64>,
    #[schema(minimum = -2, maximum = 2)]
    pub presence_penalty: Option<f32>,
    #[schema(minimum = -2, maximum = 2)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Accepted for OpenAI compatibility; glassbox does not use it.
    #[allow(dead_code)]
    pub user: Option<String>,
    // vLLM's extras.
    /// -1 or 0: no limit.
    #[schema(minimum = -1)]
    #[serde(default, deserialize_with = "integer")]
    pub top_k: Option<i64>,
    #[schema(minimum = 0, maximum = 1)]
    pub min_p: Option<f32>,
    #[schema(exclusive_minimum = 0)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub ignore_eos: bool,
    #[schema(minimum = 0)]
    #[serde(default, deserialize_with = "integer")]
    pub min_tokens: Option<i64>,
    pub stop_token_ids: Option<Vec<u32>>,
    // glassbox's introspection.
    /// Capture activations (returned in each choice's `capture`).
    pub capture: Option<CaptureRequest>,
    /// Change activations of this request only (others in the batch are untouched).
    pub steer: Option<Vec<SteerRequest>>,
    /// Per layer and position, the top tokens of the final norm + unembedding applied to that
    /// layer's `hook_resid_post` (returned in each choice's `logit_lens`).
    pub logit_lens: Option<LensRequest>,
    /// Add each choice's `timings`: time queued, to first token, in prefill and decode
    /// (milliseconds, from its arrival at the engine), engine steps and preemptions.
    #[serde(default)]
    pub return_timings: bool,
}

#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LensRequest {
    /// `"all"` or a list of layer indices.
    pub layers: LensLayers,
    /// Tokens per layer and position (1 to 20; default 5).
    #[schema(minimum = 1, maximum = 20)]
    pub top_k: Option<usize>,
    /// As for captures; default `last`.
    pub positions: Option<CapturePositionsRequest>,
}

#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum LensLayers {
    Named(String),
    List(Vec<usize>),
}

/// One intervention: exactly one of `add`, `vector` (a named vector, added), `replace`, `ablate`.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SteerRequest {
    /// A hook name or glob (`blocks.6.hook_resid_post`, `blocks.*.attn.hook_z`).
    pub hook: String,
    /// Added to the activation (times `scale`).
    pub add: Option<Vec<f32>>,
    /// The name of a vector loaded with --steering-vectors or POST /v1/steering_vectors (added).
    pub vector: Option<String>,
    /// Put in place of the activation.
    pub replace: Option<Vec<f32>>,
    /// Zero the activation.
    #[serde(default)]
    pub ablate: bool,
    /// Multiplies `add`/`vector` (default 1).
    pub scale: Option<f32>,
    /// `all` (default), `prompt`, `generated`, or a list of positions. Steering prompt
    /// positions changes the prompt's KV cache (the request gets its own prefix-cache entries).
    pub positions: Option<SteerPositionsRequest>,
    /// Head-shaped hooks only (`hook_q/k/v/z`...): these heads; vectors then have `d_head` values.
    pub heads: Option<Vec<usize>>,
}

#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum SteerPositionsRequest {
    Named(String),
    List(Vec<usize>),
}

/// `POST /v1/steering_vectors`.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SteeringVectorRequest {
    #[schema(min_length = 1)]
    pub name: String,
    #[schema(min_items = 1)]
    pub vector: Vec<f32>,
}

/// `"capture": {"hooks": ["blocks.*.hook_resid_post"], "positions": "last", "dtype": "float16"}`.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CaptureRequest {
    /// Hook names or globs (`blocks.*.hook_resid_post`, `blocks.{0,5}.attn.hook_z`); see HOOKS.md.
    #[schema(min_items = 1)]
    pub hooks: Vec<String>,
    /// `all` (default), `last`, `prompt`, `generated`, or a list of positions (negative from the end).
    pub positions: Option<CapturePositionsRequest>,
    /// `float32` (default), `float16` or `bfloat16`.
    pub dtype: Option<String>,
    /// `inline` (default: base64 safetensors in the choice) or `url` (download once from
    /// `/v1/captures/{id}`).
    #[serde(rename = "return")]
    pub return_as: Option<String>,
}

#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum CapturePositionsRequest {
    Named(String),
    List(Vec<i64>),
}

#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    /// Completions' logprobs: how many alternatives.
    #[schema(minimum = 0, maximum = 20)]
    #[serde(default, deserialize_with = "integer")]
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct ChatRequest {
    /// `[{"role": ..., "content": ...}]`; content may be a string or text parts.
    #[schema(value_type = Vec<Object>)]
    pub messages: Vec<serde_json::Value>,
    #[schema(minimum = 1)]
    #[serde(default, deserialize_with = "integer")]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub logprobs: bool,
    #[schema(minimum = 0, maximum = 20)]
    #[serde(default, deserialize_with = "integer")]
    pub top_logprobs: Option<i64>,
    #[serde(default = "default_true")]
    pub add_generation_prompt: bool,
    /// Extra template variables (vLLM's `chat_template_kwargs`).
    #[schema(value_type = Option<Object>)]
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(flatten)]
    pub common: Common,
}

fn default_true() -> bool {
    true
}

#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct TokenizeRequest {
    pub prompt: Option<String>,
    #[schema(value_type = Option<Vec<Object>>)]
    pub messages: Option<Vec<serde_json::Value>>,
    #[serde(default = "default_true")]
    pub add_special_tokens: bool,
    #[serde(default = "default_true")]
    pub add_generation_prompt: bool,
}

#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct DetokenizeRequest {
    pub tokens: Vec<u32>,
}

/// The OpenAI error format every 4xx/5xx answer uses.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorDetail {
    pub message: String,
    #[schema(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: u16,
}

/// An integer field: JSON Schema counts `9.0` as the integer 9, and so do OpenAI and vLLM.
fn integer<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let v: Option<serde_json::Number> = Deserialize::deserialize(d)?;
    v.map(|n| match (n.as_i64(), n.as_f64()) {
        (Some(i), _) => Ok(i),
        (None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(f as i64),
        _ => Err(serde::de::Error::custom(format!("expected an integer, got {n}"))),
    })
    .transpose()
}

/// `seed`: a non-negative integer (integral floats accepted, as for every integer field).
fn seed<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v: Option<serde_json::Number> = Deserialize::deserialize(d)?;
    v.map(|n| match (n.as_u64(), n.as_f64()) {
        (Some(u), _) => Ok(u),
        (None, Some(f)) if f.fract() == 0.0 && (0.0..9.0e15).contains(&f) => Ok(f as u64),
        _ => Err(serde::de::Error::custom(format!("`seed` must be a non-negative integer, got {n}"))),
    })
    .transpose()
}

/// `POST /debug/dump`: start (or change) tensor dumps into the server's dump directory, or stop.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TensorDumpRequest {
    /// False stops dumping (default true).
    pub enabled: Option<bool>,
    /// Hook names or globs (default: every hook but attention patterns).
    pub hooks: Option<Vec<String>>,
    pub layers: Option<Vec<usize>>,
    pub skip_steps: Option<u64>,
    pub max_steps: Option<u64>,
}

/// `POST /start_profile` (every field optional; the body may be empty).
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartProfileRequest {
    /// Stop by itself after this many engine steps.
    #[schema(minimum = 1)]
    pub num_steps: Option<u64>,
    /// A label for the files: letters, digits, `-`, `_`.
    pub name: Option<String>,
    /// Also time every layer and op of each forward pass (attention, each matmul, norms,
    /// hook handlers).
    #[serde(default)]
    pub with_layers: bool,
}
