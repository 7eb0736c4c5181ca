//! Counters and latency histograms of a load run, and the summary math over them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Value, json};

/// Connecting, hello, group setup: nothing is recorded.
pub const PHASE_SETUP: u8 = 0;
/// Load runs; latencies feed the live line only, counters are not reported.
pub const PHASE_WARMUP: u8 = 1;
/// The measurement window: everything is recorded.
pub const PHASE_MEASURE: u8 = 2;
/// The run is over: nothing is recorded.
pub const PHASE_DONE: u8 = 3;

/// Highest latency a histogram tracks, in microseconds (one hour); larger values saturate.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// A latency histogram with microsecond resolution and three significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant histogram bounds are valid")
}

/// Records `latency` in microseconds, saturating at the histogram's maximum.
pub fn record_latency(hist: &mut Histogram<u64>, latency: Duration) {
    let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    hist.saturating_record(micros);
}

/// Percentiles of a latency histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl LatencySummary {
    /// Summarizes a histogram of microsecond values.
    pub fn from_histogram(hist: &Histogram<u64>) -> Self {
        if hist.is_empty() {
            return LatencySummary::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        LatencySummary {
            count: hist.len(),
            mean_ms: hist.mean() / 1000.0,
            p50_ms: ms(hist.value_at_quantile(0.50)),
            p99_ms: ms(hist.value_at_quantile(0.99)),
            p999_ms: ms(hist.value_at_quantile(0.999)),
            max_ms: ms(hist.max()),
        }
    }
}

/// `count` events over `elapsed`, per second (0 for an empty window).
pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 { count as f64 / secs } else { 0.0 }
}

/// Nanoseconds since the Unix epoch (0 before it).
pub fn unix_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)).unwrap_or(0)
}

/// The body of a load message: `{"type":"text","text":"<send-time-unix-nanos> xxxx..."}` with the
/// text padded to `body_bytes` (never shorter than the timestamp).
pub fn make_body(sent_unix_nanos: u64, body_bytes: usize) -> Value {
    let mut text = sent_unix_nanos.to_string();
    if body_bytes > text.len() {
        text.push(' ');
        let pad = body_bytes.saturating_sub(text.len());
        text.extend(std::iter::repeat_n('x', pad));
    }
    json!({ "type": "text", "text": text })
}

/// The send time carried by a `msg` event of a load message, if it is one.
pub fn sent_nanos(event: &Value) -> Option<u64> {
    let text = event.get("body")?.get("text")?.as_str()?;
    text.split(' ').next()?.parse().ok()
}

/// Push latency of a `msg` event received at `now_unix_nanos`, if it carries a send time.
pub fn push_latency(event: &Value, now_unix_nanos: u64) -> Option<Duration> {
    sent_nanos(event).map(|sent| Duration::from_nanos(now_unix_nanos.saturating_sub(sent)))
}

/// Shared counters of a run. Cheap to update from many tasks.
pub struct Stats {
    phase: AtomicU8,
    // Every phase, for the live line.
    live_acked: AtomicU64,
    live_deliveries: AtomicU64,
    live_errors: AtomicU64,
    // Measurement window only.
    acked: AtomicU64,
    deliveries: AtomicU64,
    unparsed_deliveries: AtomicU64,
    timeouts: AtomicU64,
    retries: AtomicU64,
    failed_sends: AtomicU64,
    skipped_sends: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    // Warm-up and measurement window; reset when measurement starts.
    ack_hist: Mutex<Histogram<u64>>,
    push_hist: Mutex<Histogram<u64>>,
    // Open loop: how late each send left after it was due (the generator's own delay).
    late_hist: Mutex<Histogram<u64>>,
    // Acks since the live line last looked, so a stall shows in the second it happened.
    recent_ack_hist: Mutex<Histogram<u64>>,
}

/// Counter values at one moment, for the live line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LiveCounters {
    pub acked: u64,
    pub deliveries: u64,
    pub errors: u64,
}

/// The recorded results of the measurement window.
#[derive(Debug, Clone, Default)]
pub struct Totals {
    pub acked: u64,
    pub deliveries: u64,
    pub unparsed_deliveries: u64,
    pub timeouts: u64,
    pub retries: u64,
    pub failed_sends: u64,
    pub skipped_sends: u64,
    pub errors: BTreeMap<String, u64>,
    pub ack_latency: LatencySummary,
    pub push_latency: LatencySummary,
    pub send_lateness: LatencySummary,
}

/// The p99 of a histogram of microsecond values, in ms; `None` when it is empty.
fn p99_ms(hist: &Histogram<u64>) -> Option<f64> {
    (!hist.is_empty()).then(|| hist.value_at_quantile(0.99) as f64 / 1000.0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    pub fn new() -> Self {
        Stats {
            phase: AtomicU8::new(PHASE_SETUP),
            live_acked: AtomicU64::new(0),
            live_deliveries: AtomicU64::new(0),
            live_errors: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            unparsed_deliveries: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            failed_sends: AtomicU64::new(0),
            skipped_sends: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            ack_hist: Mutex::new(latency_histogram()),
            push_hist: Mutex::new(latency_histogram()),
            late_hist: Mutex::new(latency_histogram()),
            recent_ack_hist: Mutex::new(latency_histogram()),
        }
    }

    pub fn phase(&self) -> u8 {
        self.phase.load(Ordering::Relaxed)
    }

    /// Moves to `phase`; entering the measurement window clears the warm-up latencies.
    /// The histogram locks are held while the phase changes, so a sample is recorded
    /// either wholly in the window (histogram and counter) or not at all.
    pub fn set_phase(&self, phase: u8) {
        let mut acks = lock(&self.ack_hist);
        let mut pushes = lock(&self.push_hist);
        let mut late = lock(&self.late_hist);
        if phase == PHASE_MEASURE {
            acks.reset();
            pushes.reset();
            late.reset();
        }
        self.phase.store(phase, Ordering::SeqCst);
    }

    fn measuring(&self) -> bool {
        self.phase() == PHASE_MEASURE
    }

    fn running(&self) -> bool {
        matches!(self.phase(), PHASE_WARMUP | PHASE_MEASURE)
    }

    /// A send was acknowledged `latency` after it was (meant to be) issued.
    pub fn record_ack(&self, latency: Duration) {
        // The phase is read under the lock `set_phase` holds while it moves, so in the
        // measurement window the count and the histogram agree exactly.
        let mut hist = lock(&self.ack_hist);
        if !self.running() {
            return;
        }
        self.live_acked.fetch_add(1, Ordering::Relaxed);
        record_latency(&mut hist, latency);
        record_latency(&mut lock(&self.recent_ack_hist), latency);
        if self.measuring() {
            self.acked.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A `msg` event arrived; `latency` is `None` when it carried no send time.
    pub fn record_delivery(&self, latency: Option<Duration>) {
        let mut hist = lock(&self.push_hist);
        if !self.running() {
            return;
        }
        self.live_deliveries.fetch_add(1, Ordering::Relaxed);
        if let Some(latency) = latency {
            record_latency(&mut hist, latency);
        }
        if self.measuring() {
            self.deliveries.fetch_add(1, Ordering::Relaxed);
            if latency.is_none() {
                self.unparsed_deliveries.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// An open-loop send left `late` after it was due: time the load generator itself added
    /// to its ack latency (a generator short of CPU shows here, not as a slow server).
    pub fn record_send_lateness(&self, late: Duration) {
        let mut hist = lock(&self.late_hist);
        if self.measuring() {
            record_latency(&mut hist, late);
        }
    }

    /// A request failed with error `code` (a timeout is counted by [`Stats::record_timeout`]).
    pub fn record_error(&self, code: &str) {
        if !self.running() {
            return;
        }
        self.live_errors.fetch_add(1, Ordering::Relaxed);
        if self.measuring() {
            *lock(&self.errors).entry(code.to_string()).or_insert(0) += 1;
        }
    }

    pub fn record_timeout(&self) {
        if !self.running() {
            return;
        }
        self.live_errors.fetch_add(1, Ordering::Relaxed);
        if self.measuring() {
            self.timeouts.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn bump(&self, counter: &AtomicU64) {
        if self.measuring() {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A send is retried with the same `client_msg_id`.
    pub fn record_retry(&self) {
        self.bump(&self.retries);
    }

    /// A send was given up after a non-retryable error.
    pub fn record_failed_send(&self) {
        self.bump(&self.failed_sends);
    }

    /// An open-loop send was not issued because too many were already outstanding.
    pub fn record_skipped_send(&self) {
        self.bump(&self.skipped_sends);
    }

    pub fn live(&self) -> LiveCounters {
        LiveCounters {
            acked: self.live_acked.load(Ordering::Relaxed),
            deliveries: self.live_deliveries.load(Ordering::Relaxed),
            errors: self.live_errors.load(Ordering::Relaxed),
        }
    }

    /// p99 ack latency so far (warm-up or measurement window), in ms.
    pub fn live_ack_p99_ms(&self) -> Option<f64> {
        p99_ms(&lock(&self.ack_hist))
    }

    /// p99 ack latency of the acks since the last call, in ms; starts the next interval.
    pub fn take_recent_ack_p99_ms(&self) -> Option<f64> {
        let mut hist = lock(&self.recent_ack_hist);
        let p99 = p99_ms(&hist);
        hist.reset();
        p99
    }

    pub fn totals(&self) -> Totals {
        Totals {
            acked: self.acked.load(Ordering::Relaxed),
            deliveries: self.deliveries.load(Ordering::Relaxed),
            unparsed_deliveries: self.unparsed_deliveries.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            failed_sends: self.failed_sends.load(Ordering::Relaxed),
            skipped_sends: self.skipped_sends.load(Ordering::Relaxed),
            errors: lock(&self.errors).clone(),
            ack_latency: LatencySummary::from_histogram(&lock(&self.ack_hist)),
            push_latency: LatencySummary::from_histogram(&lock(&self.push_hist)),
            send_lateness: LatencySummary::from_histogram(&lock(&self.late_hist)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        // Three significant digits.
        (a - b).abs() <= b.abs() * 1e-3 + 1e-9
    }

    #[test]
    fn summary_of_uniform_latencies() {
        let mut hist = latency_histogram();
        for ms in 1..=1000u64 {
            record_latency(&mut hist, Duration::from_millis(ms));
        }
        let s = LatencySummary::from_histogram(&hist);
        assert_eq!(s.count, 1000);
        assert!(close(s.p50_ms, 500.0), "{s:?}");
        assert!(close(s.p99_ms, 990.0), "{s:?}");
        assert!(close(s.p999_ms, 999.0), "{s:?}");
        assert!(close(s.max_ms, 1000.0), "{s:?}");
        assert!(close(s.mean_ms, 500.5), "{s:?}");
    }

    #[test]
    fn summary_keeps_microsecond_resolution() {
        let mut hist = latency_histogram();
        for us in [150u64, 250, 350] {
            record_latency(&mut hist, Duration::from_micros(us));
        }
        let s = LatencySummary::from_histogram(&hist);
        assert!(close(s.p50_ms, 0.25), "{s:?}");
        assert!(close(s.max_ms, 0.35), "{s:?}");
    }

    #[test]
    fn empty_and_extreme_histograms() {
        assert_eq!(LatencySummary::from_histogram(&latency_histogram()), LatencySummary::default());
        let mut hist = latency_histogram();
        record_latency(&mut hist, Duration::ZERO);
        record_latency(&mut hist, Duration::from_secs(100_000));
        let s = LatencySummary::from_histogram(&hist);
        assert_eq!(s.count, 2);
        assert!(s.max_ms >= 3_600_000.0 * 0.999, "{s:?}");
    }

    #[test]
    fn rates() {
        assert_eq!(per_second(100, Duration::from_secs(4)), 25.0);
        assert_eq!(per_second(100, Duration::ZERO), 0.0);
        assert_eq!(per_second(3, Duration::from_millis(1500)), 2.0);
    }

    #[test]
    fn body_padding_and_send_time() {
        let body = make_body(1_795_000_000_123_456_789, 100);
        let text = body["text"].as_str().unwrap();
        assert_eq!(text.len(), 100);
        assert!(text.starts_with("1795000000123456789 x"));
        assert_eq!(body["type"], "text");

        let short = make_body(42, 1);
        assert_eq!(short["text"], "42");

        let event = json!({"ev":"msg","group":"g","seq":1,"body":body});
        assert_eq!(sent_nanos(&event), Some(1_795_000_000_123_456_789));
        assert_eq!(push_latency(&event, 1_795_000_000_124_456_789), Some(Duration::from_millis(1)));
        // A clock step backwards yields zero, not a panic.
        assert_eq!(push_latency(&event, 0), Some(Duration::ZERO));

        for bad in [
            json!({"ev":"msg"}),
            json!({"ev":"msg","body":{"type":"image","url":"u"}}),
            json!({"ev":"msg","body":{"type":"text","text":"hello there"}}),
            json!({"ev":"msg","body":{"type":"text","text":7}}),
            json!({"ev":"msg","body":"text"}),
        ] {
            assert_eq!(sent_nanos(&bad), None, "{bad}");
        }
    }

    #[test]
    fn only_the_measurement_window_is_reported() {
        let stats = Stats::new();
        stats.record_ack(Duration::from_millis(1));
        stats.record_error("unavailable");
        assert_eq!(stats.live(), LiveCounters::default());

        stats.set_phase(PHASE_WARMUP);
        stats.record_ack(Duration::from_millis(900));
        stats.record_delivery(Some(Duration::from_millis(900)));
        stats.record_error("unavailable");
        stats.record_timeout();
        assert_eq!(stats.live(), LiveCounters { acked: 1, deliveries: 1, errors: 2 });
        assert_eq!(stats.live_ack_p99_ms().map(|p| p.round()), Some(900.0));
        assert_eq!(stats.take_recent_ack_p99_ms().map(|p| p.round()), Some(900.0));
        assert_eq!(stats.take_recent_ack_p99_ms(), None, "each interval starts empty");

        stats.set_phase(PHASE_MEASURE);
        assert_eq!(stats.live_ack_p99_ms(), None);
        stats.record_ack(Duration::from_millis(2));
        stats.record_ack(Duration::from_millis(4));
        stats.record_send_lateness(Duration::from_millis(7));
        stats.record_delivery(Some(Duration::from_millis(3)));
        stats.record_delivery(None);
        stats.record_error("rate_limited");
        stats.record_error("rate_limited");
        stats.record_timeout();
        stats.record_retry();

        stats.set_phase(PHASE_DONE);
        stats.record_ack(Duration::from_millis(1));
        stats.record_error("closed");

        let t = stats.totals();
        assert_eq!(t.acked, 2);
        assert_eq!(t.deliveries, 2);
        assert_eq!(t.unparsed_deliveries, 1);
        assert_eq!(t.timeouts, 1);
        assert_eq!(t.retries, 1);
        assert_eq!(t.errors, BTreeMap::from([("rate_limited".to_string(), 2)]));
        assert_eq!(t.ack_latency.count, 2);
        assert!(close(t.ack_latency.max_ms, 4.0));
        assert_eq!(t.push_latency.count, 1);
        assert_eq!(t.send_lateness.count, 1);
        assert!(close(t.send_lateness.max_ms, 7.0));
        assert_eq!(stats.live(), LiveCounters { acked: 3, deliveries: 3, errors: 5 });
    }
}
