//! Completions and chat share one path: build engine requests, submit, then answer as JSON
//! or as a server-sent event stream (with captures, logit lens and timings attached to each
//! choice's final output).

use crate::error::ApiError;
use crate::handlers::{parse, request_id, AppResult};
use crate::metrics::RequestTiming;
use crate::openai::{CapturePositionsRequest, CaptureRequest, ChatRequest, Common, CompletionRequest, ErrorBody, LensLayers, LensRequest, Prompt, SteerPositionsRequest, SteerRequest};
use crate::router::RouterMsg;
use crate::telemetry::{AccessTokens, ApiClock};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use glassbox_model::ChatContext;
use glassbox_protocol::{
    Capture, CapturePositions, CaptureSpec, DType, EngineOutput, EngineRequest, FinishReason, HookError, HookName, LensEntry, LensSpec, RequestId, RequestTimings,
    SamplingParams,
    SteerOp, SteerPositions, SteerSpec, TokenLogprob,
};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

/// What one HTTP request asks of the engine.
struct Job {
    kind: Kind,
    prompts: Vec<Vec<u32>>,
    sampling: SamplingParams,
    stream: bool,
    include_usage: bool,
    /// Chat: logprobs on. Completions: `sampling.logprobs` says it.
    chat_logprobs: bool,
    echo: Vec<String>,
    /// For tracing: the client's `X-Request-Id` or a random one; echoed in the response.
    request_id: String,
    intro: Introspection,
    /// Add each choice's engine timings (`return_timings`).
    timings: bool,
    /// The API side of the request's time (for a running profile).
    clock: Option<ApiClock>,
    path: &'static str,
    /// The caller's W3C trace context, for the OTLP span.
    traceparent: Option<String>,
}

/// What a request asks to see or change inside the model.
struct Introspection {
    capture: Option<CaptureSpec>,
    /// Store captures for download instead of returning them inline.
    capture_url: bool,
    steer: Vec<SteerSpec>,
    logit_lens: Option<LensSpec>,
}

/// The `capture`, `steer` and `logit_lens` fields shared by both endpoints.
fn introspection(st: &AppState, c: &Common) -> AppResult<Introspection> {
    let (capture, capture_url) = capture_spec(st, c.capture.as_ref())?;
    Ok(Introspection { capture, capture_url, steer: steer_specs(st, c.steer.as_deref())?, logit_lens: lens_spec(st, c.logit_lens.as_ref())? })
}

#[utoipa::path(post, path = "/v1/completions", tag = "openai", security(("api_key" = [])), request_body = CompletionRequest, params(("X-Request-Id" = Option<String>, Header, description = "Echoed in the response header", pattern = "^[!-~]{1,128}$")), responses((status = 200, description = "A completion (JSON), or server-sent events when `stream` is true"), (status = 400, description = "Bad parameters", body = ErrorBody), (status = 401, description = "Missing or wrong API key", body = ErrorBody), (status = 404, description = "Unknown model", body = ErrorBody), (status = 413, description = "Body too large", body = ErrorBody), (status = 503, description = "At capacity or stopped; see Retry-After", body = ErrorBody)))]
pub async fn completions(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> AppResult<Response> {
    let mut clock = ApiClock::start();
    let request_id = request_id(&headers)?;
    let req: CompletionRequest = parse(body)?;
    clock.lap("parse");
    check_model(&st, &req.common)?;
    let prompts: Vec<Vec<u32>> = match req.prompt {
        Prompt::Text(t) => vec![encode(&st, &t)?],
        Prompt::Texts(ts) if !ts.is_empty() => ts.iter().map(|t| encode(&st, t)).collect::<AppResult<_>>()?,
        Prompt::Tokens(t) => vec![t],
        Prompt::TokenLists(ls) if !ls.is_empty() => ls,
        _ => return Err(ApiError::bad_request("`prompt` must not be empty").param("prompt")),
    };
    clock.lap("tokenize");
    if prompts.iter().any(|p| p.is_empty()) {
        return Err(ApiError::bad_request("`prompt` must not be empty").param("prompt"));
    }
    let logprobs = match req.logprobs {
        None => None,
        Some(k @ 0..=20) => Some(k as usize),
        Some(_) => return Err(ApiError::bad_request("`logprobs` must be between 0 and 20").param("logprobs")),
    };
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let sampling = sampling(&st, &req.common, req.common.max_tokens, longest, logprobs)?;
    let echo = if req.echo { prompts.iter().map(|p| st.model.tokenizer.decode(p, false)).collect::<Result<_, _>>()? } else { vec![] };
    let intro = introspection(&st, &req.common)?;
    let job = Job {
        kind: Kind::Completion,
        prompts,
        stream: req.common.stream,
        include_usage: include_usage(&req.common),
        sampling,
        chat_logprobs: false,
        echo,
        request_id,
        timings: req.common.return_timings,
        intro,
        clock: Some(clock),
        traceparent: traceparent(&headers),
        path: "/v1/completions",
    };
    run(st, job).await
}

#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai", security(("api_key" = [])), request_body = ChatRequest, params(("X-Request-Id" = Option<String>, Header, description = "Echoed in the response header", pattern = "^[!-~]{1,128}$")), responses((status = 200, description = "A chat completion (JSON), or server-sent events when `stream` is true"), (status = 400, description = "Bad parameters", body = ErrorBody), (status = 401, description = "Missing or wrong API key", body = ErrorBody), (status = 404, description = "Unknown model", body = ErrorBody), (status = 413, description = "Body too large", body = ErrorBody), (status = 503, description = "At capacity or stopped; see Retry-After", body = ErrorBody)))]
pub async fn chat_completions(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> AppResult<Response> {
    let mut clock = ApiClock::start();
    let request_id = request_id(&headers)?;
    let req: ChatRequest = parse(body)?;
    clock.lap("parse");
    check_model(&st, &req.common)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("`messages` must not be empty").param("messages"));
    }
    let text = render_chat(&st, req.messages, req.add_generation_prompt, req.chat_template_kwargs)?;
    clock.lap("render template");
    let prompt = st.model.tokenizer.encode(&text, false)?;
    clock.lap("tokenize");
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (false, Some(_)) => return Err(ApiError::bad_request("`top_logprobs` needs `logprobs: true`").param("top_logprobs")),
        (true, Some(k @ 0..=20)) => Some(k as usize),
        (true, None) => Some(0),
        (true, Some(_)) => return Err(ApiError::bad_request("`top_logprobs` must be between 0 and 20").param("top_logprobs")),
        (false, None) => None,
    };
    let max_tokens = req.max_completion_tokens.or(req.common.max_tokens);
    let sampling = sampling(&st, &req.common, max_tokens, prompt.len(), logprobs)?;
    let intro = introspection(&st, &req.common)?;
    let job = Job {
        kind: Kind::Chat,
        prompts: vec![prompt],
        stream: req.common.stream,
        include_usage: include_usage(&req.common),
        sampling,
        chat_logprobs: req.logprobs,
        echo: vec![],
        request_id,
        timings: req.common.return_timings,
        intro,
        clock: Some(clock),
        traceparent: traceparent(&headers),
        path: "/v1/chat/completions",
    };
    run(st, job).await
}

fn traceparent(headers: &HeaderMap) -> Option<String> {
    headers.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// The API's `capture` object as an engine `CaptureSpec` (globs resolved against this model's
/// hook points), and whether it is returned by URL. Every mistake is a 400 that says what to
/// write instead.
fn capture_spec(st: &AppState, c: Option<&CaptureRequest>) -> AppResult<(Option<CaptureSpec>, bool)> {
    let Some(c) = c else { return Ok((None, false)) };
    let bad = |m: String| Err(ApiError::bad_request(m).param("capture"));
    if c.hooks.is_empty() {
        return bad("`capture.hooks` must name at least one hook point (e.g. \"blocks.*.hook_resid_post\")".into());
    }
    let hooks = resolve_hooks(st, &c.hooks, "capture")?;
    let positions = capture_positions(c.positions.as_ref(), CapturePositions::All, "capture")?;
    let dtype = match c.dtype.as_deref() {
        None => DType::F32,
        Some(d) => match DType::parse(d) {
            Some(d) => d,
            None => return bad(format!("unknown capture dtype `{d}` (float32, float16 or bfloat16)")),
        },
    };
    let url = match c.return_as.as_deref() {
        None | Some("inline") => false,
        Some("url") => true,
        Some(other) => return bad(format!("unknown capture return `{other}` (inline or url)")),
    };
    Ok((Some(CaptureSpec { hooks, positions, dtype }), url))
}

/// Hook names for a pattern, or a 400 that lists the closest names.
fn resolve_hooks(st: &AppState, patterns: &[String], param: &'static str) -> AppResult<Vec<HookName>> {
    let available = st.limits.hook_names.as_slice();
    glassbox_protocol::resolve_patterns(patterns, available).map_err(|e| {
        let pattern = match &e {
            HookError::UnknownName(p) | HookError::NoMatch(p) => p.clone(),
            HookError::BadPattern { pattern, .. } => pattern.clone(),
        };
        let close = glassbox_protocol::close_names(&pattern, available, 5);
        ApiError::bad_request(format!("{e}; close names: {}", close.join(", "))).param(param)
    })
}

/// The API's `steer` list as engine `SteerSpec`s: globs expanded, named vectors looked up.
/// Sizes and heads are checked by the engine's `Limits` (a 400 before anything runs).
fn steer_specs(st: &AppState, steers: Option<&[SteerRequest]>) -> AppResult<Vec<SteerSpec>> {
    let mut out = vec![];
    for s in steers.unwrap_or_default() {
        let bad = |m: String| ApiError::bad_request(m).param("steer");
        let named = match &s.vector {
            Some(name) => Some(st.steering_vectors.get(name).ok_or_else(|| {
                let known = st.steering_vectors.names();
                bad(format!("no steering vector named `{name}` (known: {}); load one with --steering-vectors DIR or POST /v1/steering_vectors", if known.is_empty() { "none".into() } else { known.join(", ") }))
            })?),
            None => None,
        };
        let scale = s.scale.unwrap_or(1.0);
        let op = match (&s.add, named, &s.replace, s.ablate) {
            (Some(v), None, None, false) => SteerOp::Add { vector: v.clone(), scale },
            (None, Some(v), None, false) => SteerOp::Add { vector: v, scale },
            (None, None, Some(v), false) => SteerOp::Replace { vector: v.clone() },
            (None, None, None, true) => SteerOp::Ablate,
            _ => return Err(bad(format!("steer on `{}`: give exactly one of `add`, `vector`, `replace` or `ablate: true`", s.hook))),
        };
        if s.scale.is_some() && !matches!(op, SteerOp::Add { .. }) {
            return Err(bad("`scale` goes with `add` or `vector`".into()));
        }
        let positions = match &s.positions {
            None => SteerPositions::All,
            Some(SteerPositionsRequest::Named(p)) => match p.as_str() {
                "all" => SteerPositions::All,
                "prompt" => SteerPositions::Prompt,
                "generated" => SteerPositions::Generated,
                other => return Err(bad(format!("unknown steer positions `{other}` (all, prompt, generated or a list of positions)"))),
            },
            Some(SteerPositionsRequest::List(v)) => SteerPositions::At(v.clone()),
        };
        for hook in resolve_hooks(st, std::slice::from_ref(&s.hook), "steer")? {
            out.push(SteerSpec { hook, op: op.clone(), positions: positions.clone(), heads: s.heads.clone() });
        }
    }
    Ok(out)
}

fn capture_positions(p: Option<&CapturePositionsRequest>, default: CapturePositions, param: &'static str) -> AppResult<CapturePositions> {
    match p {
        None => Ok(default),
        Some(CapturePositionsRequest::Named(s)) => s.parse().map_err(|m: String| ApiError::bad_request(m).param(param)),
        Some(CapturePositionsRequest::List(v)) if v.is_empty() => Err(ApiError::bad_request("positions must not be an empty list").param(param)),
        Some(CapturePositionsRequest::List(v)) => Ok(CapturePositions::At(v.clone())),
    }
}

/// The API's `logit_lens` as an engine `LensSpec` (layer and size checks are the engine's).
fn lens_spec(st: &AppState, l: Option<&LensRequest>) -> AppResult<Option<LensSpec>> {
    let Some(l) = l else { return Ok(None) };
    let layers = match &l.layers {
        LensLayers::Named(s) if s == "all" => (0..st.limits.num_layers).collect(),
        LensLayers::Named(s) => return Err(ApiError::bad_request(format!("logit_lens.layers must be \"all\" or a list of layers, not `{s}`")).param("logit_lens")),
        LensLayers::List(v) => v.clone(),
    };
    let positions = capture_positions(l.positions.as_ref(), CapturePositions::Last, "logit_lens")?;
    Ok(Some(LensSpec { layers, top_k: l.top_k.unwrap_or(5), positions }))
}

fn include_usage(c: &Common) -> bool {
    c.stream_options.as_ref().is_some_and(|o| o.include_usage)
}

fn check_model(st: &AppState, c: &Common) -> AppResult<()> {
    match &c.model {
        Some(m) if *m != st.served_name => Err(ApiError::not_found(format!("The model `{m}` does not exist. This server serves `{}`.", st.served_name)).param("model")),
        _ => Ok(()),
    }
}

pub(crate) fn encode(st: &AppState, text: &str) -> AppResult<Vec<u32>> {
    if text.is_empty() {
        return Err(ApiError::bad_request("`prompt` must not be empty").param("prompt"));
    }
    Ok(st.model.tokenizer.encode(text, true)?)
}

pub(crate) fn render_chat(st: &AppState, mut messages: Vec<Value>, add_generation_prompt: bool, kwargs: Option<serde_json::Map<String, Value>>) -> AppResult<String> {
    let tmpl = st.chat_template.as_ref().ok_or_else(|| ApiError::bad_request("this model has no chat template; use /v1/completions"))?;
    for m in messages.iter_mut() {
        let obj = m.as_object_mut().ok_or_else(|| ApiError::bad_request("each message must be an object").param("messages"))?;
        if !obj.get("role").is_some_and(Value::is_string) {
            return Err(ApiError::bad_request("each message needs a string `role`").param("messages"));
        }
        // Content parts [{"type": "text", "text": ...}] become one string.
        if let Some(Value::Array(parts)) = obj.get("content") {
            let text: String = parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect();
            obj.insert("content".into(), Value::String(text));
        }
    }
    let ctx = ChatContext { vars: kwargs.unwrap_or_default(), ..st.model.chat_context(add_generation_prompt) };
    Ok(tmpl.render(&Value::Array(messages), &ctx)?)
}

/// OpenAI/vLLM fields to engine sampling parameters, with the checks vLLM makes.
fn sampling(st: &AppState, c: &Common, max_tokens: Option<i64>, prompt_len: usize, logprobs: Option<usize>) -> AppResult<SamplingParams> {
    let ctx = st.limits.max_model_len;
    let max_tokens = match max_tokens {
        None => ctx.saturating_sub(prompt_len).max(1),
        Some(m) if m < 1 => return Err(ApiError::bad_request(format!("`max_tokens` must be at least 1, got {m}")).param("max_tokens")),
        Some(m) => m as usize,
    };
    if prompt_len + max_tokens > ctx {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({prompt_len} in the prompt, {max_tokens} for the completion). Please reduce the length of the prompt or completion.",
            prompt_len.saturating_add(max_tokens)
        ))
        .param("max_tokens"));
    }
    let n = c.n.unwrap_or(1);
    if !(1..=128).contains(&n) {
        return Err(ApiError::bad_request(format!("`n` must be between 1 and 128, got {n}")).param("n"));
    }
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => return Err(ApiError::bad_request(format!("`top_k` must be -1 (off) or positive, got {k}")).param("top_k")),
    };
    let min_tokens = match c.min_tokens {
        None => 0,
        Some(m) if m >= 0 => m as usize,
        Some(m) => return Err(ApiError::bad_request(format!("`min_tokens` must be >= 0, got {m}")).param("min_tokens")),
    };
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request(format!("`temperature` must be between 0 and 2, got {temperature}")).param("temperature"));
    }
    for (name, v) in [("presence_penalty", c.presence_penalty), ("frequency_penalty", c.frequency_penalty)] {
        if let Some(v) = v {
            if !(-2.0..=2.0).contains(&v) {
                return Err(ApiError::bad_request(format!("`{name}` must be between -2 and 2, got {v}")).param(if name == "presence_penalty" { "presence_penalty" } else { "frequency_penalty" }));
            }
        }
    }
    let p = SamplingParams {
        temperature,
        top_p: c.top_p.unwrap_or(1.0),
        top_k,
        min_p: c.min_p.unwrap_or(0.0),
        repetition_penalty: c.repetition_penalty.unwrap_or(1.0),
        presence_penalty: c.presence_penalty.unwrap_or(0.0),
        frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
        seed: c.seed,
        max_tokens,
        min_tokens,
        ignore_eos: c.ignore_eos,
        stop: c.stop.clone().map(|s| s.into_vec()).unwrap_or_default().into_iter().filter(|s| !s.is_empty()).collect(),
        stop_token_ids: c.stop_token_ids.clone().unwrap_or_default(),
        logprobs,
        n: n as usize,
    };
    Ok(p)
}

/// Aborts the engine requests if the handler (or its stream) is dropped before they finish:
/// a client that disconnects frees its KV blocks at once.
struct Inflight {
    st: Arc<AppState>,
    ids: Vec<RequestId>,
    finished: bool,
    started: Instant,
}

impl Drop for Inflight {
    fn drop(&mut self) {
        if !self.finished {
            for &id in &self.ids {
                self.st.engine.abort(id);
            }
            self.st.metrics.record(RequestTiming {
                ttft: None,
                itl: vec![],
                e2e: self.started.elapsed().as_secs_f64(),
                finish: "abort",
                prompt_tokens: 0,
                generation_tokens: 0,
                engine: vec![],
            });
        }
        self.st.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Per-choice accumulation and timing.
struct Progress {
    n: usize,
    ids: Vec<RequestId>,
    texts: Vec<String>,
    finish: Vec<Option<FinishReason>>,
    logprobs: Vec<Vec<TokenLogprob>>,
    completion_tokens: Vec<usize>,
    prompt_tokens: usize,
    started: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    itl: Vec<f64>,
    sent_role: Vec<bool>,
    /// Generated token ids per choice (for captures' `token_ids`).
    tokens: Vec<Vec<u32>>,
    /// Captures per choice, from its finishing output.
    captures: Vec<Vec<Capture>>,
    /// Logit lens entries per choice, from its finishing output.
    lens: Vec<Vec<LensEntry>>,
    /// The engine's timings per choice, from its finishing output.
    timings: Vec<Option<RequestTimings>>,
    /// Token counts for the access log.
    access: AccessTokens,
}

impl Progress {
    fn choice(&self, o: &EngineOutput) -> usize {
        let prompt_idx = self.ids.iter().position(|&i| i == o.id).unwrap_or(0);
        prompt_idx * self.n + o.index
    }

    /// Take in one output (its captures move into `self`); returns its choice index.
    fn absorb(&mut self, o: &mut EngineOutput) -> usize {
        let c = self.choice(o);
        self.tokens[c].extend(&o.new_tokens);
        if o.finish.is_some() {
            if let Some(parts) = o.capture.take() {
                self.captures[c] = parts.assemble();
            }
        }
        if o.finish.is_some() && !o.logit_lens.is_empty() {
            self.lens[c] = std::mem::take(&mut o.logit_lens);
        }
        let now = Instant::now();
        if !o.new_tokens.is_empty() {
            match self.last {
                None => self.first = Some(now),
                Some(prev) => self.itl.push((now - prev).as_secs_f64()),
            }
            self.last = Some(now);
        }
        self.texts[c].push_str(&o.text);
        self.logprobs[c].extend(o.logprobs.iter().cloned());
        self.completion_tokens[c] = self.completion_tokens[c].max(o.completion_tokens);
        self.access.set(self.prompt_tokens, self.completion_tokens.iter().sum());
        if o.timings.is_some() {
            self.timings[c] = o.timings.take();
        }
        match &o.finish {
            // The engine fails a whole request at once (and the router stops routing it):
            // every choice of that prompt ends with the error.
            Some(FinishReason::Error(_)) => {
                let first = c - o.index;
                for f in &mut self.finish[first..first + self.n] {
                    if f.is_none() {
                        *f = o.finish.clone();
                    }
                }
            }
            Some(f) => self.finish[c] = Some(f.clone()),
            None => {}
        }
        c
    }

    fn done(&self) -> bool {
        self.finish.iter().all(Option::is_some)
    }

    fn usage(&self) -> Value {
        let completion: usize = self.completion_tokens.iter().sum();
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": completion, "total_tokens": self.prompt_tokens + completion})
    }

    /// Metrics, and the OTLP span when exporting.
    fn record(&self, st: &AppState, job: &Job) {
        let finish = self.finish.iter().flatten().map(FinishReason::as_str).max_by_key(|r| match *r {
            "error" => 3,
            "abort" => 2,
            "length" => 1,
            _ => 0,
        });
        st.metrics.record(RequestTiming {
            ttft: self.first.map(|f| (f - self.started).as_secs_f64()),
            itl: self.itl.clone(),
            e2e: self.started.elapsed().as_secs_f64(),
            finish: finish.unwrap_or("abort"),
            prompt_tokens: self.prompt_tokens,
            generation_tokens: self.completion_tokens.iter().sum(),
            engine: self.timings.iter().flatten().cloned().collect(),
        });
        if let Some(otlp) = &st.otlp {
            let engine: Vec<RequestTimings> = self.timings.iter().flatten().cloned().collect();
            let now = std::time::SystemTime::now();
            otlp.request(&crate::otlp::RequestSpan {
                request_id: &job.request_id,
                traceparent: job.traceparent.as_deref(),
                model: &st.served_name,
                start: now - self.started.elapsed(),
                end: now,
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.completion_tokens.iter().sum(),
                max_tokens: job.sampling.max_tokens,
                temperature: job.sampling.temperature,
                top_p: job.sampling.top_p,
                n: job.sampling.n,
                ttft: self.first.map(|f| (f - self.started).as_secs_f64()),
                finish: finish.unwrap_or("abort"),
                engine: &engine,
            });
        }
    }
}

async fn run(st: Arc<AppState>, job: Job) -> AppResult<Response> {
    let n = job.sampling.n;
    let ids: Vec<RequestId> = job.prompts.iter().map(|_| st.next_id.fetch_add(1, Ordering::SeqCst)).collect();
    let requests: Vec<EngineRequest> = ids
        .iter()
        .zip(&job.prompts)
        .map(|(&id, prompt)| EngineRequest { id, prompt: prompt.clone(), sampling: job.sampling.clone(), capture: job.intro.capture.clone(), steer: job.intro.steer.clone(), logit_lens: job.intro.logit_lens.clone(), tag: Some(job.request_id.clone()) })
        .collect();
    // The engine's own checks (the same `Limits`), answered here as 400.
    for r in &requests {
        st.limits.validate(r).map_err(ApiError::bad_request)?;
        if let (Some(spec), true) = (&r.capture, job.intro.capture_url) {
            let worst = st.limits.capture_bytes(spec, r.prompt.len(), r.sampling.max_tokens, r.sampling.n);
            if worst > st.captures.limit {
                return Err(ApiError::bad_request(format!(
                    "the capture could take up to {worst} bytes, more than the whole capture store holds ({} bytes, --capture-store-bytes); capture less or use \"return\": \"inline\"",
                    st.captures.limit
                ))
                .param("capture"));
            }
        }
    }
    if !st.engine_alive.load(Ordering::SeqCst) {
        return Err(ApiError::overloaded("the engine has stopped; restart the server"));
    }
    if st.in_flight.fetch_add(1, Ordering::SeqCst) >= st.max_in_flight {
        st.in_flight.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiError::overloaded(format!("the server is at capacity ({} requests in flight); retry shortly", st.max_in_flight)));
    }
    let mut guard = Inflight { st: st.clone(), ids: ids.clone(), finished: false, started: Instant::now() };
    let (tx, mut rx) = mpsc::unbounded_channel();
    st.router.send(RouterMsg::Register(ids.clone(), n, tx)).map_err(|_| ApiError::internal("the router has stopped"))?;
    for req in requests {
        st.engine.submit(req).map_err(|_| ApiError::overloaded("the engine is shutting down"))?;
    }
    if !job.intro.steer.is_empty() {
        st.metrics.steered();
    }
    let mut job = job;
    if let Some(c) = &mut job.clock {
        c.lap("submit");
    }
    let choices = ids.len() * n;
    let mut prog = Progress {
        n,
        ids: ids.clone(),
        texts: vec![String::new(); choices],
        finish: vec![None; choices],
        logprobs: vec![vec![]; choices],
        completion_tokens: vec![0; choices],
        prompt_tokens: job.prompts.iter().map(Vec::len).sum(),
        started: guard.started,
        first: None,
        last: None,
        itl: vec![],
        sent_role: vec![false; choices],
        tokens: vec![vec![]; choices],
        captures: vec![vec![]; choices],
        lens: vec![vec![]; choices],
        timings: vec![None; choices],
        access: AccessTokens::default(),
    };
    // Random, as vLLM's: ids never repeat across restarts or replicas.
    let rid = match job.kind {
        Kind::Completion => format!("cmpl-{:032x}", rand::random::<u128>()),
        Kind::Chat => format!("chatcmpl-{:032x}", rand::random::<u128>()),
    };
    let id_header = HeaderValue::from_str(&job.request_id).map_err(|_| ApiError::internal("bad request id"))?;
    tracing::debug!(request_id = %job.request_id, engine_ids = ?ids, "submitted");
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);

    if !job.stream {
        while !prog.done() {
            let Some(mut o) = rx.recv().await else { return Err(ApiError::internal("the engine stopped before answering")) };
            prog.absorb(&mut o);
        }
        guard.finished = true;
        prog.record(&st, &job);
        if let Some(c) = &mut job.clock {
            c.lap("wait for engine");
        }
        let choices: Vec<Value> = (0..choices)
            .map(|c| {
                let text = match job.echo.get(c / n) {
                    Some(e) => format!("{e}{}", prog.texts[c]),
                    None => prog.texts[c].clone(),
                };
                let mut choice = full_choice(&st, &job, c, text, &prog.logprobs[c], prog.finish[c].as_ref());
                attach_lens(&st, &job, &mut prog, c, &mut choice);
                attach_capture(&st, &job, &mut prog, c, &mut choice);
                attach_timings(&job, &prog, c, &mut choice);
                choice
            })
            .collect();
        let object = if job.kind == Kind::Chat { "chat.completion" } else { "text_completion" };
        let mut resp = Json(json!({"id": rid, "object": object, "created": created, "model": st.served_name, "choices": choices, "usage": prog.usage()})).into_response();
        resp.headers_mut().insert("x-request-id", id_header);
        resp.extensions_mut().insert(prog.access.clone());
        if let Some(mut c) = job.clock.take() {
            c.lap("respond");
            c.send(&st, &job.request_id, job.path, &ids);
        }
        return Ok(resp);
    }

    // Streaming: one event per engine output, then usage (if asked) and [DONE].
    let st2 = st.clone();
    let object = if job.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
    // Phases: 0 streaming tokens, 1 usage sent (only [DONE] left), 2 done.
    let access = prog.access.clone();
    let engine_ids = ids.clone();
    let stream = futures_util::stream::unfold((rx, prog, guard, 0u8, job), move |(mut rx, mut prog, mut guard, phase, mut job)| {
        let st = st2.clone();
        let rid = rid.clone();
        let engine_ids = engine_ids.clone();
        async move {
            let chunk = |choices: Value| json!({"id": rid, "object": object, "created": created, "model": st.served_name, "choices": choices});
            match phase {
                2 => return None,
                1 => return Some((Ok::<_, std::convert::Infallible>(Event::default().data("[DONE]")), (rx, prog, guard, 2, job))),
                _ => {}
            }
            if prog.done() {
                guard.finished = true;
                prog.record(&st, &job);
                if let Some(mut c) = job.clock.take() {
                    c.lap("stream");
                    c.send(&st, &job.request_id, job.path, &engine_ids);
                }
                if job.include_usage {
                    let mut c = chunk(json!([]));
                    c["usage"] = prog.usage();
                    return Some((Ok(Event::default().data(c.to_string())), (rx, prog, guard, 1, job)));
                }
                return Some((Ok(Event::default().data("[DONE]")), (rx, prog, guard, 2, job)));
            }
            let Some(mut o) = rx.recv().await else {
                let err = json!({"error": {"message": "the engine stopped", "type": "internal_error", "code": 500}});
                return Some((Ok(Event::default().data(err.to_string())), (rx, prog, guard, 1, job)));
            };
            let c = prog.absorb(&mut o);
            let mut choice = stream_choice(&st, &job, &mut prog, c, &o);
            if let Some(FinishReason::Error(m)) = &o.finish {
                choice["error"] = json!({"message": m});
            }
            // Captures come in the final chunk of each choice.
            if o.finish.is_some() {
                attach_lens(&st, &job, &mut prog, c, &mut choice);
                attach_capture(&st, &job, &mut prog, c, &mut choice);
                attach_timings(&job, &prog, c, &mut choice);
            }
            let mut ev = chunk(json!([choice]));
            if job.include_usage {
                ev["usage"] = Value::Null;
            }
            Some((Ok(Event::default().data(ev.to_string())), (rx, prog, guard, 0, job)))
        }
    });
    let mut resp = Sse::new(stream).keep_alive(KeepAlive::default()).into_response();
    resp.headers_mut().insert("x-request-id", id_header);
    resp.extensions_mut().insert(access);
    Ok(resp)
}

/// Put choice `c`'s captures into its JSON as `capture` (base64 safetensors, or a URL into the
/// capture store). A capture that cannot be stored turns the choice into an error: captures
/// are never dropped silently.
fn attach_capture(st: &AppState, job: &Job, prog: &mut Progress, c: usize, choice: &mut Value) {
    let captures = std::mem::take(&mut prog.captures[c]);
    if job.intro.capture.is_none() || captures.is_empty() {
        return;
    }
    let prompt = &job.prompts[c / prog.n];
    let mut positions: Vec<usize> = captures.iter().flat_map(|x| x.positions.iter().copied()).collect();
    positions.sort_unstable();
    positions.dedup();
    let token_at = |p: usize| prompt.get(p).or_else(|| prog.tokens[c].get(p - prompt.len())).copied();
    let token_ids: Vec<Option<u32>> = positions.iter().map(|&p| token_at(p)).collect();
    let tensors: serde_json::Map<String, Value> =
        captures.iter().map(|x| (x.hook.to_string(), json!({"shape": x.shape, "dtype": x.dtype.name()}))).collect();
    let mut meta = std::collections::HashMap::new();
    meta.insert("positions".to_string(), json!(positions).to_string());
    meta.insert("token_ids".to_string(), json!(token_ids).to_string());
    meta.insert("model".to_string(), st.served_name.clone());
    let bytes = match glassbox_model::capture_file::to_safetensors(&captures, meta) {
        Ok(b) => b,
        Err(e) => return fail_choice(choice, format!("encoding the capture failed: {e}")),
    };
    let mut capture = json!({"tensors": tensors, "positions": positions, "token_ids": token_ids});
    if job.intro.capture_url {
        let len = bytes.len();
        match st.captures.put(bytes) {
            Ok(id) => {
                capture["url"] = json!(format!("/v1/captures/{id}"));
                capture["bytes"] = json!(len);
                st.metrics.capture_bytes(len);
            }
            Err(m) => return fail_choice(choice, m),
        }
    } else {
        use base64::Engine;
        capture["data"] = json!(base64::engine::general_purpose::STANDARD.encode(&bytes));
        st.metrics.capture_bytes(bytes.len());
    }
    choice["capture"] = capture;
}

/// Put choice `c`'s logit lens into its JSON: `[{layer, position, top: [{token_id, token, prob}]}]`.
fn attach_lens(st: &AppState, job: &Job, prog: &mut Progress, c: usize, choice: &mut Value) {
    if job.intro.logit_lens.is_none() {
        return;
    }
    let entries = std::mem::take(&mut prog.lens[c]);
    let json: Vec<Value> = entries
        .iter()
        .map(|e| {
            let top: Vec<Value> = e.top.iter().map(|&(t, p)| json!({"token_id": t, "token": token_text(st, t), "prob": p})).collect();
            json!({"layer": e.layer, "position": e.position, "top": top})
        })
        .collect();
    choice["logit_lens"] = Value::Array(json);
}

/// `return_timings`: where choice `c`'s time in the engine went, in milliseconds.
fn attach_timings(job: &Job, prog: &Progress, c: usize, choice: &mut Value) {
    let (true, Some(t)) = (job.timings, &prog.timings[c]) else { return };
    let ms = |s: f64| (s * 1e6).round() / 1e3;
    choice["timings"] = json!({
        "queued_ms": ms(t.queued),
        "first_token_ms": t.first_token.map(ms),
        "prefill_ms": ms(t.prefill),
        "decode_ms": ms(t.decode),
        "engine_ms": ms(t.total),
        "steps": t.steps,
        "preemptions": t.preemptions,
    });
}

fn fail_choice(choice: &mut Value, message: String) {
    choice["finish_reason"] = json!("error");
    choice["error"] = json!({"message": message});
}

fn finish_str(f: Option<&FinishReason>) -> Value {
    f.map(|f| Value::String(f.as_str().to_string())).unwrap_or(Value::Null)
}

fn full_choice(st: &AppState, job: &Job, c: usize, text: String, lps: &[TokenLogprob], finish: Option<&FinishReason>) -> Value {
    let mut choice = match job.kind {
        Kind::Completion => json!({"index": c, "text": text, "logprobs": completion_logprobs(st, job, lps), "finish_reason": finish_str(finish)}),
        Kind::Chat => json!({
            "index": c, "message": {"role": "assistant", "content": text},
            "logprobs": chat_logprobs(st, job, lps), "finish_reason": finish_str(finish),
        }),
    };
    if let Some(FinishReason::Error(m)) = finish {
        choice["error"] = json!({"message": m});
    }
    choice
}

fn stream_choice(st: &AppState, job: &Job, prog: &mut Progress, c: usize, o: &EngineOutput) -> Value {
    match job.kind {
        Kind::Completion => {
            let mut text = o.text.clone();
            if !prog.sent_role[c] {
                prog.sent_role[c] = true;
                if let Some(e) = job.echo.get(c / prog.n) {
                    text = format!("{e}{text}");
                }
            }
            json!({"index": c, "text": text, "logprobs": completion_logprobs(st, job, &o.logprobs), "finish_reason": finish_str(o.finish.as_ref())})
        }
        Kind::Chat => {
            let delta = if prog.sent_role[c] {
                json!({"content": o.text})
            } else {
                prog.sent_role[c] = true;
                json!({"role": "assistant", "content": o.text})
            };
            json!({"index": c, "delta": delta, "logprobs": chat_logprobs(st, job, &o.logprobs), "finish_reason": finish_str(o.finish.as_ref())})
        }
    }
}

fn token_text(st: &AppState, id: u32) -> String {
    st.model.tokenizer.decode(&[id], false).unwrap_or_default()
}

fn completion_logprobs(st: &AppState, job: &Job, lps: &[TokenLogprob]) -> Value {
    if job.sampling.logprobs.is_none() || job.kind != Kind::Completion {
        return Value::Null;
    }
    let tokens: Vec<String> = lps.iter().map(|l| token_text(st, l.token)).collect();
    let mut offset = 0;
    let offsets: Vec<usize> = tokens
        .iter()
        .map(|t| {
            let o = offset;
            offset += t.len();
            o
        })
        .collect();
    json!({
        "tokens": tokens,
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|l| l.top.iter().map(|(t, p)| (token_text(st, *t), json!(p))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

fn chat_logprobs(st: &AppState, job: &Job, lps: &[TokenLogprob]) -> Value {
    if !job.chat_logprobs {
        return Value::Null;
    }
    let entry = |t: u32, p: f32| {
        let text = token_text(st, t);
        json!({"token": text, "logprob": p, "bytes": text.as_bytes()})
    };
    let content: Vec<Value> = lps
        .iter()
        .map(|l| {
            let mut e = entry(l.token, l.logprob);
            e["top_logprobs"] = Value::Array(l.top.iter().map(|(t, p)| entry(*t, *p)).collect());
            e
        })
        .collect();
    json!({"content": content})
}
