//! A real OTLP receiver for trace tests: `rotel-agent` (PyPI package `rotel`), listening for
//! gRPC and HTTP/protobuf and printing every span it receives, which [`OtlpReceiver::spans`]
//! reads back.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::node::Ports;

/// One span as the receiver got it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_id: String,
    pub name: String,
    /// The resource's `service.name` and `service.instance.id`.
    pub service: String,
    pub instance: String,
}

pub struct OtlpReceiver {
    child: Child,
    output: PathBuf,
    pub grpc_endpoint: String,
    pub http_endpoint: String,
    _dir: TempDir,
}

/// Where `rotel-agent` is: `$ROTEL_AGENT`, else inside the installed `rotel` Python package.
fn rotel_agent() -> PathBuf {
    if let Some(path) = std::env::var_os("ROTEL_AGENT") {
        return PathBuf::from(path);
    }
    let found = Command::new("python3")
        .args(["-c", "import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), 'rotel-agent'))"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    match found {
        Some(path) if path.exists() => path,
        _ => panic!("rotel-agent not found: `python3 -m pip install rotel` (scripts/test does) or set ROTEL_AGENT"),
    }
}

impl OtlpReceiver {
    /// Starts the receiver on free ports and waits until both listen.
    pub async fn start() -> OtlpReceiver {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let output = dir.path().join("spans.txt");
        let ports = Ports::free();
        let (grpc, http) = (format!("127.0.0.1:{}", ports.client), format!("127.0.0.1:{}", ports.admin));
        let child = Command::new(rotel_agent())
            .args(["start", "--otlp-grpc-endpoint", &grpc, "--otlp-http-endpoint", &http])
            .args(["--exporter", "blackhole", "--debug-log", "traces", "--debug-log-verbosity", "detailed"])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(File::create(&output).expect("creating the span file"))
            .stderr(File::create(dir.path().join("rotel.err")).expect("creating the log file"))
            .spawn()
            .expect("running rotel-agent");
        let receiver = OtlpReceiver {
            child,
            output,
            grpc_endpoint: format!("http://{grpc}"),
            http_endpoint: format!("http://{http}"),
            _dir: dir,
        };
        let listening = crate::wait_until(Duration::from_secs(20), || async {
            tokio::net::TcpStream::connect(&grpc).await.is_ok() && tokio::net::TcpStream::connect(&http).await.is_ok()
        })
        .await;
        assert!(listening, "rotel-agent did not listen on {grpc} and {http}");
        receiver
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        parse(&std::fs::read_to_string(&self.output).unwrap_or_default())
    }

    /// The spans of `trace_id` received so far.
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans().into_iter().filter(|s| s.trace_id == trace_id).collect()
    }

    pub fn output(&self) -> &Path {
        &self.output
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads rotel's detailed debug output: resource blocks (`Resource attributes:` then
/// `-> key: Str(value)` lines) followed by `Span #n` blocks of `Field : value` lines.
fn parse(text: &str) -> Vec<ReceivedSpan> {
    let mut spans = Vec::new();
    let (mut service, mut instance) = (String::new(), String::new());
    let mut in_resource = false;
    let mut current: Option<ReceivedSpan> = None;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("ResourceSpans #") {
            spans.extend(current.take());
            (service, instance) = (String::new(), String::new());
        } else if trimmed == "Resource attributes:" {
            in_resource = true;
        } else if trimmed.starts_with("ScopeSpans #") {
            in_resource = false;
        } else if let Some(attr) = trimmed.strip_prefix("-> ").filter(|_| in_resource) {
            let value =
                |key: &str| attr.strip_prefix(key)?.strip_prefix(": Str(")?.strip_suffix(')').map(str::to_string);
            if let Some(v) = value("service.name") {
                service = v;
            } else if let Some(v) = value("service.instance.id") {
                instance = v;
            }
        } else if trimmed.starts_with("Span #") {
            spans.extend(current.take());
            current = Some(ReceivedSpan {
                trace_id: String::new(),
                span_id: String::new(),
                parent_id: String::new(),
                name: String::new(),
                service: service.clone(),
                instance: instance.clone(),
            });
        } else if let (Some(span), Some((field, value))) = (current.as_mut(), trimmed.split_once(':')) {
            let value = value.trim().to_string();
            match field.trim() {
                "Trace ID" => span.trace_id = value,
                "Parent ID" => span.parent_id = value,
                "ID" => span.span_id = value,
                "Name" => span.name = value,
                _ => {}
            }
        }
    }
    spans.extend(current);
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rotels_debug_output() {
        let text = "ResourceSpans #0\nResource SchemaURL: \nResource attributes:\n     -> service.instance.id: Str(n2)\n     -> service.name: Str(convoy)\nScopeSpans #0\nScopeSpans SchemaURL: \nInstrumentationScope convoy \nSpan #0\n    Trace ID       : b22d\n    Parent ID      : 25ee\n    ID             : 8a83\n    Name           : apply\n    Kind           : SPAN_KIND_INTERNAL\nStart time: 1795340960330901645\nAttributes:\n     -> service.instance.id: Str(not-a-resource)\nSpan #1\n    Trace ID       : b22d\n    Parent ID      : \n    ID             : 25ee\n    Name           : request\n";
        let spans = parse(text);
        assert_eq!(spans.len(), 2);
        assert_eq!(
            spans[0],
            ReceivedSpan {
                trace_id: "b22d".into(),
                span_id: "8a83".into(),
                parent_id: "25ee".into(),
                name: "apply".into(),
                service: "convoy".into(),
                instance: "n2".into(),
            }
        );
        assert_eq!(
            (spans[1].parent_id.as_str(), spans[1].name.as_str(), spans[1].instance.as_str()),
            ("", "request", "n2")
        );
    }
}
