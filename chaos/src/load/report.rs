//! The results of a load run: JSON and a printed table.

use std::collections::BTreeMap;

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{CellAlignment, ContentArrangement, Table};
use serde::Serialize;

use super::stats::LatencySummary;

/// Resident memory of one server process at the three sampling points, in KiB.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ProcessRss {
    pub pid: u32,
    pub before_kb: Option<u64>,
    pub after_setup_kb: Option<u64>,
    pub end_kb: Option<u64>,
}

/// Everything a load run measured. Latencies and rates cover the measurement window only
/// (warm-up excluded), as do `errors`, `timeouts`, `retries`, `failed_sends`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    pub run_id: String,
    pub urls: Vec<String>,
    /// `closed` (closed-loop senders), `open` (fixed rate) or `idle`.
    pub mode: String,
    pub started_at_unix_ms: u64,
    /// Length of the measurement window actually run, in seconds.
    pub duration_s: f64,
    pub warmup_s: f64,
    pub setup_s: f64,
    pub connections_requested: usize,
    /// Connections that completed `hello`.
    pub connections: usize,
    pub connect_errors: BTreeMap<String, u64>,
    pub first_connect_error: Option<String>,
    /// Connections that ended before the run was over.
    pub connections_lost: usize,
    pub groups: usize,
    pub groups_opened: usize,
    pub group_errors: BTreeMap<String, u64>,
    pub members: usize,
    pub senders: usize,
    pub inflight: usize,
    pub rate: Option<f64>,
    pub body_bytes: usize,
    pub require_receipt: bool,
    pub acked: u64,
    pub acked_per_s: f64,
    pub ack_latency_ms: LatencySummary,
    pub push_latency_ms: LatencySummary,
    /// Open loop: how late sends left after they were due, the generator's share of the ack
    /// latency (empty in a closed loop).
    pub send_lateness_ms: LatencySummary,
    pub deliveries: u64,
    pub deliveries_per_s: f64,
    /// `msg` events whose body carried no send time (not sent by this run).
    pub unparsed_deliveries: u64,
    pub errors: BTreeMap<String, u64>,
    pub timeouts: u64,
    pub retries: u64,
    pub failed_sends: u64,
    pub skipped_sends: u64,
    pub malformed_frames: u64,
    pub events_dropped: u64,
    pub server_rss: Vec<ProcessRss>,
    /// (after setup - before) summed over the server processes, divided by `connections`.
    pub rss_per_connection_kb: Option<f64>,
}

fn ms(v: f64) -> String {
    format!("{v:.3}")
}

fn latency_line(s: &LatencySummary, with_max: bool) -> String {
    if s.count == 0 {
        return "-".into();
    }
    let mut line = format!("{} / {} / {}", ms(s.p50_ms), ms(s.p99_ms), ms(s.p999_ms));
    if with_max {
        line.push_str(&format!(" / {}", ms(s.max_ms)));
    }
    line
}

fn counts(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "0".into();
    }
    map.iter().map(|(code, n)| format!("{code}: {n}")).collect::<Vec<_>>().join(", ")
}

fn kb(v: Option<u64>) -> String {
    v.map(|v| format!("{v} KB")).unwrap_or_else(|| "?".into())
}

impl LoadReport {
    /// Writes the report to `path` as pretty-printed JSON.
    pub fn write_json(&self, path: &std::path::Path) -> Result<(), String> {
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// The summary table printed at the end of a run.
    pub fn table(&self) -> Table {
        let mut rows: Vec<(String, String)> = vec![
            ("run id".into(), self.run_id.clone()),
            ("mode".into(), self.mode.clone()),
            (
                "duration".into(),
                format!("{:.1} s (+ {:.1} s warm-up, {:.1} s setup)", self.duration_s, self.warmup_s, self.setup_s),
            ),
            (
                "connections".into(),
                format!(
                    "{} of {} ({} lost during the run)",
                    self.connections, self.connections_requested, self.connections_lost
                ),
            ),
        ];
        if !self.connect_errors.is_empty() {
            rows.push(("connect errors".into(), counts(&self.connect_errors)));
        }
        if self.mode != "idle" {
            rows.push((
                "groups x members".into(),
                format!("{} x {} ({} opened)", self.groups, self.members, self.groups_opened),
            ));
            if !self.group_errors.is_empty() {
                rows.push(("group setup errors".into(), counts(&self.group_errors)));
            }
            let load = match self.rate {
                Some(rate) => format!("{} (open loop, {rate} msgs/s in total)", self.senders),
                None => format!("{} (closed loop, {} in flight each)", self.senders, self.inflight),
            };
            rows.push(("senders".into(), load));
            rows.push(("body".into(), format!("{} bytes, require_receipt={}", self.body_bytes, self.require_receipt)));
            rows.push(("acked messages".into(), self.acked.to_string()));
            rows.push(("acked msgs/s".into(), format!("{:.1}", self.acked_per_s)));
            rows.push(("ack ms p50 / p99 / p99.9 / max".into(), latency_line(&self.ack_latency_ms, true)));
            rows.push(("push ms p50 / p99 / p99.9".into(), latency_line(&self.push_latency_ms, false)));
            if self.rate.is_some() {
                rows.push(("sends late ms p50 / p99 / p99.9 / max".into(), latency_line(&self.send_lateness_ms, true)));
            }
            rows.push(("deliveries".into(), self.deliveries.to_string()));
            rows.push(("deliveries/s".into(), format!("{:.1}", self.deliveries_per_s)));
            rows.push(("errors".into(), counts(&self.errors)));
            rows.push(("timeouts".into(), self.timeouts.to_string()));
            rows.push(("retries".into(), self.retries.to_string()));
            if self.failed_sends > 0 {
                rows.push(("failed sends".into(), self.failed_sends.to_string()));
            }
            if self.skipped_sends > 0 {
                rows.push(("skipped sends (backlog)".into(), self.skipped_sends.to_string()));
            }
        }
        if self.malformed_frames > 0 || self.events_dropped > 0 || self.unparsed_deliveries > 0 {
            rows.push((
                "malformed frames / dropped events / foreign msgs".into(),
                format!("{} / {} / {}", self.malformed_frames, self.events_dropped, self.unparsed_deliveries),
            ));
        }
        for p in &self.server_rss {
            rows.push((
                format!("server {} RSS before / after setup / end", p.pid),
                format!("{} / {} / {}", kb(p.before_kb), kb(p.after_setup_kb), kb(p.end_kb)),
            ));
        }
        if !self.server_rss.is_empty() {
            let per = self.rss_per_connection_kb.map(|v| format!("{v:.2} KB")).unwrap_or_else(|| "?".into());
            rows.push(("server RSS per connection".into(), per));
        }

        let mut table = Table::new();
        table.load_style(UTF8_FULL_CONDENSED).set_content_arrangement(ContentArrangement::Disabled);
        table.set_header(vec!["metric", "value"]);
        for (k, v) in rows {
            table.add_row(vec![k, v]);
        }
        if let Some(col) = table.column_mut(1) {
            col.set_cell_alignment(CellAlignment::Left);
        }
        table
    }
}

/// Server RSS growth per connection: (after setup - before) summed over processes, in KiB, divided
/// by `connections`. `None` if a sample is missing or nothing connected.
pub fn rss_per_connection_kb(rss: &[ProcessRss], connections: usize) -> Option<f64> {
    if rss.is_empty() || connections == 0 {
        return None;
    }
    let mut growth = 0i128;
    for p in rss {
        growth += i128::from(p.after_setup_kb?) - i128::from(p.before_kb?);
    }
    Some(growth as f64 / connections as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_growth_per_connection() {
        let rss = vec![
            ProcessRss { pid: 1, before_kb: Some(10_000), after_setup_kb: Some(30_000), end_kb: Some(31_000) },
            ProcessRss { pid: 2, before_kb: Some(10_000), after_setup_kb: Some(20_000), end_kb: None },
        ];
        assert_eq!(rss_per_connection_kb(&rss, 1000), Some(30.0));
        assert_eq!(rss_per_connection_kb(&rss, 0), None);
        assert_eq!(rss_per_connection_kb(&[], 10), None);
        let shrunk = vec![ProcessRss { pid: 1, before_kb: Some(100), after_setup_kb: Some(50), end_kb: None }];
        assert_eq!(rss_per_connection_kb(&shrunk, 10), Some(-5.0));
        let missing = vec![ProcessRss { pid: 1, before_kb: None, after_setup_kb: Some(50), end_kb: None }];
        assert_eq!(rss_per_connection_kb(&missing, 10), None);
    }

    #[test]
    fn table_and_json_carry_the_numbers() {
        let report = LoadReport {
            run_id: "r1".into(),
            mode: "closed".into(),
            connections: 10,
            connections_requested: 10,
            acked: 1234,
            acked_per_s: 41.13,
            ack_latency_ms: LatencySummary {
                count: 1234,
                mean_ms: 1.0,
                p50_ms: 0.9,
                p99_ms: 3.5,
                p999_ms: 7.25,
                max_ms: 9.0,
            },
            errors: BTreeMap::from([("unavailable".to_string(), 3)]),
            server_rss: vec![ProcessRss { pid: 7, before_kb: Some(1), after_setup_kb: Some(11), end_kb: Some(12) }],
            rss_per_connection_kb: Some(1.0),
            ..Default::default()
        };
        let text = report.table().to_string();
        assert!(text.contains("0.900 / 3.500 / 7.250 / 9.000"), "{text}");
        assert!(text.contains("unavailable: 3"), "{text}");
        assert!(text.contains("41.1"), "{text}");
        assert!(text.contains("1.00 KB"), "{text}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["acked"], 1234);
        assert_eq!(json["ack_latency_ms"]["p99_ms"], 3.5);
        assert_eq!(json["errors"]["unavailable"], 3);
        assert_eq!(json["server_rss"][0]["end_kb"], 12);
    }
}
