//! Where a pipeline's requests run: the engine in this process, or OpenAI-compatible servers
//! (spread by least outstanding requests). Both take calls and hand back replies as they
//! finish, so the driver keeps up to `--max-inflight` requests in flight either way.

use super::family::Input;
use anyhow::{Context, Result};
use glassbox_engine::{EngineConfig, EngineCore};
use glassbox_model::LoadedModel;
use glassbox_protocol::{CapturePositions, CaptureSpec, EngineRequest, FinishReason, SamplingParams};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request of one stage of one item.
pub struct Call {
    pub key: u64,
    pub input: Input,
    pub max_tokens: usize,
    pub temperature: f32,
    /// Hook names or globs, and positions (`last`, `all`, ...).
    pub capture: Option<(Vec<String>, String)>,
}

pub struct Answer {
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// The capture as a safetensors file.
    pub capture: Option<Vec<u8>>,
}

pub struct Reply {
    pub key: u64,
    pub result: Result<Answer, String>,
}

pub trait Backend {
    fn submit(&mut self, call: Call);
    /// Block until at least one call finishes; every reply ready by then.
    fn wait(&mut self) -> Vec<Reply>;
}

/// The engine in this process, stepped by the driver's thread.
pub struct Local {
    core: EngineCore,
    model: Arc<LoadedModel>,
    partial: HashMap<u64, Answer>,
    ready: Vec<Reply>,
}

impl Local {
    pub fn new(model: Arc<LoadedModel>, max_inflight: usize) -> Result<Local> {
        let cfg = EngineConfig { max_num_seqs: max_inflight.max(1), ..Default::default() };
        Ok(Local { core: EngineCore::new(model.clone(), cfg)?, model, partial: HashMap::new(), ready: vec![] })
    }

    fn request(&self, call: &Call) -> Result<EngineRequest, String> {
        let prompt = match &call.input {
            Input::Text(t) => self.model.tokenizer.encode(t, true),
            Input::Chat(m) => {
                let template = self.model.chat_template().map_err(|e| e.to_string())?;
                let text = template.render(&Value::Array(m.clone()), &self.model.chat_context(true)).map_err(|e| e.to_string())?;
                self.model.tokenizer.encode(&text, false)
            }
        }
        .map_err(|e| e.to_string())?;
        let capture = match &call.capture {
            None => None,
            Some((hooks, positions)) => {
                let hooks = glassbox_protocol::resolve_patterns(hooks, &self.model.model.hook_names()).map_err(|e| e.to_string())?;
                let positions: CapturePositions = positions.parse().map_err(|e: String| e)?;
                Some(CaptureSpec { hooks, positions, dtype: Default::default() })
            }
        };
        let sampling = SamplingParams { max_tokens: call.max_tokens, temperature: call.temperature, ..Default::default() };
        Ok(EngineRequest { id: call.key, prompt, sampling, capture, ..Default::default() })
    }
}

impl Backend for Local {
    fn submit(&mut self, call: Call) {
        match self.request(&call) {
            Ok(r) => {
                self.partial.insert(call.key, Answer { text: String::new(), prompt_tokens: r.prompt.len(), completion_tokens: 0, capture: None });
                self.core.add_request(r);
            }
            Err(e) => self.ready.push(Reply { key: call.key, result: Err(e) }),
        }
    }

    fn wait(&mut self) -> Vec<Reply> {
        while self.ready.is_empty() && self.core.has_work() {
            let outputs = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.core.step())) {
                Ok(o) => o,
                Err(p) => self.core.recover(&glassbox_engine::core::panic_message(p.as_ref())),
            };
            for o in outputs {
                let Some(a) = self.partial.get_mut(&o.id) else { continue };
                a.text.push_str(&o.text);
                a.completion_tokens = o.completion_tokens;
                let Some(finish) = o.finish else { continue };
                let mut a = self.partial.remove(&o.id).expect("partial answer exists");
                if let Some(parts) = o.capture {
                    let captures = parts.assemble();
                    let meta = HashMap::from([("model".to_string(), self.model.name.clone())]);
                    a.capture = glassbox_model::capture_file::to_safetensors(&captures, meta).ok();
                }
                let result = match finish {
                    FinishReason::Error(m) => Err(m),
                    FinishReason::Abort => Err("aborted".into()),
                    _ => Ok(a),
                };
                self.ready.push(Reply { key: o.id, result });
            }
            if self.core.stalled() {
                for o in self.core.recover("the engine cannot schedule the remaining requests") {
                    self.partial.remove(&o.id);
                    self.ready.push(Reply { key: o.id, result: Err("the engine cannot schedule this request".into()) });
                }
            }
        }
        std::mem::take(&mut self.ready)
    }
}

/// OpenAI-compatible servers, one worker thread per request in flight. Each request goes to
/// the server with the fewest outstanding requests; 5xx answers and connection failures are
/// retried (3 times, backing off), 4xx answers are the item's error.
pub struct Http {
    calls: Sender<Call>,
    replies: Receiver<Reply>,
}

pub struct Servers {
    pub urls: Vec<String>,
    pub model: Option<String>,
    outstanding: Vec<AtomicUsize>,
}

impl Http {
    pub fn new(urls: Vec<String>, model: Option<String>, workers: usize) -> Http {
        let servers = Arc::new(Servers { outstanding: urls.iter().map(|_| AtomicUsize::new(0)).collect(), urls, model });
        let (calls, rx) = channel::<Call>();
        let (tx, replies) = channel();
        let rx = Arc::new(Mutex::new(rx));
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(600))).build().into();
        for _ in 0..workers.max(1) {
            let (rx, tx, servers, agent) = (rx.clone(), tx.clone(), servers.clone(), agent.clone());
            std::thread::spawn(move || loop {
                let call = match rx.lock() {
                    Ok(r) => match r.recv() {
                        Ok(c) => c,
                        Err(_) => return,
                    },
                    Err(_) => return,
                };
                let result = servers.call(&agent, &call);
                if tx.send(Reply { key: call.key, result }).is_err() {
                    return;
                }
            });
        }
        Http { calls, replies }
    }
}

impl Servers {
    fn call(&self, agent: &ureq::Agent, call: &Call) -> Result<Answer, String> {
        let mut body = json!({"max_tokens": call.max_tokens, "temperature": call.temperature});
        if let Some(m) = &self.model {
            body["model"] = json!(m);
        }
        let path = match &call.input {
            Input::Text(t) => {
                body["prompt"] = json!(t);
                "/v1/completions"
            }
            Input::Chat(m) => {
                body["messages"] = json!(m);
                "/v1/chat/completions"
            }
        };
        if let Some((hooks, positions)) = &call.capture {
            body["capture"] = json!({"hooks": hooks, "positions": positions});
        }
        let mut last = String::new();
        for attempt in 0..4 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200 << attempt));
            }
            // Least outstanding requests.
            let i = (0..self.urls.len()).min_by_key(|&i| self.outstanding[i].load(Ordering::SeqCst)).unwrap_or(0);
            self.outstanding[i].fetch_add(1, Ordering::SeqCst);
            let url = format!("{}{path}", self.urls[i].trim_end_matches('/'));
            let sent = agent.post(&url).header("content-type", "application/json").send(body.to_string());
            self.outstanding[i].fetch_sub(1, Ordering::SeqCst);
            let mut resp = match sent {
                Ok(r) => r,
                Err(e) => {
                    last = format!("{url}: {e}");
                    continue;
                }
            };
            let status = resp.status().as_u16();
            let doc: Value = resp.body_mut().read_to_string().ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or(Value::Null);
            let message = doc["error"]["message"].as_str().unwrap_or("").to_string();
            match status {
                200 => return answer(&doc),
                500..=599 => last = format!("{url} answered {status}: {message}"),
                _ => return Err(format!("{url} answered {status}: {message}")),
            }
        }
        Err(format!("{last} (after 3 retries)"))
    }
}

fn answer(doc: &Value) -> Result<Answer, String> {
    let choice = &doc["choices"][0];
    if choice["finish_reason"] == "error" {
        return Err(choice["error"]["message"].as_str().unwrap_or("the server failed this request").to_string());
    }
    let text = choice["text"].as_str().or(choice["message"]["content"].as_str()).ok_or("the response has no text")?;
    let capture = match choice["capture"]["data"].as_str() {
        Some(b) => {
            use base64::Engine;
            Some(base64::engine::general_purpose::STANDARD.decode(b).map_err(|e| format!("the capture is not base64: {e}"))?)
        }
        None => None,
    };
    let usage = &doc["usage"];
    Ok(Answer {
        text: text.to_string(),
        prompt_tokens: usage["prompt_tokens"].as_u64().unwrap_or(0) as usize,
        completion_tokens: usage["completion_tokens"].as_u64().unwrap_or(0) as usize,
        capture,
    })
}

impl Backend for Http {
    fn submit(&mut self, call: Call) {
        // If every worker is gone, `wait` returns nothing and the driver fails what is left.
        let _ = self.calls.send(call);
    }

    fn wait(&mut self) -> Vec<Reply> {
        let mut out = match self.replies.recv() {
            Ok(r) => vec![r],
            Err(_) => return vec![],
        };
        out.extend(self.replies.try_iter());
        out
    }
}

/// The served model's name (for requests and the family guess) from `/v1/models`, and whether
/// it has a chat template (glassbox says; other servers are taken to have one).
pub fn served_model(url: &str) -> Result<(String, bool)> {
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(30))).build().into();
    let text = agent.get(&format!("{}/v1/models", url.trim_end_matches('/'))).call().with_context(|| format!("asking {url} for its model"))?.body_mut().read_to_string()?;
    let doc: Value = serde_json::from_str(&text)?;
    let name = doc["data"][0]["id"].as_str().map(str::to_string).context("the server lists no model at /v1/models")?;
    Ok((name, doc["data"][0]["has_chat_template"].as_bool().unwrap_or(true)))
}
