//! The engine's built-in profiler: always compiled, off until started, one branch per phase
//! when off. A running profile records the engine thread's phases of every step (with the
//! step's batch composition) and one track per request (queued, each prefill chunk, decode,
//! finished), and writes a Chrome trace-event JSON (Perfetto and chrome://tracing open it)
//! plus a plain-text summary of the top spans, like torch profiler's `key_averages()`.

use glassbox_model::OpSpan;
use glassbox_protocol::RequestId;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What `/start_profile` asks for.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProfileOptions {
    /// Stop by itself after this many engine steps.
    pub num_steps: Option<u64>,
    /// A label for the files (letters, digits, `-` and `_`).
    pub name: Option<String>,
    /// Also record every layer and op of each forward pass (attention, each matmul, norms,
    /// hook handlers).
    #[serde(default)]
    pub with_layers: bool,
}

/// The files a finished profile wrote.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProfileFiles {
    pub trace: PathBuf,
    pub summary: PathBuf,
    pub steps: u64,
}

/// The API layer's view of one HTTP request, sent to a running profile as plain data: its
/// phases (parse, render template, tokenize, wait, stream) as `(name, start, end)`.
#[derive(Clone, Debug)]
pub struct ApiTrace {
    /// The client-visible request id.
    pub tag: String,
    pub path: String,
    /// The engine requests it became.
    pub requests: Vec<RequestId>,
    pub spans: Vec<(&'static str, Instant, Instant)>,
}

/// The engine thread's track; requests get `REQUEST_TRACK + id`, the API side of an HTTP
/// request `API_TRACK + its first engine request's id`.
const ENGINE_TRACK: u64 = 1;
const REQUEST_TRACK: u64 = 1_000_000_000;
const API_TRACK: u64 = 2_000_000_000;

pub struct Profiler {
    dir: PathBuf,
    name: String,
    t0: Instant,
    steps_left: Option<u64>,
    pub steps: u64,
    pub with_layers: bool,
    events: Vec<Value>,
    /// Requests seen, for track names.
    tracks: BTreeSet<RequestId>,
    /// API tracks: (track id, name).
    api_tracks: Vec<(u64, String)>,
}

impl Profiler {
    pub fn start(dir: &Path, opts: &ProfileOptions) -> Result<Profiler, String> {
        let name = opts.name.clone().unwrap_or_else(|| "profile".into());
        if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err("`name` must be 1 to 64 letters, digits, `-` or `_`".into());
        }
        if opts.num_steps == Some(0) {
            return Err("`num_steps` must be at least 1".into());
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create the profile directory {}: {e}", dir.display()))?;
        Ok(Profiler { dir: dir.to_path_buf(), name, t0: Instant::now(), steps_left: opts.num_steps, steps: 0, with_layers: opts.with_layers, events: vec![], tracks: BTreeSet::new(), api_tracks: vec![] })
    }

    /// Seconds since the profile started.
    pub fn running_for(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn us(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.t0).as_secs_f64() * 1e6
    }

    /// A span on the engine track.
    pub fn span(&mut self, name: &str, start: Instant, end: Instant, args: Value) {
        let (ts, dur) = (self.us(start), self.us(end) - self.us(start));
        self.events.push(json!({"name": name, "cat": "engine", "ph": "X", "ts": ts, "dur": dur, "pid": 1, "tid": ENGINE_TRACK, "args": args}));
    }

    /// One forward pass's layers and ops, on the engine track (they nest inside `forward`).
    pub fn ops(&mut self, ops: &[OpSpan]) {
        for o in ops {
            let (ts, dur) = (self.us(o.start), self.us(o.end) - self.us(o.start));
            // The summary groups by `group`: every layer's `q_proj` is one row.
            let (cat, name, group) = match (o.op, o.hook) {
                ("layer", _) => ("layer", format!("layer {}", o.layer.unwrap_or(0)), "layer".to_string()),
                (_, Some(h)) => ("op", format!("hook {}", h.site.suffix()), format!("hook {}", h.site.suffix())),
                (op, None) => ("op", op.to_string(), op.to_string()),
            };
            let hook = o.hook.map(|h| h.to_string());
            self.events.push(json!({"name": name, "cat": cat, "ph": "X", "ts": ts, "dur": dur, "pid": 1, "tid": ENGINE_TRACK, "args": {"layer": o.layer, "hook": hook, "group": group}}));
        }
    }

    /// The API side of one HTTP request, on its own track (its spans nest in `request`).
    pub fn api(&mut self, t: &ApiTrace) {
        let Some(&first) = t.requests.first() else { return };
        let tid = API_TRACK + first;
        self.api_tracks.push((tid, format!("api {} {}", t.path, t.tag)));
        for &(name, start, end) in &t.spans {
            let (ts, dur) = (self.us(start), self.us(end) - self.us(start));
            self.events.push(json!({"name": name, "cat": "api", "ph": "X", "ts": ts, "dur": dur, "pid": 1, "tid": tid, "args": {"request_id": t.tag, "engine_requests": t.requests}}));
        }
    }

    /// A span on a request's track.
    pub fn request_span(&mut self, request: RequestId, name: &str, start: Instant, end: Instant, args: Value) {
        self.tracks.insert(request);
        let (ts, dur) = (self.us(start), self.us(end) - self.us(start));
        self.events.push(json!({"name": name, "cat": "request", "ph": "X", "ts": ts, "dur": dur, "pid": 1, "tid": REQUEST_TRACK + request, "args": args}));
    }

    /// A moment on a request's track (finished, preempted).
    pub fn request_mark(&mut self, request: RequestId, name: &str, at: Instant, args: Value) {
        self.tracks.insert(request);
        let ts = self.us(at);
        self.events.push(json!({"name": name, "cat": "request", "ph": "i", "s": "t", "ts": ts, "pid": 1, "tid": REQUEST_TRACK + request, "args": args}));
    }

    /// Count a step; true when the profile should stop now (`num_steps` reached).
    pub fn step_done(&mut self) -> bool {
        self.steps += 1;
        match &mut self.steps_left {
            Some(n) => {
                *n -= 1;
                *n == 0
            }
            None => false,
        }
    }

    /// Write the trace and the summary; returns their paths.
    pub fn finish(self) -> Result<ProfileFiles, String> {
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
        let trace = self.dir.join(format!("{}-{stamp}.trace.json", self.name));
        self.finish_to(&trace)
    }

    /// Write the trace to `trace` and the summary beside it (`x.json` -> `x.summary.txt`).
    pub fn finish_to(mut self, trace: &Path) -> Result<ProfileFiles, String> {
        let mut meta = vec![
            json!({"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "glassbox engine"}}),
            json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": ENGINE_TRACK, "args": {"name": "engine thread (steps)"}}),
        ];
        for id in &self.tracks {
            meta.push(json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": REQUEST_TRACK + id, "args": {"name": format!("request {id}")}}));
        }
        for (tid, name) in &self.api_tracks {
            meta.push(json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}}));
        }
        meta.append(&mut self.events);
        let summary_text = summarize(&meta, self.steps);
        let doc = json!({"traceEvents": meta, "displayTimeUnit": "ms", "otherData": {"steps": self.steps}});
        std::fs::write(trace, serde_json::to_vec(&doc).map_err(|e| e.to_string())?).map_err(|e| format!("{}: {e}", trace.display()))?;
        let summary = trace.with_extension("").with_extension("summary.txt");
        std::fs::write(&summary, summary_text).map_err(|e| format!("{}: {e}", summary.display()))?;
        Ok(ProfileFiles { trace: trace.to_path_buf(), summary, steps: self.steps })
    }
}

/// Spans aggregated by name, largest total first.
fn summarize(events: &[Value], steps: u64) -> String {
    let mut by_name: BTreeMap<(String, String), (u64, f64, f64)> = BTreeMap::new();
    for e in events.iter().filter(|e| e["ph"] == "X") {
        let name = e["args"]["group"].as_str().or(e["name"].as_str()).unwrap_or("");
        let key = (e["cat"].as_str().unwrap_or("").to_string(), name.to_string());
        let dur = e["dur"].as_f64().unwrap_or(0.0);
        let entry = by_name.entry(key).or_insert((0, 0.0, 0.0));
        entry.0 += 1;
        entry.1 += dur;
        entry.2 = entry.2.max(dur);
    }
    let engine_total: f64 = by_name.iter().filter(|((c, n), _)| c == "engine" && n == "step").map(|(_, v)| v.1).sum();
    let mut rows: Vec<_> = by_name.into_iter().collect();
    rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
    let mut out = format!("glassbox engine profile: {steps} steps\n\n{:<8} {:<32} {:>8} {:>12} {:>11} {:>11} {:>8}\n", "track", "span", "count", "total ms", "mean us", "max us", "% step");
    out += &"-".repeat(96);
    out.push('\n');
    for ((cat, name), (count, total, max)) in rows {
        let share = if matches!(cat.as_str(), "engine" | "layer" | "op") && engine_total > 0.0 { format!("{:.1}", 100.0 * total / engine_total) } else { String::new() };
        out += &format!("{cat:<8} {name:<32} {count:>8} {:>12.3} {:>11.1} {max:>11.1} {share:>8}\n", total / 1000.0, total / count as f64);
    }
    out
}
