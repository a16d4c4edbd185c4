//! OpenTelemetry export (`--otlp-traces-endpoint`): one `llm_request` span per finished
//! request, OTLP over HTTP (JSON), with the attributes vLLM emits under the GenAI semantic
//! conventions (model, token counts, time in queue, to first token, prefill, decode, e2e).
//! A client's W3C `traceparent` header makes the span a child of the caller's trace.

use glassbox_protocol::RequestTimings;
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer, TracerProvider};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use std::time::{Duration, SystemTime};

pub struct Otlp {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

/// What one finished request's span says.
pub struct RequestSpan<'a> {
    pub request_id: &'a str,
    pub traceparent: Option<&'a str>,
    pub model: &'a str,
    pub start: SystemTime,
    pub end: SystemTime,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub n: usize,
    pub ttft: Option<f64>,
    pub finish: &'a str,
    /// The engine's account, one per prompt.
    pub engine: &'a [RequestTimings],
}

impl Otlp {
    /// Export to `endpoint` (`http://host:4318`, or the full `.../v1/traces` URL).
    pub fn new(endpoint: &str, service: &str) -> anyhow::Result<Self> {
        let url = match endpoint.trim_end_matches('/').split_once("://") {
            Some((_, rest)) if !rest.contains('/') => format!("{}/v1/traces", endpoint.trim_end_matches('/')),
            Some(_) => endpoint.to_string(),
            None => anyhow::bail!("--otlp-traces-endpoint must be an http(s) URL like http://localhost:4318, not `{endpoint}`"),
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpJson)
            .with_endpoint(url)
            .with_timeout(Duration::from_secs(5))
            .build()?;
        let batch = BatchConfigBuilder::default().with_scheduled_delay(Duration::from_millis(500)).build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(BatchSpanProcessor::builder(exporter).with_batch_config(batch).build())
            .with_resource(Resource::builder().with_service_name(service.to_string()).build())
            .build();
        let tracer = provider.tracer("glassbox");
        Ok(Otlp { provider, tracer })
    }

    pub fn request(&self, r: &RequestSpan) {
        let sum = |f: fn(&RequestTimings) -> f64| r.engine.iter().map(f).fold(0.0, f64::max);
        let mut attrs = vec![
            KeyValue::new("gen_ai.request.id", r.request_id.to_string()),
            KeyValue::new("gen_ai.response.model", r.model.to_string()),
            KeyValue::new("gen_ai.request.max_tokens", r.max_tokens as i64),
            KeyValue::new("gen_ai.request.temperature", r.temperature as f64),
            KeyValue::new("gen_ai.request.top_p", r.top_p as f64),
            KeyValue::new("gen_ai.request.n", r.n as i64),
            KeyValue::new("gen_ai.usage.prompt_tokens", r.prompt_tokens as i64),
            KeyValue::new("gen_ai.usage.completion_tokens", r.completion_tokens as i64),
            KeyValue::new("gen_ai.usage.num_sequences", r.engine.len().max(1) as i64),
            KeyValue::new("gen_ai.response.finish_reasons", r.finish.to_string()),
            KeyValue::new("gen_ai.latency.e2e", r.end.duration_since(r.start).unwrap_or_default().as_secs_f64()),
            KeyValue::new("gen_ai.latency.time_in_queue", sum(|t| t.queued)),
            KeyValue::new("gen_ai.latency.time_in_model_prefill", sum(|t| t.prefill)),
            KeyValue::new("gen_ai.latency.time_in_model_decode", sum(|t| t.decode)),
            KeyValue::new("gen_ai.latency.time_in_model_inference", sum(|t| t.prefill + t.decode)),
        ];
        if let Some(t) = r.ttft {
            attrs.push(KeyValue::new("gen_ai.latency.time_to_first_token", t));
        }
        let builder = self.tracer.span_builder("llm_request").with_kind(SpanKind::Server).with_start_time(r.start).with_attributes(attrs);
        let parent = r.traceparent.and_then(parse_traceparent).map(|sc| Context::new().with_remote_span_context(sc)).unwrap_or_default();
        let mut span = builder.start_with_context(&self.tracer, &parent);
        opentelemetry::trace::Span::end_with_timestamp(&mut span, r.end);
    }

    /// Export what is still buffered (at server exit).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!("OTLP export at shutdown failed: {e}");
        }
    }
}

/// A W3C `traceparent` (`00-<trace id>-<span id>-<flags>`), if well formed.
fn parse_traceparent(v: &str) -> Option<SpanContext> {
    let parts: Vec<&str> = v.trim().split('-').collect();
    let [version, trace, span, flags] = parts[..] else { return None };
    if version.len() != 2 || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let (trace, span) = (TraceId::from_hex(trace).ok()?, SpanId::from_hex(span).ok()?);
    if trace == TraceId::INVALID || span == SpanId::INVALID {
        return None;
    }
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?);
    Some(SpanContext::new(trace, span, flags, true, TraceState::default()))
}

#[cfg(test)]
mod tests {
    use super::parse_traceparent;

    #[test]
    fn traceparent() {
        let sc = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").expect("valid");
        assert_eq!(format!("{:032x}", sc.trace_id()), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(sc.is_sampled() && sc.is_remote());
        for bad in ["", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", "00-00000000000000000000000000000000-00f067aa0ba902b7-01", "00-xyz-00f067aa0ba902b7-01"] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }
}
