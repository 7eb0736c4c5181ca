//! The async runtime of every Raft group: tokio's, with the groups' ticks on one grid.
//!
//! Each Raft group runs a tick loop that checks its election and heartbeat timers about five
//! times per heartbeat interval, and openraft starts each loop at a random phase. A node hosts
//! a group per shard plus the metadata group, so an idle node woke that many times per tick
//! period, and waking a parked runtime costs far more than the tick's own work: it was most of
//! an idle cluster's CPU.
//!
//! Here `sleep_until` deadlines more than [`ALIGN_BEYOND`] away are moved to the next line of a
//! process-wide grid spaced by the tick period ([`set_spacing_for_heartbeat`]), so all the
//! groups' ticks fire in one wake. A timer fires at most one spacing late. Elections and
//! heartbeats are already rounded to ticks, so they are late by at most one more tick; Raft's
//! safety does not depend on timers, and a follower that starts an election later is only more
//! conservative. Short sleeps (openraft batches I/O completions with a microsecond sleep) and
//! every timeout are tokio's own, untouched.

use std::future::Future;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use openraft::{AsyncRuntime, Instant as _, OptionalSend, TokioInstant, TokioRuntime};

/// Deadlines nearer than this are not moved: they are batching, not periodic timers.
pub const ALIGN_BEYOND: Duration = Duration::from_millis(1);

/// Grid spacing in microseconds; 0 until set, which leaves every deadline as it is.
static SPACING_MICROS: AtomicU64 = AtomicU64::new(0);
/// Where the grid's lines start: the first aligned sleep of the process.
static ORIGIN: OnceLock<tokio::time::Instant> = OnceLock::new();

/// Sets the grid to openraft's tick period for `heartbeat`. Any spacing is correct; the tick
/// period is the one that puts every group's tick on the same line.
pub fn set_spacing_for_heartbeat(heartbeat: Duration) {
    // openraft ticks every 13/64 of the heartbeat interval in whole milliseconds
    // (`Config::tick_interval`); a grid of any other spacing would drift against the ticks.
    let tick_ms = (heartbeat.as_millis() as u64 * 13 / 64).max(1);
    SPACING_MICROS.store(tick_ms * 1000, Ordering::Relaxed);
}

/// The grid line at or after `deadline`, for a deadline `after` from now.
fn aligned(after: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    let deadline = now + after;
    let spacing = SPACING_MICROS.load(Ordering::Relaxed);
    if spacing == 0 || after <= ALIGN_BEYOND {
        return deadline;
    }
    let origin = *ORIGIN.get_or_init(|| now);
    // In nanoseconds: rounding the time since the origin down to whole microseconds first
    // could put the line a fraction of a microsecond before the deadline.
    let spacing_nanos = u128::from(spacing) * 1000;
    let since = deadline.saturating_duration_since(origin).as_nanos();
    let line = u64::try_from(since.div_ceil(spacing_nanos) * spacing_nanos).unwrap_or(u64::MAX);
    let aligned = origin + Duration::from_nanos(line);
    debug_assert!(aligned >= deadline && aligned - deadline < Duration::from_micros(spacing));
    aligned
}

/// tokio, with `sleep_until` on the grid.
#[derive(Debug)]
pub struct GridRuntime(TokioRuntime);

impl AsyncRuntime for GridRuntime {
    type JoinError = <TokioRuntime as AsyncRuntime>::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = <TokioRuntime as AsyncRuntime>::JoinHandle<T>;
    type Sleep = tokio::time::Sleep;
    type Instant = TokioInstant;
    type TimeoutError = <TokioRuntime as AsyncRuntime>::TimeoutError;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = <TokioRuntime as AsyncRuntime>::Timeout<R, T>;
    type ThreadLocalRng = <TokioRuntime as AsyncRuntime>::ThreadLocalRng;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        TokioRuntime::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        TokioRuntime::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        // `TokioInstant` keeps its tokio instant private: go through the time left.
        tokio::time::sleep_until(aligned(deadline - TokioInstant::now()))
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(duration: Duration, future: F) -> Self::Timeout<R, F> {
        TokioRuntime::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(deadline: Self::Instant, future: F) -> Self::Timeout<R, F> {
        TokioRuntime::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        TokioRuntime::is_panic(join_error)
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        TokioRuntime::thread_rng()
    }

    type Mpsc = <TokioRuntime as AsyncRuntime>::Mpsc;
    type Watch = <TokioRuntime as AsyncRuntime>::Watch;
    type Oneshot = <TokioRuntime as AsyncRuntime>::Oneshot;
    type Mutex<T: OptionalSend + 'static> = <TokioRuntime as AsyncRuntime>::Mutex<T>;

    fn new(threads: usize) -> Self {
        Self(TokioRuntime::new(threads))
    }

    fn block_on<F, T>(&mut self, future: F) -> T
    where
        F: Future<Output = T>,
    {
        self.0.block_on(future)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_move_to_the_next_line_and_short_ones_stay() {
        SPACING_MICROS.store(30_000, Ordering::Relaxed);
        let origin = *ORIGIN.get_or_init(tokio::time::Instant::now);
        for after_ms in [2, 7, 29, 30, 31, 45, 150, 301] {
            let before = tokio::time::Instant::now();
            let at = aligned(Duration::from_millis(after_ms));
            let since = at.duration_since(origin).as_nanos();
            assert_eq!(since % 30_000_000, 0, "{after_ms} ms is not on a line");
            assert!(at >= before + Duration::from_millis(after_ms), "{after_ms} ms fired early");
            assert!(
                at < tokio::time::Instant::now() + Duration::from_millis(after_ms + 30),
                "{after_ms} ms is more than a line late"
            );
        }
        let before = tokio::time::Instant::now();
        let short = aligned(Duration::from_micros(1));
        assert!(short < before + ALIGN_BEYOND, "a batching sleep must not wait for the grid");
    }
}
