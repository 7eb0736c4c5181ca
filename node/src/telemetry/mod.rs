//! Logs, traces and metrics. Logs go to stderr (stdout carries the ready line), as text or
//! JSON, each line naming the node; traces go to an OTLP collector when one is configured.

mod logs;
pub mod trace;

use std::io::IsTerminal;
use std::time::Duration;

use convoy_config::{LogFormat, TelemetryConfig};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// Flushes buffered spans on the way out.
#[must_use = "dropping the guard without `shutdown` may lose the last spans"]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is buffered and stops the exporter.
    pub async fn shutdown(self) {
        if let Some(provider) = self.tracer {
            // Blocks until the exporter is done: off the runtime's threads.
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }
}

/// Installs logging and, when `telemetry.otlp_endpoint` is set, trace export for the node
/// named `node`. `RUST_LOG`, when set, overrides the configured log level. Call inside the
/// tokio runtime.
pub fn init(cfg: &TelemetryConfig, node: &str) -> Result<Telemetry, trace::TraceSetupError> {
    let tracer = cfg.otlp_endpoint.as_deref().map(|endpoint| trace::provider(cfg, endpoint, node)).transpose()?;
    let mut env_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.log_level));
    if tracer.is_none() {
        // Nobody wants trace spans: switch their callsites off, so they cost nothing.
        env_filter = env_filter.add_directive(format!("{}=off", trace::TARGET).parse().expect("a valid directive"));
    }
    // Log lines need a request's trace id, which its first span on each node records; the
    // spans inside it would only cost formatting.
    // The hint keeps the global maximum level (and with it the `log` crate's) at what the
    // log filter wants: without it every disabled debug line of every dependency would be
    // evaluated at run time.
    let hint = Layer::<Registry>::max_level_hint(&env_filter);
    let only_carriers = tracing_subscriber::filter::filter_fn(|meta| {
        meta.target() != trace::TARGET || trace::CARRIES_TRACE_ID.contains(&meta.name())
    });
    let log_filter = env_filter.and(match hint {
        Some(level) => only_carriers.with_max_level_hint(level),
        None => only_carriers,
    });
    let log_layer = match cfg.log_format {
        LogFormat::Json => {
            let format = tracing_subscriber::fmt::format().json().flatten_event(true);
            tracing_subscriber::fmt::layer()
                .json()
                .event_format(logs::WithNode::json(node, format))
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .with_filter(log_filter)
                .boxed()
        }
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .event_format(logs::WithNode::text(node, tracing_subscriber::fmt::format()))
            .with_writer(std::io::stderr)
            // Colours only for a person at a terminal, never in files or collectors.
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .with_filter(log_filter)
            .boxed(),
    };
    let mut layers = vec![log_layer];
    if let Some(provider) = &tracer {
        let only_traces = tracing_subscriber::filter::Targets::new().with_target(trace::TARGET, tracing::Level::INFO);
        layers.push(trace::layer(provider).with_filter(only_traces).boxed());
    }
    // A vector, not an `Option` layer: an absent `Option` layer enables every callsite, so
    // every disabled span of every dependency would still be created.
    let _ = tracing_subscriber::registry().with(layers).try_init();
    Ok(Telemetry { tracer })
}

const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.035, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];
const COUNT_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// Installs the Prometheus recorder and keeps it tidy. Once per process.
pub fn init_metrics() -> Option<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .ok()?
        .set_buckets_for_metric(Matcher::Suffix("_ops".into()), COUNT_BUCKETS)
        .ok()?
        .set_buckets_for_metric(Matcher::Suffix("_entries".into()), COUNT_BUCKETS)
        .ok()?
        .set_buckets_for_metric(Matcher::Suffix("_jobs".into()), COUNT_BUCKETS)
        .ok()?
        .set_buckets_for_metric(Matcher::Suffix("_frames".into()), COUNT_BUCKETS)
        .ok()?
        .set_buckets_for_metric(Matcher::Suffix("_depth".into()), COUNT_BUCKETS)
        .ok()?
        .install_recorder()
        .ok()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
            if let Some(rss) = resident_bytes() {
                metrics::gauge!("convoy_process_resident_memory_bytes").set(rss as f64);
            }
        }
    });
    Some(handle)
}

/// This process's resident memory, from /proc.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
