//! The Raft logs of every group this node hosts, in append-only files under `raft-log/`.
//!
//! Why not in sled with the rest: a sled flush hands its write to sled's I/O thread pool,
//! whose every job wakes all of its idle threads, and every acknowledged write waits for a
//! flush. Here the storage writer appends each cycle's records with one `write` and makes
//! them durable with one `fdatasync` of its own, for every group at once.
//!
//! A file is a sequence of frames: `[len: u32][crc32: u32][header len: u32][header][body]`,
//! little-endian, the CRC over everything after it. The header is a [`Record`]; the body
//! holds the entries of an `Entries` or `Moved` record. Files are numbered and written one
//! after the other; a crash can only cut the newest one short, and opening cuts it back to
//! its last whole frame. Everything the log storage of a group needs (record locations, the
//! vote, the committed and purged log ids) is rebuilt in memory by reading the frame
//! headers at start-up.
//!
//! Files are zeroed ahead of their last frame (`ZEROED_AHEAD` bytes at a time, in the same
//! `write` as the frames that need it): an `fdatasync` that must also store a longer file
//! size writes the inode as well, and waits for that second write. A frame never begins with
//! a zero byte (its length is not zero), so the frames end where the zeros begin.
//!
//! A file is deleted once no group needs anything in it: every entry it holds is purged or
//! overwritten, and newer files repeat each group's vote and log ids (every file starts with
//! them). Entries a group still needs from the oldest file are moved to the newest, unchanged,
//! once more than [`MAX_FILES`] files are kept, so a quiet group never pins old files.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::entry::RaftEntry;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use super::{StoreError, codec};
use crate::shard::{Entry, LogId, RaftGroupId, Vote};

/// A file is closed and a new one begun once it is this long.
const FILE_BYTES: u64 = 64 << 20;
/// Zeros written past the last frame whenever the frames come closer to the file's end than
/// this, so most syncs leave the file's size as it was.
const ZEROED_AHEAD: u64 = 1 << 20;
/// Files kept before the entries still needed from the oldest are moved to the newest.
pub const MAX_FILES: usize = 4;
/// Bytes of a frame before its header: length, CRC, header length.
const FRAME_PREFIX: usize = 12;
/// A frame longer than this is corrupt (an append is split long before).
const MAX_FRAME_BYTES: u32 = 256 << 20;

/// What a frame records, for one group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Record {
    /// Entries `first..=last`, in the body; they replace any entries from `first` on.
    Entries {
        group: RaftGroupId,
        first: u64,
        last: LogId,
    },
    /// Entries `first..=last`, in the body, unchanged, moved from an older file.
    Moved {
        group: RaftGroupId,
        first: u64,
        last: LogId,
    },
    /// Entries after `after` (all of them for `None`) are gone.
    Truncate {
        group: RaftGroupId,
        after: Option<LogId>,
    },
    /// Entries up to `upto` are no longer needed.
    Purge {
        group: RaftGroupId,
        upto: LogId,
    },
    Vote {
        group: RaftGroupId,
        vote: Vote,
    },
    Committed {
        group: RaftGroupId,
        committed: Option<LogId>,
    },
    /// The group's log and metadata are gone (it is no longer hosted here).
    Drop {
        group: RaftGroupId,
    },
}

impl Record {
    fn group(&self) -> RaftGroupId {
        match self {
            Record::Entries { group, .. }
            | Record::Moved { group, .. }
            | Record::Truncate { group, .. }
            | Record::Purge { group, .. }
            | Record::Vote { group, .. }
            | Record::Committed { group, .. }
            | Record::Drop { group } => *group,
        }
    }
}

/// A record and its body, ready for the writer.
pub struct LogWrite {
    record: Record,
    body: Vec<u8>,
}

impl LogWrite {
    /// Entries to append, consecutive; they replace any from the first one's index on.
    /// `None` for no entries.
    pub fn entries(group: RaftGroupId, entries: &[Entry]) -> Option<LogWrite> {
        let (first, last) = (entries.first()?.index(), entries.last()?.log_id());
        debug_assert_eq!(last.index() + 1 - first, entries.len() as u64, "entries of one record are consecutive");
        Some(LogWrite { record: Record::Entries { group, first, last }, body: codec::encode(&entries) })
    }
    /// Bytes it adds to the file, roughly.
    pub fn bytes(&self) -> usize {
        FRAME_PREFIX + 32 + self.body.len()
    }
    pub fn record(record: Record) -> LogWrite {
        assert!(!matches!(record, Record::Entries { .. } | Record::Moved { .. }), "entries carry a body");
        LogWrite { record, body: Vec::new() }
    }
}

/// Where one record of entries is.
#[derive(Debug, Clone, Copy)]
struct RecordAt {
    file: u64,
    /// Offset of the frame.
    offset: u64,
    len: u32,
    /// The record's first index may be purged, and its end truncated: `last` is the last
    /// entry of it still in the log.
    last: LogId,
}

/// One group's log as the files hold it.
#[derive(Debug, Clone, Default)]
struct GroupLog {
    /// Records of entries by first index; their ranges never overlap.
    records: BTreeMap<u64, RecordAt>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    purged: Option<LogId>,
}

impl GroupLog {
    /// Forgets entries from `from` on. `last_kept` is the log id of the entry before `from`
    /// when it is known; when it is not, the record holding that entry gets a placeholder
    /// for its last log id, which must then never be the log's last (an append follows).
    fn cut(&mut self, from: u64, last_kept: Option<LogId>) {
        self.records.split_off(&from);
        if let Some(at) = self.records.values_mut().next_back()
            && at.last.index() >= from
        {
            at.last = match last_kept {
                Some(kept) => kept,
                None => LogId::new(*at.last.committed_leader_id(), from - 1),
            };
        }
    }

    fn purge(&mut self, upto: LogId) {
        let index = upto.index();
        self.records.retain(|_, at| at.last.index() > index);
        self.purged = Some(upto);
    }

    fn last_log_id(&self) -> Option<LogId> {
        match (self.records.last_key_value(), &self.purged) {
            (Some((_, at)), Some(p)) if at.last.index() <= p.index() => Some(*p),
            (Some((_, at)), _) => Some(at.last),
            (None, p) => *p,
        }
    }
}

/// What the files hold, in memory.
#[derive(Default)]
struct Index {
    groups: HashMap<RaftGroupId, GroupLog>,
}

impl Index {
    /// Takes in a record written at `at` (`file`, `offset`, `len`).
    fn take(&mut self, record: &Record, file: u64, offset: u64, len: u32) {
        let group = self.groups.entry(record.group()).or_default();
        match record {
            Record::Entries { first, last, .. } => {
                group.cut(*first, None);
                group.records.insert(*first, RecordAt { file, offset, len, last: *last });
            }
            Record::Moved { first, last, .. } => {
                let moved: Vec<u64> = group.records.range(*first..=last.index()).map(|(i, _)| *i).collect();
                for i in moved {
                    group.records.remove(&i);
                }
                group.records.insert(*first, RecordAt { file, offset, len, last: *last });
            }
            Record::Truncate { after, .. } => group.cut(after.as_ref().map_or(0, |a| a.index() + 1), *after),
            Record::Purge { upto, .. } => group.purge(*upto),
            Record::Vote { vote, .. } => group.vote = Some(*vote),
            Record::Committed { committed, .. } => group.committed = *committed,
            Record::Drop { group: id } => {
                self.groups.remove(id);
            }
        }
    }

    /// Whether no group needs anything in `file` but what newer files repeat: none of its
    /// entries is still in a group's log.
    fn unneeded(&self, file: u64) -> bool {
        self.groups.values().all(|g| g.records.values().all(|at| at.file != file))
    }
}

/// The Raft log files, shared by the storage writer (which appends) and the log storage of
/// every group (which reads).
pub struct LogFiles {
    dir: PathBuf,
    index: Mutex<Index>,
    readers: RwLock<BTreeMap<u64, Arc<File>>>,
}

fn file_name(number: u64) -> String {
    format!("{number:016}.log")
}

fn io_error(what: impl std::fmt::Display, e: io::Error) -> StoreError {
    StoreError::Engine(format!("{what}: {e}"))
}

impl LogFiles {
    /// Opens the files under `dir` (created if missing), cuts a torn end off the newest, and
    /// returns them with the appender the storage writer owns.
    pub fn open(dir: &Path) -> Result<(Arc<LogFiles>, LogAppender), StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error(format!("creating {}", dir.display()), e))?;
        let mut numbers = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| io_error(format!("reading {}", dir.display()), e))? {
            let entry = entry.map_err(|e| io_error(format!("reading {}", dir.display()), e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name.strip_suffix(".log").and_then(|n| n.parse::<u64>().ok()) {
                numbers.push(n);
            }
        }
        numbers.sort_unstable();
        let mut index = Index::default();
        let mut readers = BTreeMap::new();
        let mut end = 0;
        let mut length = 0;
        for (i, &number) in numbers.iter().enumerate() {
            let path = dir.join(file_name(number));
            let newest = i + 1 == numbers.len();
            let bytes = std::fs::read(&path).map_err(|e| io_error(format!("reading {}", path.display()), e))?;
            let whole = replay(&bytes, number, &mut index);
            let zero_tail = bytes[whole as usize..].iter().all(|&b| b == 0);
            if !zero_tail {
                if !newest {
                    return Err(StoreError::Corrupt {
                        what: "raft log file",
                        detail: format!(
                            "{} is damaged at byte {whole} of {} and is not the newest file",
                            path.display(),
                            bytes.len()
                        ),
                    });
                }
                tracing::warn!(file = %path.display(), kept = whole, dropped = bytes.len() as u64 - whole,
                    "the newest raft log file ends in a torn write (a crash): cutting it back to its last whole record");
                let file = OpenOptions::new().write(true).open(&path).map_err(|e| io_error(path.display(), e))?;
                file.set_len(whole).and_then(|()| file.sync_all()).map_err(|e| io_error(path.display(), e))?;
            }
            end = whole;
            length = if zero_tail { bytes.len() as u64 } else { whole };
            readers.insert(number, Arc::new(File::open(&path).map_err(|e| io_error(path.display(), e))?));
        }
        let files =
            Arc::new(LogFiles { dir: dir.to_path_buf(), index: Mutex::new(index), readers: RwLock::new(readers) });
        let appender = match numbers.last() {
            Some(&number) => {
                let path = dir.join(file_name(number));
                let file = OpenOptions::new().write(true).open(&path).map_err(|e| io_error(path.display(), e))?;
                LogAppender::new(files.clone(), file, number, end, length)
            }
            None => LogAppender::create(files.clone(), 1)?,
        };
        Ok((files, appender))
    }

    /// The group's vote, as last written.
    pub fn vote(&self, group: RaftGroupId) -> Option<Vote> {
        self.index.lock().groups.get(&group).and_then(|g| g.vote)
    }

    pub fn committed(&self, group: RaftGroupId) -> Option<LogId> {
        self.index.lock().groups.get(&group).and_then(|g| g.committed)
    }

    /// The last purged and the last log id of the group's stored log.
    pub fn log_state(&self, group: RaftGroupId) -> (Option<LogId>, Option<LogId>) {
        match self.index.lock().groups.get(&group) {
            Some(g) => (g.purged, g.last_log_id()),
            None => (None, None),
        }
    }

    /// Stored entries of the group with index in `[start, end)`, ascending.
    pub fn read(&self, group: RaftGroupId, start: u64, end: u64) -> Result<Vec<Entry>, StoreError> {
        let (start, wanted) = {
            // Files are taken while the index is held: a record moved and its file deleted
            // meanwhile is still read from the file it was in.
            let index = self.index.lock();
            let Some(g) = index.groups.get(&group) else { return Ok(Vec::new()) };
            let start = start.max(g.purged.as_ref().map_or(0, |p| p.index() + 1));
            if start >= end {
                return Ok(Vec::new());
            }
            let from = g.records.range(..=start).next_back().map_or(start, |(first, _)| *first);
            let readers = self.readers.read();
            let wanted: Vec<(RecordAt, Option<Arc<File>>)> = g
                .records
                .range(from..end)
                .map(|(_, at)| *at)
                .filter(|at| at.last.index() >= start)
                .map(|at| (at, readers.get(&at.file).cloned()))
                .collect();
            (start, wanted)
        };
        let mut out = Vec::new();
        for (at, file) in wanted {
            for entry in read_record(file.as_deref(), &at)? {
                let i = entry.index();
                if i >= start && i < end && i <= at.last.index() {
                    out.push(entry);
                }
            }
        }
        Ok(out)
    }

    /// Files on disk (oldest first).
    pub fn file_numbers(&self) -> Vec<u64> {
        self.readers.read().keys().copied().collect()
    }
}

/// The entries of the record at `at`, read from `file`.
fn read_record(file: Option<&File>, at: &RecordAt) -> Result<Vec<Entry>, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt { what: "raft log", detail };
    let file = file.ok_or_else(|| corrupt(format!("file {} is gone but still indexed", file_name(at.file))))?;
    let mut frame = vec![0; at.len as usize];
    file.read_exact_at(&mut frame, at.offset).map_err(|e| io_error(file_name(at.file), e))?;
    match parse_frame(&frame) {
        Some((Record::Entries { .. } | Record::Moved { .. }, body, _)) => codec::decode("raft log entries", body),
        _ => Err(corrupt(format!("{} at byte {} holds no entries", file_name(at.file), at.offset))),
    }
}

/// Takes in every whole frame of `bytes` (file `number`); the length of the whole frames.
fn replay(bytes: &[u8], number: u64, index: &mut Index) -> u64 {
    let mut offset = 0usize;
    while let Some((record, _, len)) = parse_frame(&bytes[offset..]) {
        index.take(&record, number, offset as u64, len as u32);
        offset += len;
    }
    offset as u64
}

/// The record, body and length of the frame at the start of `bytes`, if it is whole.
fn parse_frame(bytes: &[u8]) -> Option<(Record, &[u8], usize)> {
    let word = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
    let len = word(0)?;
    if len == 0 || len > MAX_FRAME_BYTES {
        return None;
    }
    let total = 8 + len as usize;
    let rest = bytes.get(8..total)?;
    if crc32fast::hash(rest) != word(4)? {
        return None;
    }
    let header_len = word(8)? as usize;
    let header = rest.get(4..4 + header_len)?;
    let record: Record = codec::decode("raft log record", header).ok()?;
    Some((record, &rest[4 + header_len..], total))
}

fn frame(record: &Record, body: &[u8], out: &mut Vec<u8>) -> usize {
    let header = codec::encode(record);
    let len = 4 + header.len() + body.len();
    let start = out.len();
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(body);
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(out.len() - start, FRAME_PREFIX - 4 + len);
    out.len() - start
}

/// The writing end of the log files; only the storage writer holds it.
pub struct LogAppender {
    files: Arc<LogFiles>,
    file: File,
    number: u64,
    /// Where the current file's frames end.
    end: u64,
    /// The current file's length: its frames, then zeros.
    length: u64,
    /// Zeros written past the frames when they come this close to `length`.
    zeroed_ahead: u64,
    /// A file this long is closed and the next begun.
    file_bytes: u64,
    /// A failed write could not be undone: nothing more may be appended after it.
    broken: bool,
    /// Frames written since the last sync.
    unsynced: bool,
    /// Frames not written yet, and the records in them with their offsets in `pending`.
    pending: Vec<u8>,
    pending_records: Vec<(Record, usize, usize)>,
}

impl LogAppender {
    fn new(files: Arc<LogFiles>, file: File, number: u64, end: u64, length: u64) -> LogAppender {
        assert!(end <= length, "a file's frames end within it");
        LogAppender {
            files,
            file,
            number,
            end,
            length,
            zeroed_ahead: ZEROED_AHEAD,
            file_bytes: FILE_BYTES,
            broken: false,
            unsynced: false,
            pending: Vec::new(),
            pending_records: Vec::new(),
        }
    }

    /// Starts file `number`, empty, durably (its directory entry too).
    fn create(files: Arc<LogFiles>, number: u64) -> Result<LogAppender, StoreError> {
        let path = files.dir.join(file_name(number));
        let file =
            OpenOptions::new().create_new(true).write(true).open(&path).map_err(|e| io_error(path.display(), e))?;
        File::open(&files.dir).and_then(|d| d.sync_all()).map_err(|e| io_error(files.dir.display(), e))?;
        let reader = File::open(&path).map_err(|e| io_error(path.display(), e))?;
        files.readers.write().insert(number, Arc::new(reader));
        Ok(LogAppender::new(files, file, number, 0, 0))
    }

    /// Queues a record; [`LogAppender::write`] writes what is queued.
    pub fn add(&mut self, write: LogWrite) {
        let at = self.pending.len();
        let len = frame(&write.record, &write.body, &mut self.pending);
        self.pending_records.push((write.record, at, len));
    }

    /// Writes the queued records; from then on readers find them.
    pub fn write(&mut self) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let records = std::mem::take(&mut self.pending_records);
        let bytes = self.pending.len();
        let frames_end = self.end + bytes as u64;
        if frames_end + self.zeroed_ahead / 2 > self.length {
            // The zeros go in the same write as the frames; the sync that follows stores the
            // new size once for the next `zeroed_ahead` bytes of frames.
            let zeros = (frames_end + self.zeroed_ahead).max(self.length) - frames_end;
            self.pending.resize(bytes + zeros as usize, 0);
        }
        let written = if self.broken {
            Err(io::Error::other("an earlier write could not be undone"))
        } else {
            self.file.write_all_at(&self.pending, self.end)
        };
        let written_to = self.end + self.pending.len() as u64;
        self.pending.clear();
        if let Err(e) = written {
            // Part of it may have reached the file: cut it off, so nothing is appended after a
            // torn frame (opening the files would stop there).
            if !self.broken && self.file.set_len(self.end).is_err() {
                self.broken = true;
            }
            self.length = self.end;
            return Err(io_error(format!("appending to {}", file_name(self.number)), e));
        }
        self.length = self.length.max(written_to);
        let mut index = self.files.index.lock();
        for (record, at, len) in &records {
            index.take(record, self.number, self.end + *at as u64, *len as u32);
        }
        drop(index);
        self.end += bytes as u64;
        self.unsynced = true;
        Ok(())
    }

    /// Makes everything written durable; then starts a new file if this one is full.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        if self.unsynced {
            self.file.sync_data().map_err(|e| io_error(format!("syncing {}", file_name(self.number)), e))?;
            self.unsynced = false;
        }
        if self.end >= self.file_bytes {
            self.rotate()?;
        }
        Ok(())
    }

    /// Closes the current file (durable) and begins the next with every group's metadata,
    /// then deletes the files no group needs any more.
    fn rotate(&mut self) -> Result<(), StoreError> {
        self.file.sync_data().map_err(|e| io_error(format!("syncing {}", file_name(self.number)), e))?;
        let next = LogAppender::create(self.files.clone(), self.number + 1)?;
        *self = LogAppender { file_bytes: self.file_bytes, zeroed_ahead: self.zeroed_ahead, ..next };
        let groups: Vec<(RaftGroupId, GroupLog)> =
            self.files.index.lock().groups.iter().map(|(id, g)| (*id, g.clone())).collect();
        for (group, g) in groups {
            if let Some(vote) = g.vote {
                self.add(LogWrite::record(Record::Vote { group, vote }));
            }
            if g.committed.is_some() {
                self.add(LogWrite::record(Record::Committed { group, committed: g.committed }));
            }
            if let Some(upto) = g.purged {
                self.add(LogWrite::record(Record::Purge { group, upto }));
            }
        }
        self.write()?;
        self.sync()?;
        self.collect()
    }

    /// Deletes old files no group needs; if too many are left, moves what the groups still
    /// need from the oldest into the current file first.
    fn collect(&mut self) -> Result<(), StoreError> {
        loop {
            let oldest = match self.files.readers.read().keys().next() {
                Some(&n) if n != self.number => n,
                _ => return Ok(()),
            };
            let unneeded = self.files.index.lock().unneeded(oldest);
            if !unneeded {
                if self.files.readers.read().len() <= MAX_FILES {
                    return Ok(());
                }
                self.move_from(oldest)?;
            }
            let path = self.files.dir.join(file_name(oldest));
            std::fs::remove_file(&path).map_err(|e| io_error(format!("deleting {}", path.display()), e))?;
            self.files.readers.write().remove(&oldest);
            tracing::debug!(file = %path.display(), "deleted a raft log file no group needs");
        }
    }

    /// Writes again, durably, the entries any group still needs from file `number`.
    fn move_from(&mut self, number: u64) -> Result<(), StoreError> {
        let needed: Vec<(RaftGroupId, u64, RecordAt)> = {
            let index = self.files.index.lock();
            index
                .groups
                .iter()
                .flat_map(|(id, g)| {
                    g.records.iter().filter(|(_, at)| at.file == number).map(|(first, at)| (*id, *first, *at))
                })
                .collect()
        };
        let file = self.files.readers.read().get(&number).cloned();
        for (group, first, at) in needed {
            let entries: Vec<Entry> = read_record(file.as_deref(), &at)?
                .into_iter()
                .filter(|e| e.index() >= first && e.index() <= at.last.index())
                .collect();
            let (Some(f), Some(l)) = (entries.first(), entries.last()) else { continue };
            let record = Record::Moved { group, first: f.index(), last: l.log_id() };
            self.add(LogWrite { record, body: codec::encode(&entries) });
        }
        self.write()?;
        self.sync()
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::{blank_ent, log_id};

    use super::*;
    use crate::shard::TypeConfig;

    const A: RaftGroupId = RaftGroupId(1);
    const B: RaftGroupId = RaftGroupId(2);

    fn entries(term: u64, indexes: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
        indexes.map(|i| blank_ent::<TypeConfig>(term, 1, i)).collect()
    }

    fn append(appender: &mut LogAppender, group: RaftGroupId, term: u64, indexes: std::ops::RangeInclusive<u64>) {
        appender.add(LogWrite::entries(group, &entries(term, indexes)).expect("entries"));
        appender.write().expect("write");
        appender.sync().expect("sync");
    }

    fn record(appender: &mut LogAppender, record: Record) {
        appender.add(LogWrite::record(record));
        appender.write().expect("write");
        appender.sync().expect("sync");
    }

    fn indexes(files: &LogFiles, group: RaftGroupId) -> Vec<u64> {
        files.read(group, 0, u64::MAX).expect("read").iter().map(|e| e.index()).collect()
    }

    fn small(mut appender: LogAppender) -> LogAppender {
        appender.file_bytes = 4 << 10;
        appender.zeroed_ahead = 1 << 10;
        appender
    }

    #[test]
    fn everything_survives_a_reopen_and_a_torn_end_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_, mut appender) = LogFiles::open(dir.path()).unwrap();
            for first in (1..=100).step_by(10) {
                append(&mut appender, A, 1, first..=first + 9);
            }
            let vote = <openraft::type_config::alias::VoteOf<TypeConfig>>::new(2, 7);
            record(&mut appender, Record::Vote { group: A, vote });
            record(&mut appender, Record::Committed { group: A, committed: Some(log_id::<TypeConfig>(1, 1, 90)) });
            record(&mut appender, Record::Purge { group: A, upto: log_id::<TypeConfig>(1, 1, 20) });
            // A crash in the middle of the next write: half a frame at the end of the file.
            let mut torn = Vec::new();
            frame(&Record::Truncate { group: A, after: None }, &[], &mut torn);
            appender.file.write_all_at(&torn[..torn.len() / 2], appender.end).unwrap();
        }
        let (files, mut appender) = LogFiles::open(dir.path()).unwrap();
        assert_eq!(indexes(&files, A), (21..=100).collect::<Vec<_>>(), "the torn truncate took no effect");
        assert_eq!(files.vote(A).map(|v| v.leader_id().term), Some(2));
        assert_eq!(files.committed(A).map(|c| c.index()), Some(90));
        let (purged, last) = files.log_state(A);
        assert_eq!((purged.map(|p| p.index()), last.map(|l| l.index())), (Some(20), Some(100)));
        // Appends go on after the cut, and survive the next reopen.
        append(&mut appender, A, 1, 101..=105);
        drop((files, appender));
        let (files, _) = LogFiles::open(dir.path()).unwrap();
        assert_eq!(indexes(&files, A), (21..=105).collect::<Vec<_>>());
    }

    #[test]
    fn the_file_is_zeroed_ahead_so_syncs_keep_its_size_and_appends_go_on_after_the_frames() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file_name(1));
        let size = || std::fs::metadata(&path).unwrap().len();
        let frames_end;
        {
            let (_, mut appender) = LogFiles::open(dir.path()).unwrap();
            append(&mut appender, A, 1, 1..=1);
            let zeroed = size();
            assert!(zeroed >= appender.end + ZEROED_AHEAD, "{zeroed} bytes for frames ending at {}", appender.end);
            for i in 2..=50 {
                append(&mut appender, A, 1, i..=i);
            }
            assert_eq!(size(), zeroed, "fifty small appends fit in the zeros written ahead");
            let bytes = std::fs::read(&path).unwrap();
            assert!(bytes[appender.end as usize..].iter().all(|&b| b == 0));
            frames_end = appender.end;
        }
        let (files, mut appender) = LogFiles::open(dir.path()).unwrap();
        assert_eq!(appender.end, frames_end, "the frames end where the zeros begin");
        assert_eq!(indexes(&files, A), (1..=50).collect::<Vec<_>>());
        append(&mut appender, A, 1, 51..=60);
        drop((files, appender));
        let (files, appender) = LogFiles::open(dir.path()).unwrap();
        assert_eq!(indexes(&files, A), (1..=60).collect::<Vec<_>>(), "appends after a reopen follow the frames");
        assert!(appender.end > frames_end);
    }

    #[test]
    fn a_truncation_replaces_the_end_and_a_drop_forgets_the_group() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (files, mut appender) = LogFiles::open(dir.path()).unwrap();
            append(&mut appender, A, 1, 1..=10);
            append(&mut appender, B, 1, 1..=3);
            record(&mut appender, Record::Truncate { group: A, after: Some(log_id::<TypeConfig>(1, 1, 5)) });
            assert_eq!(files.log_state(A).1.map(|l| l.index()), Some(5), "the log ends where it was cut");
            append(&mut appender, A, 2, 6..=8);
            record(&mut appender, Record::Drop { group: B });
        }
        let (files, _) = LogFiles::open(dir.path()).unwrap();
        let read = files.read(A, 0, u64::MAX).unwrap();
        let terms: Vec<(u64, u64)> = read.iter().map(|e| (e.index(), e.log_id().committed_leader_id().term)).collect();
        assert_eq!(terms, vec![(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 2), (7, 2), (8, 2)]);
        assert_eq!(files.log_state(A).1, Some(log_id::<TypeConfig>(2, 1, 8)));
        assert_eq!(files.log_state(B), (None, None), "a dropped group has nothing left");
        assert!(indexes(&files, B).is_empty());
    }

    #[test]
    fn a_damaged_file_that_is_not_the_newest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_, appender) = LogFiles::open(dir.path()).unwrap();
            let mut appender = small(appender);
            for first in (1..=1_000).step_by(10) {
                append(&mut appender, A, 1, first..=first + 9);
            }
        }
        let first = dir.path().join(file_name(1));
        assert!(dir.path().join(file_name(2)).exists(), "the test needs a second file");
        let mut bytes = std::fs::read(&first).unwrap();
        bytes[20] ^= 0xff;
        std::fs::write(&first, bytes).unwrap();
        match LogFiles::open(dir.path()) {
            Err(StoreError::Corrupt { detail, .. }) => assert!(detail.contains(&file_name(1)), "{detail}"),
            Err(e) => panic!("another error: {e}"),
            Ok(_) => panic!("a damaged older file was taken"),
        }
    }

    #[test]
    fn unneeded_files_are_deleted_and_a_quiet_group_does_not_pin_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (files, appender) = LogFiles::open(dir.path()).unwrap();
            let mut appender = small(appender);
            // A quiet group writes a little, once, and never purges.
            append(&mut appender, B, 1, 1..=3);
            // A busy group writes many files' worth, purging as it goes.
            for first in (1..=3_000).step_by(20) {
                append(&mut appender, A, 1, first..=first + 19);
                if first > 200 && first % 100 == 1 {
                    record(&mut appender, Record::Purge { group: A, upto: log_id::<TypeConfig>(1, 1, first - 100) });
                }
            }
            let kept = files.file_numbers();
            assert!(kept.len() <= MAX_FILES + 1, "{} files kept: {kept:?}", kept.len());
            assert!(*kept.first().unwrap() > 1, "the quiet group pinned the first file");
            assert_eq!(indexes(&files, B), vec![1, 2, 3], "the quiet group's entries were moved along");
        }
        let (files, _) = LogFiles::open(dir.path()).unwrap();
        assert_eq!(indexes(&files, B), vec![1, 2, 3]);
        let a = indexes(&files, A);
        assert_eq!(a.first(), Some(&2_802), "entries after the last purge point stay");
        assert_eq!(a.last(), Some(&3_000));
        assert_eq!(a.len(), 199, "no entry is lost or repeated");
    }
}
