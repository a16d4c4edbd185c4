//! Route handlers: everything but generation (which is in `generate.rs`): health, models,
//! tokenizer, metrics, steering vectors, captures, and the debug and profiler endpoints.

use crate::error::ApiError;
use crate::generate::render_chat;
use crate::openai::{DetokenizeRequest, ErrorBody, StartProfileRequest, SteeringVectorRequest, TensorDumpRequest, TokenizeRequest};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use glassbox_engine::EngineCommand;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub(crate) type AppResult<T> = Result<T, ApiError>;

/// The body as JSON of type `T`, with OpenAI-style errors for what is wrong with it.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> AppResult<T> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large("request body is too large")
        } else {
            ApiError::bad_request(format!("cannot read the request body: {e}"))
        }
    })?;
    if std::str::from_utf8(&bytes).is_err() {
        return Err(ApiError::bad_request("the request body is not valid UTF-8"));
    }
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

pub async fn require_api_key(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

pub async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!("no route for {} {}", req.method(), req.uri().path()))
}

#[utoipa::path(get, path = "/health", tag = "server", responses((status = 200, description = "The engine runs"), (status = 503, description = "The engine thread has stopped")))]
pub async fn health(State(st): State<Arc<AppState>>) -> StatusCode {
    if st.engine_alive.load(Ordering::SeqCst) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// `POST /debug/dump_state`: write a dump of every request in flight (as SIGQUIT does) and
/// name the file. The server keeps serving.
#[utoipa::path(post, path = "/debug/dump_state", tag = "debug", security(("api_key" = [])), responses((status = 200, description = "`{\"path\": ...}`: the dump written under --crash-dump-dir"), (status = 401, description = "Missing or wrong API key", body = ErrorBody), (status = 500, description = "The dump could not be written", body = ErrorBody)))]
pub async fn dump_state(State(st): State<Arc<AppState>>) -> AppResult<Json<Value>> {
    let answer = ask(&st, EngineCommand::DumpState);
    let path = tokio::time::timeout(std::time::Duration::from_secs(60), answer)
        .await
        .map_err(|_| ApiError::internal("the engine did not answer within 60 s (a step may be running long)"))??
        .map_err(ApiError::internal)?;
    Ok(Json(json!({"path": path.display().to_string()})))
}

/// Send the engine thread a control command carrying a reply callback, and wait for the reply.
async fn ask<T: Send + 'static>(st: &AppState, command: impl FnOnce(Box<dyn FnOnce(T) + Send>) -> EngineCommand) -> AppResult<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let reply = Box::new(move |v| {
        let _ = tx.send(v);
    });
    st.engine.control(command(reply)).map_err(|_| ApiError::overloaded("the engine has stopped"))?;
    rx.await.map_err(|_| ApiError::internal("the engine stopped before answering"))
}

/// `POST /debug/dump`: start, change or stop tensor dumps at run time. Files go under the
/// server's `--dump-dir` (default: the cache directory's `dumps`).
#[utoipa::path(post, path = "/debug/dump", tag = "debug", security(("api_key" = [])), request_body = TensorDumpRequest, responses((status = 200, description = "`{enabled, dir, hooks}`"), (status = 400, description = "Bad hooks", body = ErrorBody)))]
pub async fn tensor_dump(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> AppResult<Json<Value>> {
    let req: TensorDumpRequest = parse(body)?;
    let cfg = if req.enabled == Some(false) {
        None
    } else {
        let hooks = req.hooks.unwrap_or_default();
        let layers = req.layers.unwrap_or_default();
        let cfg = crate::dump_config(st.dump_dir.clone(), &hooks, &layers, req.skip_steps.unwrap_or(0), req.max_steps, &st.limits.hook_names)
            .map_err(|e| ApiError::bad_request(e.to_string()).param("hooks"))?;
        if cfg.hooks.is_empty() {
            return Err(ApiError::bad_request("no hook left to dump (attention patterns are never dumped; check `layers`)").param("hooks"));
        }
        Some(cfg)
    };
    let summary = json!({"enabled": cfg.is_some(), "dir": st.dump_dir.display().to_string(), "hooks": cfg.as_ref().map_or(0, |c| c.hooks.len())});
    ask(&st, |reply| EngineCommand::SetTensorDump(cfg, reply)).await?.map_err(ApiError::internal)?;
    Ok(Json(summary))
}

/// Ask the engine thread for a live view.
async fn inspect(st: &AppState, what: glassbox_engine::Inspect) -> AppResult<Json<Value>> {
    let v = ask(st, |reply| EngineCommand::Inspect(what, reply)).await?;
    Ok(Json(json!({"data": v})))
}

/// `GET /debug/requests`: every live request (state, tokens computed/total, generated, blocks
/// held, preemptions, capture/steer in short).
#[utoipa::path(get, path = "/debug/requests", tag = "debug", security(("api_key" = [])), responses((status = 200, description = "`{data: [...]}`")))]
pub async fn debug_requests(State(st): State<Arc<AppState>>) -> AppResult<Json<Value>> {
    inspect(&st, glassbox_engine::Inspect::Requests).await
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
pub struct KvQuery {
    /// Include every sequence's block table.
    #[serde(default)]
    tables: bool,
}

/// `GET /debug/kv`: KV block usage, prefix-cache entries and hit rate (`?tables=true`: block tables).
#[utoipa::path(get, path = "/debug/kv", tag = "debug", security(("api_key" = [])), params(KvQuery), responses((status = 200, description = "`{data: {...}}`")))]
pub async fn debug_kv(State(st): State<Arc<AppState>>, axum::extract::Query(q): axum::extract::Query<KvQuery>) -> AppResult<Json<Value>> {
    inspect(&st, glassbox_engine::Inspect::Kv { tables: q.tables }).await
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
pub struct StepsQuery {
    /// How many of the most recent steps (at most 256 are kept; default 20).
    last: Option<usize>,
}

/// `GET /debug/steps?last=N`: the last steps' batch composition and durations.
#[utoipa::path(get, path = "/debug/steps", tag = "debug", security(("api_key" = [])), params(StepsQuery), responses((status = 200, description = "`{data: [...]}`")))]
pub async fn debug_steps(State(st): State<Arc<AppState>>, axum::extract::Query(q): axum::extract::Query<StepsQuery>) -> AppResult<Json<Value>> {
    inspect(&st, glassbox_engine::Inspect::Steps { last: q.last.unwrap_or(20) }).await
}

fn profile_error(e: glassbox_engine::ProfileError) -> ApiError {
    match e {
        glassbox_engine::ProfileError::Failed(m) => ApiError::bad_request(m),
        other => ApiError::conflict(other.to_string()),
    }
}

/// `POST /start_profile`: profile the engine thread (always available). Files go under the
/// server's `--profile-dir`.
#[utoipa::path(post, path = "/start_profile", tag = "debug", security(("api_key" = [])), request_body(content = Option<StartProfileRequest>), responses((status = 200, description = "`{status: \"started\", dir}`"), (status = 400, description = "Bad options", body = ErrorBody), (status = 409, description = "A profile is already running", body = ErrorBody)))]
pub async fn start_profile(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> AppResult<Json<Value>> {
    let req: StartProfileRequest = match &body {
        Ok(b) if b.iter().all(u8::is_ascii_whitespace) => StartProfileRequest::default(),
        _ => parse(body)?,
    };
    let opts = glassbox_engine::profile::ProfileOptions { num_steps: req.num_steps, name: req.name, with_layers: req.with_layers };
    ask(&st, |reply| EngineCommand::StartProfile(opts, reply)).await?.map_err(profile_error)?;
    st.profiling.store(true, Ordering::Relaxed);
    Ok(Json(json!({"status": "started", "dir": st.profile_dir.display().to_string()})))
}

/// `POST /stop_profile`: stop the running profile; names the trace and summary files.
#[utoipa::path(post, path = "/stop_profile", tag = "debug", security(("api_key" = [])), responses((status = 200, description = "`{trace, summary, steps}`"), (status = 409, description = "No profile is running", body = ErrorBody)))]
pub async fn stop_profile(State(st): State<Arc<AppState>>) -> AppResult<Json<Value>> {
    st.profiling.store(false, Ordering::Relaxed);
    let files = ask(&st, EngineCommand::StopProfile).await?.map_err(profile_error)?;
    Ok(Json(json!({"trace": files.trace.display().to_string(), "summary": files.summary.display().to_string(), "steps": files.steps})))
}

/// The client's `X-Request-Id` (echoed back), or a fresh random id.
pub(crate) fn request_id(headers: &HeaderMap) -> AppResult<String> {
    match headers.get("x-request-id") {
        None => Ok(format!("{:032x}", rand::random::<u128>())),
        Some(v) => {
            let id = v.to_str().ok().filter(|s| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()));
            id.map(str::to_string).ok_or_else(|| ApiError::bad_request("`X-Request-Id` must be 1 to 128 visible ASCII characters"))
        }
    }
}

#[utoipa::path(get, path = "/version", tag = "server", responses((status = 200, description = "`{\"version\": ...}`")))]
pub async fn version() -> Json<Value> {
    Json(json!({"version": env!("CARGO_PKG_VERSION")}))
}

#[utoipa::path(get, path = "/v1/models", tag = "openai", security(("api_key" = [])), responses((status = 200, description = "The served model"), (status = 401, description = "Missing or wrong API key", body = ErrorBody)))]
pub async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": st.served_name, "object": "model", "created": st.created, "owned_by": "glassbox",
            "root": st.model.source.path().display().to_string(), "max_model_len": st.limits.max_model_len,
            // glassbox's own: clients (like `glassbox batch`) choose chat or completions by it.
            "has_chat_template": st.chat_template.is_some(),
        }]
    }))
}

#[utoipa::path(get, path = "/metrics", tag = "server", responses((status = 200, description = "Prometheus text format")))]
pub async fn metrics(State(st): State<Arc<AppState>>) -> impl IntoResponse {
    let stats = st.stats.borrow().clone();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], st.metrics.render(&stats, &st.served_name))
}

#[utoipa::path(post, path = "/tokenize", tag = "server", request_body = TokenizeRequest, responses((status = 200, description = "`{count, max_model_len, tokens}`"), (status = 400, description = "Bad input", body = ErrorBody), (status = 413, description = "Body too large", body = ErrorBody)))]
pub async fn tokenize(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> AppResult<Json<Value>> {
    let req: TokenizeRequest = parse(body)?;
    let tokens = match (req.prompt, req.messages) {
        (Some(p), None) => st.model.tokenizer.encode(&p, req.add_special_tokens)?,
        (None, Some(m)) => {
            let text = render_chat(&st, m, req.add_generation_prompt, None)?;
            st.model.tokenizer.encode(&text, false)?
        }
        _ => return Err(ApiError::bad_request("give exactly one of `prompt` or `messages`")),
    };
    Ok(Json(json!({"count": tokens.len(), "max_model_len": st.limits.max_model_len, "tokens": tokens})))
}

#[utoipa::path(post, path = "/detokenize", tag = "server", request_body = DetokenizeRequest, responses((status = 200, description = "`{prompt}`"), (status = 400, description = "Bad input", body = ErrorBody), (status = 413, description = "Body too large", body = ErrorBody)))]
pub async fn detokenize(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> AppResult<Json<Value>> {
    let req: DetokenizeRequest = parse(body)?;
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= st.model.tokenizer.vocab_size()) {
        return Err(ApiError::bad_request(format!("token id {bad} is outside the vocabulary")).param("tokens"));
    }
    Ok(Json(json!({"prompt": st.model.tokenizer.decode(&req.tokens, false)?})))
}

pub fn abort_all(st: &AppState) {
    st.engine.stop();
}


/// `POST /v1/steering_vectors`: add (or replace) a named steering vector.
#[utoipa::path(post, path = "/v1/steering_vectors", tag = "glassbox", security(("api_key" = [])), request_body = SteeringVectorRequest, responses((status = 200, description = "`{name, dims}`"), (status = 400, description = "Bad input", body = ErrorBody)))]
pub async fn add_steering_vector(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> AppResult<Json<Value>> {
    let req: SteeringVectorRequest = parse(body)?;
    if req.name.is_empty() || req.vector.is_empty() || req.vector.iter().any(|v| !v.is_finite()) {
        return Err(ApiError::bad_request("give a non-empty `name` and a non-empty `vector` of finite numbers"));
    }
    let dims = req.vector.len();
    st.steering_vectors.insert(req.name.clone(), req.vector);
    Ok(Json(json!({"name": req.name, "dims": dims})))
}

/// `GET /v1/steering_vectors`: the named vectors and their sizes.
#[utoipa::path(get, path = "/v1/steering_vectors", tag = "glassbox", security(("api_key" = [])), responses((status = 200, description = "`{data: [{name, dims}]}`")))]
pub async fn list_steering_vectors(State(st): State<Arc<AppState>>) -> Json<Value> {
    let data: Vec<Value> = st.steering_vectors.names().into_iter().map(|n| json!({"name": n, "dims": st.steering_vectors.get(&n).map_or(0, |v| v.len())})).collect();
    Json(json!({"object": "list", "data": data}))
}

/// `GET /v1/captures/{id}`: a capture stored with `"return": "url"`, as safetensors; it is
/// deleted once downloaded.
#[utoipa::path(get, path = "/v1/captures/{id}", tag = "glassbox", security(("api_key" = [])), params(("id" = String, Path, description = "From the choice's `capture.url`")), responses((status = 200, description = "The safetensors file", content_type = "application/octet-stream"), (status = 404, description = "Unknown, already downloaded or expired", body = ErrorBody)))]
pub async fn get_capture(State(st): State<Arc<AppState>>, axum::extract::Path(id): axum::extract::Path<String>) -> AppResult<Response> {
    let bytes = st.captures.take(&id).ok_or_else(|| ApiError::not_found(format!("no capture `{id}`: it was downloaded already, expired, or never existed")))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}
