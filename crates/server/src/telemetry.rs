//! What the API layer tells about each HTTP request: an access-log line (method, path, status,
//! tokens, time; written when the response body ends, so a stream is timed to its last
//! event), a `tracing` span carrying the request id, and the API side of a running profile.

use crate::AppState;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use futures_util::StreamExt;
use glassbox_engine::profile::ApiTrace;
use glassbox_engine::EngineCommand;
use glassbox_protocol::RequestId;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

/// Token counts a generation handler fills in as it goes; the access log reads them at the end.
#[derive(Clone, Default)]
pub struct AccessTokens(Arc<[AtomicUsize; 2]>);

impl AccessTokens {
    pub fn set(&self, prompt: usize, completion: usize) {
        self.0[0].store(prompt, Ordering::Relaxed);
        self.0[1].store(completion, Ordering::Relaxed);
    }
}

/// One access-log line, written when dropped (the end of the response body).
struct AccessLine {
    method: String,
    path: String,
    status: StatusCode,
    request_id: String,
    tokens: Option<AccessTokens>,
    started: Instant,
}

impl Drop for AccessLine {
    fn drop(&mut self) {
        let (prompt, completion) = match &self.tokens {
            Some(t) => (t.0[0].load(Ordering::Relaxed), t.0[1].load(Ordering::Relaxed)),
            None => (0, 0),
        };
        tracing::info!(
            target: "glassbox::access",
            method = %self.method,
            path = %self.path,
            status = self.status.as_u16(),
            request_id = %self.request_id,
            prompt_tokens = prompt,
            completion_tokens = completion,
            ms = format_args!("{:.1}", self.started.elapsed().as_secs_f64() * 1e3),
            "{} {} {}",
            self.method,
            self.path,
            self.status.as_u16()
        );
    }
}

/// Every request gets an id (the client's `X-Request-Id` when it sent a valid one), a span
/// that carries it through the handler's log lines, and an access-log line at the end.
pub async fn access_log(mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = match req.headers().get("x-request-id") {
        Some(v) => v.to_str().unwrap_or("(invalid)").to_string(),
        None => {
            let id = format!("{:032x}", rand::random::<u128>());
            if let Ok(v) = HeaderValue::from_str(&id) {
                req.headers_mut().insert("x-request-id", v);
            }
            id
        }
    };
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    let span = tracing::info_span!("http", request_id = %request_id, method = %method, path = %path);
    let resp = next.run(req).instrument(span).await;
    let line = AccessLine { method, path, status: resp.status(), request_id, tokens: resp.extensions().get::<AccessTokens>().cloned(), started };
    let streaming = resp.headers().get(axum::http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !streaming {
        return resp;
    }
    // The line is written when the stream ends (or the client goes away).
    let (parts, body) = resp.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        let _ = &line;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}

/// The API side of one request's time: consecutive phases, each from the end of the last.
pub struct ApiClock {
    started: Instant,
    mark: Instant,
    spans: Vec<(&'static str, Instant, Instant)>,
}

impl ApiClock {
    pub fn start() -> Self {
        let now = Instant::now();
        ApiClock { started: now, mark: now, spans: vec![] }
    }

    /// The phase `name` ended now.
    pub fn lap(&mut self, name: &'static str) {
        let now = Instant::now();
        self.spans.push((name, self.mark, now));
        self.mark = now;
    }

    /// Hand the phases to the running profile, if one runs (one branch otherwise).
    pub fn send(mut self, st: &AppState, tag: &str, path: &str, requests: &[RequestId]) {
        if !st.profiling.load(Ordering::Relaxed) {
            return;
        }
        self.spans.insert(0, ("request", self.started, Instant::now()));
        let trace = ApiTrace { tag: tag.to_string(), path: path.to_string(), requests: requests.to_vec(), spans: self.spans };
        let _ = st.engine.control(EngineCommand::ApiTrace(Box::new(trace)));
    }
}
