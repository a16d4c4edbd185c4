//! The OpenAI-compatible HTTP server: axum handlers in front of the engine thread.
//!
//! Architecture invariant: handlers never touch engine state. They tokenize, validate against
//! a copy of the engine's [`Limits`], submit plain requests, and read plain outputs that the
//! router delivers by request id.

mod capture_store;
mod error;
mod generate;
mod handlers;
mod metrics;
mod openai;
mod otlp;
mod router;
mod steering_vectors;
mod telemetry;

pub use error::ApiError;

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use clap::Args;
use glassbox_engine::{EngineConfig, EngineCore, EngineHandle, EngineStats, KvDtype, KvMemory, Limits};
use glassbox_model::{ChatTemplate, LoadOptions, LoadedModel};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

#[derive(Args, Clone)]
pub struct ServeArgs {
    /// A .gguf file, a Hugging Face model directory, or a hub id in the local hub cache.
    /// Default: SmolLM2-135M-Instruct (downloaded once).
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The model name clients use (default: the model file's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Require `Authorization: Bearer <key>` on /v1 routes.
    #[arg(long, env = "GLASSBOX_API_KEY")]
    pub api_key: Option<String>,
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    #[arg(long, default_value_t = 512)]
    pub max_num_batched_tokens: usize,
    /// Longest prompt + completion (default: the model's context length).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// KV cache size: a fraction of free memory (0.25) or a size (512MiB, 2GB).
    #[arg(long, default_value = "0.25")]
    pub kv_cache_memory: KvMemory,
    /// KV cache element type: f32 (exact) or f16 (half the memory and the bytes attention
    /// reads; keys and values rounded to f16, as llama.cpp's default cache).
    #[arg(long, default_value = "f32")]
    pub kv_cache_dtype: KvDtype,
    /// Requests allowed to wait beyond the running ones before answering 503.
    #[arg(long, default_value_t = 256)]
    pub max_waiting_requests: usize,
    /// Largest request body, in bytes (413 beyond).
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body_bytes: usize,
    /// Seconds to let in-flight requests finish after SIGTERM/SIGINT before aborting them.
    #[arg(long, default_value_t = 10)]
    pub shutdown_grace_period: u64,
    /// Run GGUF weights dequantized to f32.
    #[arg(long)]
    pub dequantize: bool,
    /// Keep each request's numbers independent of the batch (our kernels always are; this costs
    /// speed only on the formats left to candle, Q2_K and Q3_K, run a row at a time).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub batch_invariant: bool,
    /// Where a failing engine step writes its crash dump (and SIGQUIT / POST
    /// /debug/dump_state a state dump); `glassbox replay FILE` reruns one. Default: the
    /// cache directory's `crash-dumps`.
    #[arg(long)]
    pub crash_dump_dir: Option<std::path::PathBuf>,
    /// The most bytes one request's captures may take (its worst case, checked before it runs).
    #[arg(long, default_value = "256MiB")]
    pub max_capture_bytes: KvMemory,
    /// Memory for captures returned with `"return": "url"` until they are downloaded.
    #[arg(long, default_value = "1GiB")]
    pub capture_store_bytes: KvMemory,
    /// Seconds a stored capture waits for its download.
    #[arg(long, default_value_t = 600)]
    pub capture_ttl: u64,
    /// A directory of safetensors files whose 1-D tensors become named steering vectors.
    #[arg(long)]
    pub steering_vectors: Option<std::path::PathBuf>,
    /// Dump the chosen hooks' batch tensors of every engine step here (one safetensors file
    /// and one JSON manifest per step; `glassbox dump slice` cuts out a request).
    #[arg(long, env = "GLASSBOX_DUMP_DIR")]
    pub dump_dir: Option<std::path::PathBuf>,
    /// Hooks to dump (names or globs; repeatable). Default: every hook but attention patterns.
    #[arg(long, env = "GLASSBOX_DUMP_HOOKS", value_delimiter = ',')]
    pub dump_hooks: Vec<String>,
    /// Only these layers' hooks (global hooks such as logits are always kept).
    #[arg(long, env = "GLASSBOX_DUMP_LAYERS", value_delimiter = ',')]
    pub dump_layers: Vec<usize>,
    /// Engine steps to let pass before dumping.
    #[arg(long, env = "GLASSBOX_DUMP_SKIP_STEPS", default_value_t = 0)]
    pub dump_skip_steps: u64,
    /// Steps to dump at most.
    #[arg(long, env = "GLASSBOX_DUMP_MAX_STEPS")]
    pub dump_max_steps: Option<u64>,
    /// Where POST /start_profile ... /stop_profile write traces (default: the cache
    /// directory's `profiles`). Clients never choose paths.
    #[arg(long)]
    pub profile_dir: Option<std::path::PathBuf>,
    /// Export one OpenTelemetry span per request (`llm_request`, GenAI attributes) over
    /// OTLP/HTTP JSON to this collector, e.g. http://localhost:4318.
    #[arg(long, env = "GLASSBOX_OTLP_TRACES_ENDPOINT")]
    pub otlp_traces_endpoint: Option<String>,
}

/// The dump configuration from hook patterns and a layer filter (patterns are never dumped).
pub fn dump_config(
    dir: std::path::PathBuf,
    hooks: &[String],
    layers: &[usize],
    skip_steps: u64,
    max_steps: Option<u64>,
    available: &[glassbox_protocol::HookName],
) -> Result<glassbox_engine::dump::DumpConfig, glassbox_protocol::HookError> {
    let all = ["*".to_string()];
    let patterns = if hooks.is_empty() { &all[..] } else { hooks };
    let hooks = glassbox_protocol::resolve_patterns(patterns, available)?
        .into_iter()
        .filter(|h| h.site != glassbox_protocol::Site::Pattern)
        .filter(|h| layers.is_empty() || h.layer.is_none_or(|l| layers.contains(&(l as usize))))
        .collect();
    Ok(glassbox_engine::dump::DumpConfig { dir, hooks, skip_steps, max_steps })
}

/// A size flag's bytes (sizes only: fractions of memory make no sense for these).
fn size_flag(name: &str, v: KvMemory) -> anyhow::Result<u64> {
    match v {
        KvMemory::Bytes(b) => Ok(b),
        KvMemory::Fraction(_) => anyhow::bail!("--{name} takes a size (256MiB, 1GB), not a fraction"),
    }
}

pub struct AppState {
    pub engine: EngineHandle,
    pub router: mpsc::UnboundedSender<router::RouterMsg>,
    pub model: Arc<LoadedModel>,
    pub chat_template: Option<ChatTemplate>,
    pub limits: Limits,
    pub served_name: String,
    pub api_key: Option<String>,
    pub next_id: AtomicU64,
    pub in_flight: AtomicUsize,
    pub max_in_flight: usize,
    pub metrics: metrics::Metrics,
    pub stats: watch::Receiver<EngineStats>,
    pub created: u64,
    /// False once the engine thread has ended (health answers 503, requests 503).
    pub engine_alive: Arc<AtomicBool>,
    pub captures: capture_store::CaptureStore,
    pub steering_vectors: steering_vectors::SteeringVectors,
    /// Where `POST /debug/dump` writes (clients never choose paths).
    pub dump_dir: std::path::PathBuf,
    pub profile_dir: std::path::PathBuf,
    /// A profile was started and not yet stopped: the API side of requests is sent to it.
    /// (After a `num_steps` auto-stop the engine drops what arrives until `/stop_profile`.)
    pub profiling: AtomicBool,
    pub otlp: Option<Arc<otlp::Otlp>>,
}

/// Lives in the engine thread's sink: when the thread ends (even by a panic), the router
/// hears of it and every waiting handler is answered.
struct EngineLife {
    router: mpsc::UnboundedSender<router::RouterMsg>,
    alive: Arc<AtomicBool>,
}

impl Drop for EngineLife {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::SeqCst);
        let _ = self.router.send(router::RouterMsg::EngineStopped);
    }
}

pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // The exporter's blocking HTTP client lives outside the async runtime.
    let otlp = match &args.otlp_traces_endpoint {
        Some(e) => Some(Arc::new(otlp::Otlp::new(e, "glassbox").with_context(|| format!("--otlp-traces-endpoint {e}"))?)),
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let result = rt.block_on(serve_async(args, otlp.clone()));
    drop(rt);
    if let Some(o) = otlp {
        o.shutdown();
    }
    result
}

async fn serve_async(args: ServeArgs, otlp: Option<Arc<otlp::Otlp>>) -> anyhow::Result<()> {
    let source = glassbox_model::resolve(args.model.as_deref())?;
    let opts = LoadOptions { dequantize: args.dequantize, batch_invariant: args.batch_invariant };
    let model = Arc::new(glassbox_model::load(&source, opts).with_context(|| format!("loading {}", source.path().display()))?);
    let steering_vectors = match &args.steering_vectors {
        Some(dir) => steering_vectors::SteeringVectors::load_dir(dir)?,
        None => Default::default(),
    };
    let dump = match &args.dump_dir {
        Some(dir) => Some(dump_config(dir.clone(), &args.dump_hooks, &args.dump_layers, args.dump_skip_steps, args.dump_max_steps, &model.model.hook_names())?),
        None => None,
    };
    let profile_dir = args.profile_dir.clone().unwrap_or_else(|| glassbox_model::fetch::cache_dir().join("profiles"));
    let cfg = EngineConfig {
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_model_len: args.max_model_len,
        kv_cache_memory: args.kv_cache_memory,
        kv_cache_dtype: args.kv_cache_dtype,
        crash_dump_dir: Some(args.crash_dump_dir.clone().unwrap_or_else(|| glassbox_model::fetch::cache_dir().join("crash-dumps"))),
        max_capture_bytes: size_flag("max-capture-bytes", args.max_capture_bytes)?,
        dump,
        profile_dir: Some(profile_dir.clone()),
        ..Default::default()
    };
    let core = EngineCore::new(model.clone(), cfg)?;
    let limits = core.limits();
    let mc = &model.model.cfg;
    eprintln!(
        "glassbox {}: loaded {} ({:?}, {} layers, d={}, vocab {}) from {}",
        env!("CARGO_PKG_VERSION"),
        model.name,
        mc.arch,
        mc.num_layers,
        mc.hidden_size,
        mc.vocab_size,
        source.path().display()
    );
    eprintln!(
        "KV cache ({}): {} tokens fit; max model length {}, max {} sequences",
        args.kv_cache_dtype,
        limits.kv_capacity_tokens,
        limits.max_model_len,
        args.max_num_seqs
    );

    let (router_tx, router_rx) = mpsc::unbounded_channel();
    let (stats_tx, stats_rx) = watch::channel(core.stats());
    tokio::spawn(router::run(router_rx, stats_tx));
    let engine_alive = Arc::new(AtomicBool::new(true));
    let life = EngineLife { router: router_tx.clone(), alive: engine_alive.clone() };
    let engine = EngineHandle::spawn(core, move |outs, stats| {
        let _ = life.router.send(router::RouterMsg::Outputs(outs, stats));
    })
    .context("starting the engine thread")?;
    let chat_template = match &model.chat_template {
        Some(src) => match ChatTemplate::new(src) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("warning: the model's chat template does not parse ({e}); /v1/chat/completions will answer 400");
                None
            }
        },
        None => None,
    };
    let state = Arc::new(AppState {
        engine,
        router: router_tx,
        served_name: args.served_model_name.clone().unwrap_or_else(|| model.name.clone()),
        chat_template,
        model,
        limits,
        api_key: args.api_key.clone(),
        next_id: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
        max_in_flight: args.max_num_seqs + args.max_waiting_requests,
        metrics: metrics::Metrics::default(),
        stats: stats_rx,
        created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        engine_alive,
        captures: capture_store::CaptureStore::new(size_flag("capture-store-bytes", args.capture_store_bytes)?, Duration::from_secs(args.capture_ttl)),
        steering_vectors,
        dump_dir: args.dump_dir.clone().unwrap_or_else(|| glassbox_model::fetch::cache_dir().join("dumps")),
        profile_dir,
        profiling: AtomicBool::new(false),
        otlp,
    });
    #[cfg(unix)]
    tokio::spawn(dump_on_sigquit(state.clone()));

    let app = app(state.clone(), args.max_body_bytes);
    let addr = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    eprintln!("ready: serving `{}` on http://{local} (OpenAI API under /v1)", state.served_name);

    let grace = Duration::from_secs(args.shutdown_grace_period);
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown_signal().await;
        eprintln!("shutting down: no new requests; in-flight requests get {}s", grace.as_secs());
        let _ = stop_tx.send(true);
    });
    // After the grace period, abort whatever still runs so open streams end.
    let aborter = {
        let state = state.clone();
        let mut stop_rx = stop_rx.clone();
        tokio::spawn(async move {
            let _ = stop_rx.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
            handlers::abort_all(&state);
        })
    };
    server.await?;
    aborter.abort();
    eprintln!("stopped");
    Ok(())
}

/// SIGQUIT writes a state dump of every request in flight; the server keeps serving.
#[cfg(unix)]
async fn dump_on_sigquit(state: Arc<AppState>) {
    let Ok(mut quit) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::quit()) else { return };
    while quit.recv().await.is_some() {
        let asked = state.engine.control(glassbox_engine::EngineCommand::DumpState(Box::new(|r| match r {
            Ok(p) => eprintln!("SIGQUIT: engine state dumped to {}", p.display()),
            Err(e) => eprintln!("SIGQUIT: the state dump failed: {e}"),
        })));
        if asked.is_err() {
            eprintln!("SIGQUIT: the engine has stopped; no dump");
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// The OpenAPI description: schemas come from the request types, paths from the handlers'
/// `#[utoipa::path]` attributes, collected by the same router that serves them.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "glassbox", description = "An OpenAI-compatible LLM server you can see inside."),
    modifiers(&BearerKey),
    components(schemas(openai::ErrorBody))
)]
struct ApiDoc;

struct BearerKey;

impl utoipa::Modify for BearerKey {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme("api_key", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()));
    }
}

pub fn app(state: Arc<AppState>, max_body: usize) -> Router {
    use utoipa::OpenApi;
    use utoipa_axum::{router::OpenApiRouter, routes};
    // Behind the API key when one is set.
    let (protected, mut api) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(generate::completions))
        .routes(routes!(generate::chat_completions))
        .routes(routes!(handlers::models))
        .routes(routes!(handlers::dump_state))
        .routes(routes!(handlers::tensor_dump))
        .routes(routes!(handlers::start_profile))
        .routes(routes!(handlers::debug_requests))
        .routes(routes!(handlers::debug_kv))
        .routes(routes!(handlers::debug_steps))
        .routes(routes!(handlers::stop_profile))
        .routes(routes!(handlers::get_capture))
        .routes(routes!(handlers::add_steering_vector, handlers::list_steering_vectors))
        .split_for_parts();
    let protected = protected.route_layer(axum::middleware::from_fn_with_state(state.clone(), handlers::require_api_key));
    let (open, open_api) = OpenApiRouter::new()
        .routes(routes!(handlers::health))
        .routes(routes!(handlers::version))
        .routes(routes!(handlers::tokenize))
        .routes(routes!(handlers::detokenize))
        .routes(routes!(handlers::metrics))
        .split_for_parts();
    api.merge(open_api);
    let api = Arc::new(with_server_limits(api, &state));
    Router::new()
        .merge(protected)
        .merge(open)
        .route("/openapi.json", get(move || async move { axum::Json(api.as_ref().clone()) }))
        .fallback(handlers::not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn(telemetry::access_log))
        .with_state(state)
}

/// The document as this server answers it: the one model name, the context length and the
/// vocabulary filled in, so clients (and schemathesis) know the limits before a 400 says so.
fn with_server_limits(api: utoipa::openapi::OpenApi, st: &AppState) -> serde_json::Value {
    let mut doc = serde_json::to_value(&api).unwrap_or_default();
    let schemas = &mut doc["components"]["schemas"];
    let common = &mut schemas["Common"]["properties"];
    common["model"]["enum"] = serde_json::json!([st.served_name]);
    common["max_tokens"]["maximum"] = st.limits.max_model_len.into();
    schemas["ChatRequest"]["allOf"][1]["properties"]["max_completion_tokens"]["maximum"] = st.limits.max_model_len.into();
    let last_token = st.limits.vocab_size.saturating_sub(1);
    // Empty prompts are 400s; say so (utoipa cannot put these on untagged variants).
    schemas["Prompt"]["oneOf"][0]["minLength"] = 1.into();
    schemas["Prompt"]["oneOf"][1]["items"]["minLength"] = 1.into();
    for v in 1..4 {
        schemas["Prompt"]["oneOf"][v]["minItems"] = 1.into();
    }
    schemas["Prompt"]["oneOf"][3]["items"]["minItems"] = 1.into();
    schemas["Prompt"]["oneOf"][2]["items"]["maximum"] = last_token.into();
    schemas["Prompt"]["oneOf"][3]["items"]["items"]["maximum"] = last_token.into();
    schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]["maximum"] = last_token.into();
    doc
}
