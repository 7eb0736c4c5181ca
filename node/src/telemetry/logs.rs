//! Log lines that name the node they come from: with several nodes logging to one place,
//! every line starts with (text) or carries (JSON) the node's id.

use std::fmt;

use tracing::Subscriber;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Wraps a formatter so each event names `node`.
pub struct WithNode<F> {
    node: String,
    json: bool,
    inner: F,
}

impl<F> WithNode<F> {
    pub fn text(node: &str, inner: F) -> Self {
        WithNode { node: node.to_string(), json: false, inner }
    }

    pub fn json(node: &str, inner: F) -> Self {
        let quoted = serde_json::to_string(node).expect("a string always serializes");
        WithNode { node: quoted, json: true, inner }
    }
}

impl<S, N, F> FormatEvent<S, N> for WithNode<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        if !self.json {
            write!(writer, "[{}] ", self.node)?;
            return self.inner.format_event(ctx, writer, event);
        }
        // The JSON formatter writes one object per line: open it with the node's field.
        let mut line = String::new();
        self.inner.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(writer, "{{\"node\":{},{rest}", self.node),
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    #[test]
    fn json_lines_carry_the_node_and_stay_json() {
        let out = Buffer::default();
        let format = tracing_subscriber::fmt::format().json().flatten_event(true);
        let subscriber = tracing_subscriber::fmt()
            .json()
            .event_format(WithNode::json("n\"2", format))
            .with_writer(out.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", entity = "group:g-1");
            let _in = span.enter();
            tracing::warn!(error = "disk full", "write failed");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).expect(&text);
        assert_eq!(line["node"], "n\"2");
        assert_eq!(line["error"], "disk full");
        assert_eq!(line["span"]["entity"], "group:g-1");
    }

    #[test]
    fn text_lines_start_with_the_node() {
        let out = Buffer::default();
        let subscriber = tracing_subscriber::fmt()
            .event_format(WithNode::text("n1", tracing_subscriber::fmt::format().with_ansi(false)))
            .with_writer(out.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || tracing::info!("ready"));
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(text.starts_with("[n1] ") && text.contains("ready"), "{text}");
    }
}
