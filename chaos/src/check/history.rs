//! The history of a chaos run: one JSON object per line (JSON Lines), one line per client action.
//!
//! Every record carries `kind` (its type) and `t_ms`, the milliseconds since the run started.
//! The workload appends records through a [`HistoryWriter`] while it runs; the checker reads them
//! back with [`read_history`].

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// The longest line [`read_history`] accepts, in bytes (a `final_read` holds a whole group log).
pub const MAX_LINE_BYTES: usize = 64 * 1024 * 1024;

/// One entry of a group log as a `final_read` saw it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FinalEntry {
    pub seq: u64,
    /// The sender's user id.
    pub from: String,
    /// The sender's `client_msg_id`; `None` for system entries.
    #[serde(default)]
    pub cmid: Option<String>,
    #[serde(default)]
    pub system: bool,
}

/// One line of a history file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// A `msg.send` request went out. `attempt` is 0 for the first request of `cmid`, then 1, 2, ...
    /// for retries with the same `cmid`.
    Send { t_ms: u64, client: String, node: String, group: String, user: String, cmid: String, attempt: u32 },
    /// A `msg.send` was acknowledged with `seq`.
    Ack { t_ms: u64, client: String, group: String, cmid: String, attempt: u32, seq: u64, duplicate: bool },
    /// A `msg.send` attempt failed with an error code (`unavailable`, `timeout`, `closed`, ...).
    Fail { t_ms: u64, client: String, group: String, cmid: String, attempt: u32, code: String },
    /// A `msg.read` was acknowledged; `seq` is the read position the server answered.
    ReadMark { t_ms: u64, client: String, user: String, group: String, seq: u64 },
    /// A pushed `msg` event was received.
    Push { t_ms: u64, client: String, user: String, group: String, seq: u64, from: String, cmid: Option<String> },
    /// The whole log of `group` as `user` read it with `msg.sync` through `node`, after healing.
    FinalRead { t_ms: u64, node: String, user: String, group: String, entries: Vec<FinalEntry> },
    /// A milestone of the run: `workload_start`, `workload_end`, `fault`, `heal`.
    Phase { t_ms: u64, name: String, detail: String },
}

/// Names of the [`Record::Phase`] milestones.
pub mod phase {
    pub const WORKLOAD_START: &str = "workload_start";
    pub const WORKLOAD_END: &str = "workload_end";
    pub const FAULT: &str = "fault";
    pub const HEAL: &str = "heal";
}

impl Record {
    /// Milliseconds since the run started.
    pub fn t_ms(&self) -> u64 {
        match self {
            Record::Send { t_ms, .. }
            | Record::Ack { t_ms, .. }
            | Record::Fail { t_ms, .. }
            | Record::ReadMark { t_ms, .. }
            | Record::Push { t_ms, .. }
            | Record::FinalRead { t_ms, .. }
            | Record::Phase { t_ms, .. } => *t_ms,
        }
    }

    /// The `kind` tag as written in the file.
    pub fn kind(&self) -> &'static str {
        match self {
            Record::Send { .. } => "send",
            Record::Ack { .. } => "ack",
            Record::Fail { .. } => "fail",
            Record::ReadMark { .. } => "read_mark",
            Record::Push { .. } => "push",
            Record::FinalRead { .. } => "final_read",
            Record::Phase { .. } => "phase",
        }
    }

    /// The group the record is about (`None` for phases).
    pub fn group(&self) -> Option<&str> {
        match self {
            Record::Send { group, .. }
            | Record::Ack { group, .. }
            | Record::Fail { group, .. }
            | Record::ReadMark { group, .. }
            | Record::Push { group, .. }
            | Record::FinalRead { group, .. } => Some(group),
            Record::Phase { .. } => None,
        }
    }
}

/// Why a history could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("cannot open history {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("{source_name}: line {line}: cannot read: {source}")]
    Read { source_name: String, line: u64, source: io::Error },
    #[error("{source_name}: line {line}: longer than {max} bytes")]
    LineTooLong { source_name: String, line: u64, max: usize },
    #[error("{source_name}: line {line}, column {column}: not a history record: {message}")]
    Parse { source_name: String, line: u64, column: usize, message: String },
    #[error("cannot write history {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

impl HistoryError {
    /// The 1-based line number the error is about, if it is about a line.
    pub fn line(&self) -> Option<u64> {
        match self {
            HistoryError::Read { line, .. }
            | HistoryError::LineTooLong { line, .. }
            | HistoryError::Parse { line, .. } => Some(*line),
            HistoryError::Open { .. } | HistoryError::Write { .. } => None,
        }
    }
}

/// Reads a whole history file. Blank lines are skipped; any other line must be a record.
pub fn read_history(path: impl AsRef<Path>) -> Result<Vec<Record>, HistoryError> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|source| HistoryError::Open { path: path.to_path_buf(), source })?;
    read_history_from(BufReader::new(file), &path.display().to_string())
}

/// Reads history records from `reader`; `source_name` names it in errors.
pub fn read_history_from(mut reader: impl BufRead, source_name: &str) -> Result<Vec<Record>, HistoryError> {
    let mut records = Vec::new();
    let mut buf = Vec::new();
    let mut line: u64 = 0;
    loop {
        buf.clear();
        line += 1;
        let limit = MAX_LINE_BYTES as u64 + 1;
        let n = (&mut reader).take(limit).read_until(b'\n', &mut buf).map_err(|source| HistoryError::Read {
            source_name: source_name.to_string(),
            line,
            source,
        })?;
        if n == 0 {
            break;
        }
        let mut content: &[u8] = &buf;
        if let Some(rest) = content.strip_suffix(b"\n") {
            content = rest;
        } else if content.len() > MAX_LINE_BYTES {
            return Err(HistoryError::LineTooLong { source_name: source_name.to_string(), line, max: MAX_LINE_BYTES });
        }
        if content.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let record = serde_json::from_slice::<Record>(content).map_err(|e| HistoryError::Parse {
            source_name: source_name.to_string(),
            line,
            column: e.column(),
            message: parse_message(&e),
        })?;
        records.push(record);
    }
    Ok(records)
}

/// serde_json's message without its " at line L column C" suffix (the position is reported apart).
fn parse_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    if e.line() == 0 {
        return text;
    }
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    match text.strip_suffix(&suffix) {
        Some(message) => message.to_string(),
        None => text,
    }
}

/// Writes `records` to `path` (replacing it), one per line.
pub fn write_history(path: impl AsRef<Path>, records: &[Record]) -> Result<(), HistoryError> {
    let writer = HistoryWriter::create(path)?;
    for r in records {
        writer.record(r);
    }
    writer.finish().map(|_| ())
}

struct WriterState {
    out: BufWriter<File>,
    written: u64,
    /// The first write error; once set, later records are dropped and `finish` reports it.
    error: Option<io::Error>,
}

/// Appends records to a history file. Shared by many tasks (`Arc<HistoryWriter>`): each
/// [`record`](Self::record) writes one whole line under a lock, so lines never interleave.
///
/// Writing never fails loudly in the middle of a run: the first I/O error is kept, later records
/// are dropped, and [`finish`](Self::finish) returns the error.
pub struct HistoryWriter {
    path: PathBuf,
    started: Instant,
    state: Mutex<WriterState>,
}

impl HistoryWriter {
    /// Creates (or truncates) `path`; `t_ms` counts from now.
    pub fn create(path: impl AsRef<Path>) -> Result<Self, HistoryError> {
        Self::create_at(path, Instant::now())
    }

    /// Creates (or truncates) `path`; `t_ms` counts from `started`.
    pub fn create_at(path: impl AsRef<Path>, started: Instant) -> Result<Self, HistoryError> {
        let path = path.as_ref().to_path_buf();
        let file = File::create(&path).map_err(|source| HistoryError::Open { path: path.clone(), source })?;
        Ok(Self {
            path,
            started,
            state: Mutex::new(WriterState { out: BufWriter::with_capacity(256 * 1024, file), written: 0, error: None }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// Milliseconds since the run started, for a record's `t_ms`.
    pub fn t_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Appends one record as one line.
    pub fn record(&self, r: &Record) {
        let line = serde_json::to_vec(r).map_err(io::Error::other);
        let mut state = self.lock();
        if state.error.is_some() {
            return;
        }
        let result = line.and_then(|mut line| {
            line.push(b'\n');
            state.out.write_all(&line)
        });
        match result {
            Ok(()) => state.written += 1,
            Err(e) => state.error = Some(e),
        }
    }

    /// Records written so far.
    pub fn written(&self) -> u64 {
        self.lock().written
    }

    /// Flushes everything to disk and returns how many records were written, or the first error.
    /// Records may still be appended afterwards (call `finish` again).
    pub fn finish(&self) -> Result<u64, HistoryError> {
        let mut state = self.lock();
        if state.error.is_none() {
            let flushed = state.out.flush().and_then(|()| state.out.get_ref().sync_data());
            if let Err(e) = flushed {
                state.error = Some(e);
            }
        }
        match &state.error {
            None => Ok(state.written),
            Some(e) => {
                Err(HistoryError::Write { path: self.path.clone(), source: io::Error::new(e.kind(), e.to_string()) })
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WriterState> {
        // A panic while holding the lock leaves at worst a partial line; keep writing.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl std::fmt::Debug for HistoryWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HistoryWriter").field("path", &self.path).finish_non_exhaustive()
    }
}
