//! Traces: one trace per request across nodes, exported over OTLP.
//!
//! Spans of the request path are `tracing` spans with the target [`TARGET`], so a single
//! filter decides whether they exist at all: without an OTLP endpoint no layer wants them
//! and each costs one disabled-callsite check. Across nodes the trace travels as a W3C
//! `traceparent` in every envelope (ractor_cluster carries no context of its own), in each
//! Raft entry (so every replica's apply joins the trace) and, from clients, as an optional
//! `traceparent` request field.

use std::sync::atomic::{AtomicBool, Ordering};

use convoy_config::{OtlpProtocol, TelemetryConfig};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `tracing` target of every span that is part of a trace.
pub const TARGET: &str = "convoy::trace";

/// The spans that open a trace's part on a node and record its `trace_id` for log lines.
pub const CARRIES_TRACE_ID: &[&str] = &["request", "serve", "deliver", "apply", "fanout"];

/// Name of the tracer (the instrumentation scope) on every span.
const SCOPE: &str = "convoy";

/// Whether an exporter runs: when not, nothing reads or writes trace context.
static EXPORTING: AtomicBool = AtomicBool::new(false);

#[derive(Debug, thiserror::Error)]
pub enum TraceSetupError {
    #[error("building the OTLP exporter for {endpoint}: {source}")]
    Exporter { endpoint: String, source: opentelemetry_otlp::ExporterBuildError },
    #[error("the thread building the OTLP HTTP exporter failed")]
    BuilderThread,
}

/// The URL spans are posted to. OTLP/HTTP endpoints name the collector (as
/// `OTEL_EXPORTER_OTLP_ENDPOINT` does); the traces path is added unless already there.
fn http_traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") { base.to_string() } else { format!("{base}/v1/traces") }
}

/// Builds the tracer provider that batches spans to `endpoint`. Call inside the tokio
/// runtime (the gRPC exporter needs it).
pub fn provider(cfg: &TelemetryConfig, endpoint: &str, node: &str) -> Result<SdkTracerProvider, TraceSetupError> {
    let failed = |source| TraceSetupError::Exporter { endpoint: endpoint.to_string(), source };
    let exporter = match cfg.otlp_protocol {
        OtlpProtocol::Grpc => SpanExporter::builder().with_tonic().with_endpoint(endpoint).build().map_err(failed)?,
        OtlpProtocol::HttpProtobuf => {
            let url = http_traces_url(endpoint);
            // The HTTP exporter's blocking client may not be built on a runtime thread.
            std::thread::scope(|s| {
                s.spawn(|| {
                    SpanExporter::builder().with_http().with_protocol(Protocol::HttpBinary).with_endpoint(url).build()
                })
                .join()
            })
            .map_err(|_| TraceSetupError::BuilderThread)?
            .map_err(failed)?
        }
    };
    let resource = Resource::builder()
        .with_service_name(cfg.service_name.clone())
        .with_attribute(KeyValue::new("service.instance.id", node.to_string()))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(cfg.sampling_ratio))))
        .with_resource(resource)
        .build();
    EXPORTING.store(true, Ordering::SeqCst);
    Ok(provider)
}

/// The `tracing` layer that turns trace spans into OpenTelemetry spans.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer(SCOPE)).with_tracked_inactivity(false)
}

struct One<'a>(Option<&'a str>);

impl Extractor for One<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        if key == "traceparent" { self.0 } else { None }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

#[derive(Default)]
struct Captured(Option<String>);

impl Injector for Captured {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.0 = Some(value);
        }
    }
}

/// The `traceparent` of the current span, for a message that continues its trace
/// elsewhere. `None` when not tracing or outside any traced request.
pub fn traceparent() -> Option<String> {
    if !EXPORTING.load(Ordering::Relaxed) {
        return None;
    }
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut captured = Captured::default();
    TraceContextPropagator::new().inject_context(&cx, &mut captured);
    captured.0
}

/// Makes `span` a child of the remote span `traceparent` names (if any, and valid), and
/// records its trace id so logs inside it carry one. Call right after creating the span.
pub fn continue_from(span: &tracing::Span, traceparent: Option<&str>) {
    adopt(span, traceparent.map(remote_context));
}

/// The context a `traceparent` names (invalid if it names none).
fn remote_context(traceparent: &str) -> Context {
    TraceContextPropagator::new().extract_with_context(&Context::new(), &One(Some(traceparent)))
}

/// `continue_from` with the parent already read.
fn adopt(span: &tracing::Span, parent: Option<Context>) {
    if span.is_disabled() {
        return;
    }
    if let Some(cx) = parent.filter(|cx| cx.span().span_context().is_valid()) {
        // Fails only if the span already started; it was just created.
        let _ = span.set_parent(cx);
    }
    let trace_id = span.context().span().span_context().trace_id();
    span.record("trace_id", tracing::field::display(trace_id));
}

/// The span `make` creates, continuing the trace `traceparent` names; no span at all when
/// the message is outside any trace (Raft traffic, heartbeats), so none starts a trace, or
/// when that trace is not sampled, so none is built only to be dropped.
pub fn continued(traceparent: Option<&str>, make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    let Some(parent) = traceparent else { return tracing::Span::none() };
    let cx = remote_context(parent);
    if !cx.span().span_context().is_sampled() {
        return tracing::Span::none();
    }
    let span = make();
    adopt(&span, Some(cx));
    span
}

/// `span` (a request's root, already given its parent) if its trace is exported, else no
/// span: then nothing the request does builds a span (`child` sees none) or sends a
/// `traceparent`, so sparse sampling costs little more than none. Logs inside an unsampled
/// request carry no trace id, as with tracing off.
pub fn if_sampled(span: tracing::Span) -> tracing::Span {
    if span.is_disabled() || span.context().span().span_context().is_sampled() { span } else { tracing::Span::none() }
}

/// The span `make` creates, only inside a traced request: work done for no request (a
/// timer's push, a presence update) would otherwise start a one-span trace of its own.
pub fn child(make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if tracing::Span::current().is_none() { tracing::Span::none() } else { make() }
}

/// A `traceparent` a client sent: well formed (version 00) or refused.
pub fn valid_traceparent(text: &str) -> bool {
    remote_context(text).span().span_context().is_valid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_endpoints_get_the_traces_path_once() {
        assert_eq!(http_traces_url("http://jaeger:4318"), "http://jaeger:4318/v1/traces");
        assert_eq!(http_traces_url("http://jaeger:4318/"), "http://jaeger:4318/v1/traces");
        assert_eq!(http_traces_url("http://c:4318/v1/traces"), "http://c:4318/v1/traces");
    }

    #[test]
    fn traceparents_are_checked() {
        assert!(valid_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        for bad in ["", "00-zz-00f067aa0ba902b7-01", "00-00000000000000000000000000000000-00f067aa0ba902b7-01", "hello"]
        {
            assert!(!valid_traceparent(bad), "{bad}");
        }
    }

    #[test]
    fn nothing_is_injected_without_an_exporter() {
        assert_eq!(traceparent(), None);
    }
}
