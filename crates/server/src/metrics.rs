//! Prometheus metrics, named after vLLM's (`vllm:` families as `glassbox:`): the engine's
//! snapshot (running, waiting, KV usage, prefix cache, per-step tokens and durations, dumps)
//! plus what the API layer sees per request (latencies, the engine's queue/prefill/decode split,
//! token counts, finish reasons, capture bytes, steered requests).

use glassbox_engine::{EngineStats, Histogram};
use glassbox_protocol::RequestTimings;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

struct Inner {
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    queue: Histogram,
    prefill: Histogram,
    decode: Histogram,
    inference: Histogram,
    capture_bytes: u64,
    steered: u64,
    finished: BTreeMap<&'static str, u64>,
    prompt_tokens: u64,
    generation_tokens: u64,
}

pub struct Metrics {
    inner: Mutex<Inner>,
}

const TTFT: &[f64] = &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const ITL: &[f64] = &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0];
const E2E: &[f64] = &[0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0];

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            inner: Mutex::new(Inner {
                ttft: Histogram::new(TTFT),
                itl: Histogram::new(ITL),
                e2e: Histogram::new(E2E),
                queue: Histogram::new(E2E),
                prefill: Histogram::new(E2E),
                decode: Histogram::new(E2E),
                inference: Histogram::new(E2E),
                capture_bytes: 0,
                steered: 0,
                finished: BTreeMap::new(),
                prompt_tokens: 0,
                generation_tokens: 0,
            }),
        }
    }
}

/// One finished request as the API layer saw it.
pub struct RequestTiming {
    pub ttft: Option<f64>,
    pub itl: Vec<f64>,
    pub e2e: f64,
    pub finish: &'static str,
    pub prompt_tokens: usize,
    pub generation_tokens: usize,
    /// The engine's account of each engine request (one per prompt).
    pub engine: Vec<RequestTimings>,
}

impl Metrics {
    pub fn record(&self, t: RequestTiming) {
        let Ok(mut m) = self.inner.lock() else { return };
        if let Some(v) = t.ttft {
            m.ttft.observe(v);
        }
        for v in t.itl {
            m.itl.observe(v);
        }
        m.e2e.observe(t.e2e);
        for e in &t.engine {
            m.queue.observe(e.queued);
            m.prefill.observe(e.prefill);
            m.decode.observe(e.decode);
            m.inference.observe(e.prefill + e.decode);
        }
        *m.finished.entry(t.finish).or_default() += 1;
        m.prompt_tokens += t.prompt_tokens as u64;
        m.generation_tokens += t.generation_tokens as u64;
    }

    /// Bytes of captures handed to clients (inline or stored for download).
    pub fn capture_bytes(&self, n: usize) {
        if let Ok(mut m) = self.inner.lock() {
            m.capture_bytes += n as u64;
        }
    }

    /// A request that steers activations was accepted.
    pub fn steered(&self) {
        if let Ok(mut m) = self.inner.lock() {
            m.steered += 1;
        }
    }

    pub fn render(&self, s: &EngineStats, model: &str) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{model_name=\"{model}\"}} {v}");
        };
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{model_name=\"{model}\"}} {v}");
        };
        gauge(&mut out, "glassbox:num_requests_running", "Sequences running in the engine.", s.running as f64);
        gauge(&mut out, "glassbox:num_requests_waiting", "Sequences waiting for the engine.", s.waiting as f64);
        gauge(&mut out, "glassbox:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).", s.kv_usage());
        gauge(&mut out, "glassbox:kv_cache_blocks_used", "KV cache blocks referenced by sequences.", s.kv_blocks_used as f64);
        gauge(&mut out, "glassbox:prefix_cache_hit_rate", "Full prompt blocks found in the prefix cache / looked up.", s.prefix_hit_rate());
        counter(&mut out, "glassbox:prefix_cache_queries_total", "Full prompt blocks looked up in the prefix cache.", s.prefix_queries);
        counter(&mut out, "glassbox:prefix_cache_hits_total", "Full prompt blocks served from the prefix cache.", s.prefix_hits);
        counter(&mut out, "glassbox:num_preemptions_total", "Sequences preempted for lack of KV blocks.", s.preemptions);
        counter(&mut out, "glassbox:tensor_dump_steps_total", "Engine steps written to a tensor dump.", s.dumps_written);
        let labels = format!("model_name=\"{model}\"");
        s.step_tokens.render(&mut out, "glassbox:iteration_tokens_total", "Tokens computed per engine step.", &labels);
        s.step_seconds.render(&mut out, "glassbox:step_duration_seconds", "Wall time of one engine step.", &labels);
        let Ok(m) = self.inner.lock() else { return out };
        counter(&mut out, "glassbox:capture_bytes_total", "Bytes of activation captures returned to clients.", m.capture_bytes);
        counter(&mut out, "glassbox:steer_requests_total", "Requests that steered activations.", m.steered);
        counter(&mut out, "glassbox:prompt_tokens_total", "Prompt tokens of finished requests.", m.prompt_tokens);
        counter(&mut out, "glassbox:generation_tokens_total", "Generated tokens of finished requests.", m.generation_tokens);
        let _ = writeln!(out, "# HELP glassbox:request_success_total Finished requests by finish reason.\n# TYPE glassbox:request_success_total counter");
        for reason in ["stop", "length", "abort", "error"] {
            let v = m.finished.get(reason).copied().unwrap_or(0);
            let _ = writeln!(out, "glassbox:request_success_total{{model_name=\"{model}\",finished_reason=\"{reason}\"}} {v}");
        }
        m.ttft.render(&mut out, "glassbox:time_to_first_token_seconds", "Time to first token.", &labels);
        m.itl.render(&mut out, "glassbox:inter_token_latency_seconds", "Time between tokens of a request.", &labels);
        m.e2e.render(&mut out, "glassbox:e2e_request_latency_seconds", "Request latency, arrival to last token.", &labels);
        m.queue.render(&mut out, "glassbox:request_queue_time_seconds", "Time a request waited in the engine before its first step.", &labels);
        m.prefill.render(&mut out, "glassbox:request_prefill_time_seconds", "First step to first token.", &labels);
        m.decode.render(&mut out, "glassbox:request_decode_time_seconds", "First token to the last.", &labels);
        m.inference.render(&mut out, "glassbox:request_inference_time_seconds", "First step to the last token (prefill + decode).", &labels);
        out
    }
}
