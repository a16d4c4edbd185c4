//! What the engine counts: a plain-data [`EngineStats`] snapshot (sent with every step's
//! outputs, rendered by the API layer as Prometheus metrics) and each request's
//! [`RequestClock`], which becomes the [`RequestTimings`] on its finishing output.

use glassbox_protocol::RequestTimings;
use std::fmt::Write;
use std::time::Instant;

/// A Prometheus-style histogram with fixed buckets (counts are per bucket, not cumulative).
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    pub buckets: &'static [f64],
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn new(buckets: &'static [f64]) -> Self {
        Histogram { buckets, counts: vec![0; buckets.len()], sum: 0.0, count: 0 }
    }

    pub fn observe(&mut self, v: f64) {
        if let Some(i) = self.buckets.iter().position(|b| v <= *b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    /// The Prometheus text format (`_bucket` lines are cumulative there); `labels` like
    /// `model_name="m"` or empty.
    pub fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let (sep, set) = if labels.is_empty() { ("", String::new()) } else { (",", format!("{{{labels}}}")) };
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.buckets.iter().zip(&self.counts) {
            cumulative += c;
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}\n{name}_sum{set} {}\n{name}_count{set} {}", self.count, self.sum, self.count);
    }
}

/// vLLM's `iteration_tokens_total` buckets.
const STEP_TOKENS: &[f64] = &[1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0];
const STEP_SECONDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A snapshot for metrics; plain data.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_total: usize,
    pub kv_blocks_used: usize,
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    pub preemptions: u64,
    pub steps: u64,
    pub prompt_tokens_computed: u64,
    /// Tokens computed per step.
    pub step_tokens: Histogram,
    /// Wall time per step.
    pub step_seconds: Histogram,
    /// Steps written to a tensor dump.
    pub dumps_written: u64,
}

impl Default for EngineStats {
    fn default() -> Self {
        EngineStats {
            running: 0,
            waiting: 0,
            kv_blocks_total: 0,
            kv_blocks_used: 0,
            prefix_queries: 0,
            prefix_hits: 0,
            preemptions: 0,
            steps: 0,
            prompt_tokens_computed: 0,
            step_tokens: Histogram::new(STEP_TOKENS),
            step_seconds: Histogram::new(STEP_SECONDS),
            dumps_written: 0,
        }
    }
}

impl EngineStats {
    pub fn kv_usage(&self) -> f64 {
        if self.kv_blocks_total == 0 {
            0.0
        } else {
            self.kv_blocks_used as f64 / self.kv_blocks_total as f64
        }
    }

    pub fn prefix_hit_rate(&self) -> f64 {
        if self.prefix_queries == 0 {
            0.0
        } else {
            self.prefix_hits as f64 / self.prefix_queries as f64
        }
    }
}

/// When things happened to one request in the engine.
#[derive(Clone, Debug)]
pub struct RequestClock {
    pub arrived: Instant,
    pub first_scheduled: Option<Instant>,
    pub first_token: Option<Instant>,
    pub steps: u64,
    last_step: u64,
    pub preemptions: u64,
}

impl RequestClock {
    pub fn new(arrived: Instant) -> Self {
        RequestClock { arrived, first_scheduled: None, first_token: None, steps: 0, last_step: 0, preemptions: 0 }
    }

    /// The request has rows in step `step` (counted once per step, whatever its `n`).
    /// True when this is its first step (its time in queue ends at `at`).
    pub fn scheduled(&mut self, step: u64, at: Instant) -> bool {
        if self.last_step != step {
            self.last_step = step;
            self.steps += 1;
        }
        let first = self.first_scheduled.is_none();
        self.first_scheduled.get_or_insert(at);
        first
    }

    pub fn token(&mut self, at: Instant) {
        self.first_token.get_or_insert(at);
    }

    pub fn timings(&self, now: Instant) -> RequestTimings {
        let since = |t: Instant| t.saturating_duration_since(self.arrived).as_secs_f64();
        let scheduled = self.first_scheduled.unwrap_or(now);
        RequestTimings {
            queued: since(scheduled),
            first_token: self.first_token.map(since),
            prefill: self.first_token.unwrap_or(now).saturating_duration_since(scheduled).as_secs_f64(),
            decode: self.first_token.map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64()),
            total: since(now),
            steps: self.steps,
            preemptions: self.preemptions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timings_split_queue_prefill_decode() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut c = RequestClock::new(t0);
        assert!(c.scheduled(7, at(10)));
        assert!(!c.scheduled(7, at(10)), "a second sequence in the same step is the same step");
        assert!(!c.scheduled(8, at(30)));
        c.token(at(30));
        c.token(at(50));
        let t = c.timings(at(100));
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(t.queued, 0.010) && close(t.prefill, 0.020) && close(t.decode, 0.070) && close(t.total, 0.100), "{t:?}");
        assert_eq!((t.first_token.map(|f| (f * 1000.0).round()), t.steps), (Some(30.0), 2));
    }

    #[test]
    fn histogram_renders_cumulative_buckets() {
        let mut h = Histogram::new(&[1.0, 10.0]);
        for v in [0.5, 5.0, 5.0, 50.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "help", "");
        assert!(out.contains("x_bucket{le=\"1\"} 1\nx_bucket{le=\"10\"} 3\nx_bucket{le=\"+Inf\"} 4\nx_sum 60.5\nx_count 4"), "{out}");
    }
}
