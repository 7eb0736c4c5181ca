//! The history checker: proves from a run's [`history`] that nothing acknowledged was lost.
//!
//! [`check`] reads the whole history (in `t_ms` order, whatever the order of the input) and
//! returns a [`Verdict`]:
//!
//! - **lost**: an acknowledged message (one per distinct group, sender and `client_msg_id`) that a
//!   final read of its group does not hold, or holds at another seq than acknowledged ("moved",
//!   counted in `lost` and again in `moved`). A group with no final read at all cannot prove its
//!   acknowledged messages, so they count as lost.
//! - **unexpected**: a final-read entry with a `client_msg_id` that no `send` ever issued for that
//!   group and sender.
//! - **duplicated**: a (group, sender, `client_msg_id`) stored at more than one seq.
//! - **reordered**: a final read whose seqs are not exactly `1..=N` in order.
//! - **divergent**: a group whose final reads (all taken after healing) are not identical, or
//!   whose final log lacks or changed an entry a member was pushed.
//! - **read_regressions**: a client's read position in a group going backwards.
//! - **malformed**: records the checker cannot reconcile (an ack without a send, a `client_msg_id`
//!   reused for another group, a workload window ending before it starts, ...).
//!
//! It also measures, per group, the longest stretch of the workload window without any ack.

pub mod history;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{CellAlignment, ContentArrangement, Table};
use serde::{Deserialize, Serialize};

pub use history::{
    FinalEntry, HistoryError, HistoryWriter, MAX_LINE_BYTES, Record, read_history, read_history_from, write_history,
};

/// At most this many lines in [`Verdict::details`] (the last one then says how many were left out).
pub const MAX_DETAILS: usize = 50;

/// What [`check`] found in a history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// Distinct messages sent: (group, user, `client_msg_id`).
    pub sends: u64,
    /// `send` records: first requests and retries.
    pub attempts: u64,
    /// Distinct messages acknowledged at least once.
    pub acked: u64,
    /// `fail` records by error code.
    pub failures_by_code: BTreeMap<String, u64>,
    pub pushes: u64,
    pub read_marks: u64,
    /// Distinct groups named by any record.
    pub groups: u64,
    pub final_reads: u64,

    pub lost: u64,
    /// Of `lost`: found in a final read, but at another seq than acknowledged.
    pub moved: u64,
    pub unexpected: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub divergent: u64,
    pub read_regressions: u64,
    pub malformed: u64,

    /// The longest stretch of the workload window during which a group got no ack, over groups.
    pub max_unavailable_ms: u64,
    pub unavailable_ms_by_group: BTreeMap<String, u64>,

    /// One line per violation, at most [`MAX_DETAILS`].
    pub details: Vec<String>,
}

impl Verdict {
    /// No violation of any kind.
    pub fn ok(&self) -> bool {
        self.lost == 0
            && self.unexpected == 0
            && self.duplicated == 0
            && self.reordered == 0
            && self.divergent == 0
            && self.read_regressions == 0
            && self.malformed == 0
    }

    /// The one-line verdict, e.g.
    /// `verdict: ok lost=0 unexpected=0 duplicated=0 reordered=0 divergent=0 max_unavailable_ms=1234`.
    pub fn line(&self) -> String {
        format!(
            "verdict: {} lost={} unexpected={} duplicated={} reordered={} divergent={} max_unavailable_ms={}",
            if self.ok() { "ok" } else { "violated" },
            self.lost,
            self.unexpected,
            self.duplicated,
            self.reordered,
            self.divergent,
            self.max_unavailable_ms
        )
    }

    /// A human summary: the verdict line, a table of counts, then the details.
    pub fn summary(&self) -> String {
        let failures = if self.failures_by_code.is_empty() {
            "0".to_string()
        } else {
            self.failures_by_code.iter().map(|(code, n)| format!("{code}: {n}")).collect::<Vec<_>>().join(", ")
        };
        let worst_group = self
            .unavailable_ms_by_group
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
            .map(|(g, ms)| format!("{ms} ms (group {g})"))
            .unwrap_or_else(|| "-".to_string());
        let lost = if self.moved > 0 { format!("{} ({} moved)", self.lost, self.moved) } else { self.lost.to_string() };
        let rows: Vec<(&str, String)> = vec![
            ("messages sent / attempts", format!("{} / {}", self.sends, self.attempts)),
            ("messages acknowledged", self.acked.to_string()),
            ("send failures", failures),
            ("pushes / read marks", format!("{} / {}", self.pushes, self.read_marks)),
            ("groups / final reads", format!("{} / {}", self.groups, self.final_reads)),
            ("lost", lost),
            ("unexpected", self.unexpected.to_string()),
            ("duplicated", self.duplicated.to_string()),
            ("reordered", self.reordered.to_string()),
            ("divergent", self.divergent.to_string()),
            ("read regressions", self.read_regressions.to_string()),
            ("malformed records", self.malformed.to_string()),
            ("longest unavailability", worst_group),
        ];
        let mut table = Table::new();
        table.load_style(UTF8_FULL_CONDENSED).set_content_arrangement(ContentArrangement::Disabled);
        table.set_header(vec!["check", "result"]);
        for (k, v) in rows {
            table.add_row(vec![k.to_string(), v]);
        }
        if let Some(col) = table.column_mut(1) {
            col.set_cell_alignment(CellAlignment::Left);
        }
        let mut out = format!("{}\n{table}\n", self.line());
        if !self.details.is_empty() {
            out.push_str("details:\n");
            for d in &self.details {
                out.push_str("  ");
                out.push_str(d);
                out.push('\n');
            }
        }
        out
    }
}

/// Collects detail lines, keeping the first few and counting the rest.
#[derive(Default)]
struct Details {
    lines: Vec<String>,
    total: u64,
}

impl Details {
    fn add(&mut self, line: impl FnOnce() -> String) {
        self.total += 1;
        if self.lines.len() < MAX_DETAILS {
            self.lines.push(line());
        }
    }

    fn finish(mut self) -> Vec<String> {
        let total = usize::try_from(self.total).unwrap_or(usize::MAX);
        if total > MAX_DETAILS {
            self.lines.truncate(MAX_DETAILS - 1);
            let more = self.total - (MAX_DETAILS as u64 - 1);
            self.lines.push(format!("... and {more} more"));
        }
        debug_assert!(self.lines.len() <= MAX_DETAILS);
        self.lines
    }
}

/// The first `send` of a (client, cmid).
struct SendInfo<'a> {
    group: &'a str,
    user: &'a str,
}

/// An acknowledged message: every seq it was acknowledged with (more than one is itself a problem).
struct AckInfo<'a> {
    client: &'a str,
    seqs: BTreeSet<u64>,
}

/// Key of an acknowledged message: (group, sender if known, cmid).
type AckKey<'a> = (&'a str, Option<&'a str>, &'a str);

/// A `final_read`, indexed by cmid.
struct FinalView<'a> {
    node: &'a str,
    user: &'a str,
    entries: &'a [FinalEntry],
    /// cmid -> (from, seq) of every non-system entry carrying it.
    by_cmid: BTreeMap<&'a str, Vec<(&'a str, u64)>>,
}

impl FinalView<'_> {
    fn who(&self) -> String {
        format!("read via {} as {}", self.node, self.user)
    }
}

/// Checks a history; see the [module documentation](self) for what is checked.
pub fn check(records: &[Record]) -> Verdict {
    // A total order: by time, then by content, so that the input order never matters.
    let mut order: Vec<&Record> = records.iter().collect();
    order.sort_by(|a, b| a.t_ms().cmp(&b.t_ms()).then_with(|| a.cmp(b)));

    let mut v = Verdict::default();
    let mut d = Details::default();
    let mut malformed = Details::default();

    let mut groups: BTreeSet<&str> = BTreeSet::new();
    let mut sends: BTreeMap<(&str, &str), SendInfo> = BTreeMap::new();
    let mut issued: BTreeSet<(&str, &str, &str)> = BTreeSet::new();
    let mut send_times: Vec<u64> = Vec::new();
    let mut workload_start: Option<u64> = None;
    let mut workload_end: Option<u64> = None;
    let mut read_positions: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    let mut regressions = Details::default();
    let mut finals: BTreeMap<&str, Vec<FinalView>> = BTreeMap::new();

    for r in &order {
        if let Some(g) = r.group() {
            groups.insert(g);
        }
        match r {
            Record::Send { t_ms, client, group, user, cmid, .. } => {
                v.attempts += 1;
                send_times.push(*t_ms);
                issued.insert((group, user, cmid));
                let first = sends.entry((client, cmid)).or_insert(SendInfo { group, user });
                if first.group != group || first.user != user {
                    let (g0, u0) = (first.group, first.user);
                    v.malformed += 1;
                    malformed.add(|| {
                        format!(
                            "malformed: client {client} reused cmid {cmid} for group {group} as {user} \
                             (first sent to group {g0} as {u0}) at t={t_ms}ms"
                        )
                    });
                }
            }
            Record::Fail { code, .. } => *v.failures_by_code.entry(code.clone()).or_default() += 1,
            Record::Push { .. } => v.pushes += 1,
            Record::ReadMark { t_ms, client, group, seq, .. } => {
                v.read_marks += 1;
                let last = read_positions.entry((client, group)).or_insert(*seq);
                if *seq < *last {
                    v.read_regressions += 1;
                    let before = *last;
                    regressions.add(|| {
                        format!(
                            "read regression: client {client} in group {group}: read position {seq} \
                             at t={t_ms}ms after {before}"
                        )
                    });
                }
                *last = (*last).max(*seq);
            }
            Record::Phase { t_ms, name, .. } => match name.as_str() {
                history::phase::WORKLOAD_START => {
                    workload_start.get_or_insert(*t_ms);
                }
                history::phase::WORKLOAD_END => workload_end = Some(*t_ms),
                _ => {}
            },
            Record::FinalRead { node, user, group, entries, .. } => {
                v.final_reads += 1;
                let mut by_cmid: BTreeMap<&str, Vec<(&str, u64)>> = BTreeMap::new();
                for e in entries {
                    if let (false, Some(cmid)) = (e.system, e.cmid.as_deref()) {
                        by_cmid.entry(cmid).or_default().push((&e.from, e.seq));
                    }
                }
                finals.entry(group).or_default().push(FinalView { node, user, entries, by_cmid });
            }
            Record::Ack { .. } => {}
        }
    }

    // Acks, once every send is known.
    let mut acked: BTreeMap<AckKey, AckInfo> = BTreeMap::new();
    let mut ack_times: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for r in &order {
        let Record::Ack { t_ms, client, group, cmid, seq, .. } = r else { continue };
        ack_times.entry(group).or_default().push(*t_ms);
        let user = match sends.get(&(client.as_str(), cmid.as_str())) {
            None => {
                v.malformed += 1;
                malformed.add(|| {
                    format!(
                        "malformed: ack of cmid {cmid} by client {client} in group {group} at t={t_ms}ms without a send"
                    )
                });
                None
            }
            Some(s) if s.group != group => {
                v.malformed += 1;
                let sent_group = s.group;
                malformed.add(|| {
                    format!(
                        "malformed: ack of cmid {cmid} by client {client} names group {group} \
                         but it was sent to group {sent_group}"
                    )
                });
                Some(s.user)
            }
            Some(s) => Some(s.user),
        };
        acked.entry((group, user, cmid)).or_insert_with(|| AckInfo { client, seqs: BTreeSet::new() }).seqs.insert(*seq);
    }
    v.sends = issued.len() as u64;
    v.acked = acked.len() as u64;
    v.groups = groups.len() as u64;

    // Lost and moved.
    let mut unverifiable: BTreeMap<&str, u64> = BTreeMap::new();
    for (&(group, user, cmid), ack) in &acked {
        let reads = finals.get(group).map(Vec::as_slice).unwrap_or_default();
        if reads.is_empty() {
            v.lost += 1;
            *unverifiable.entry(group).or_default() += 1;
            continue;
        }
        let sender = user.unwrap_or("?");
        let acked_seqs = &ack.seqs;
        if acked_seqs.len() > 1 {
            d.add(|| {
                format!(
                    "conflicting acks: group {group} cmid {cmid} from {sender} acknowledged at seqs {}",
                    list(acked_seqs)
                )
            });
        }
        let mut missing: Vec<&FinalView> = Vec::new();
        let mut moved: Vec<(&FinalView, BTreeSet<u64>)> = Vec::new();
        for read in reads {
            let stored: BTreeSet<u64> = read
                .by_cmid
                .get(cmid)
                .into_iter()
                .flatten()
                .filter(|(from, _)| user.is_none_or(|u| u == *from))
                .map(|(_, seq)| *seq)
                .collect();
            if stored.is_empty() {
                missing.push(read);
            } else if !acked_seqs.is_subset(&stored) {
                moved.push((read, stored));
            }
        }
        if missing.is_empty() && moved.is_empty() {
            continue;
        }
        v.lost += 1;
        let client = ack.client;
        let n = reads.len();
        if let Some((read, stored)) = moved.first() {
            v.moved += 1;
            let k = moved.len();
            d.add(|| {
                format!(
                    "moved: group {group} cmid {cmid} from {sender} (client {client}) acknowledged at seq {} \
                     but stored at seq {} ({}; {k} of {n} final reads)",
                    list(acked_seqs),
                    list(stored),
                    read.who()
                )
            });
        }
        if let Some(read) = missing.first() {
            let k = missing.len();
            d.add(|| {
                format!(
                    "lost: group {group} cmid {cmid} from {sender} (client {client}) acknowledged at seq {} \
                     is absent ({}; {k} of {n} final reads)",
                    list(acked_seqs),
                    read.who()
                )
            });
        }
    }
    for (group, n) in &unverifiable {
        d.add(|| format!("lost: group {group} has no final read: {n} acknowledged messages unverifiable"));
    }

    // Per final read: order, duplicates, unexpected entries.
    let mut duplicated: BTreeSet<(&str, &str, &str)> = BTreeSet::new();
    let mut unexpected: BTreeSet<(&str, &str, &str)> = BTreeSet::new();
    for (&group, reads) in &finals {
        for read in reads {
            if let Some((i, e)) = read.entries.iter().enumerate().find(|(i, e)| e.seq != *i as u64 + 1) {
                v.reordered += 1;
                let n = read.entries.len();
                d.add(|| {
                    format!(
                        "reordered: group {group} ({}): {n} entries are not seqs 1..={n}; entry {} has seq {} \
                         (expected {})",
                        read.who(),
                        i + 1,
                        e.seq,
                        i + 1
                    )
                });
            }
            for (&cmid, stored) in &read.by_cmid {
                let mut by_from: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
                for &(from, seq) in stored {
                    by_from.entry(from).or_default().insert(seq);
                }
                for (from, seqs) in by_from {
                    if seqs.len() > 1 && duplicated.insert((group, from, cmid)) {
                        d.add(|| {
                            format!(
                                "duplicated: group {group} cmid {cmid} from {from} stored at seqs {} ({})",
                                list(&seqs),
                                read.who()
                            )
                        });
                    }
                    if !issued.contains(&(group, from, cmid)) && unexpected.insert((group, from, cmid)) {
                        d.add(|| {
                            format!(
                                "unexpected: group {group} cmid {cmid} from {from} at seq {} was never sent ({})",
                                list(&seqs),
                                read.who()
                            )
                        });
                    }
                }
            }
        }
    }
    v.duplicated = duplicated.len() as u64;
    v.unexpected = unexpected.len() as u64;

    // Divergence between the final reads of a group.
    for (&group, reads) in &finals {
        let Some((first, rest)) = reads.split_first() else { continue };
        let mut diverged = false;
        for other in rest {
            if other.entries == first.entries {
                continue;
            }
            diverged = true;
            let at = first.entries.iter().zip(other.entries).position(|(a, b)| a != b);
            let (a, b) = (first.entries.len(), other.entries.len());
            d.add(|| {
                let place = match at {
                    Some(i) => format!("first difference at entry {}", i + 1),
                    None => "one is a prefix of the other".to_string(),
                };
                format!(
                    "divergent: group {group}: {} ({a} entries) and {} ({b} entries) differ, {place}",
                    first.who(),
                    other.who()
                )
            });
        }
        if diverged {
            v.divergent += 1;
        }
    }

    // What members were pushed must be what the group kept: an entry a client saw and the
    // log later lost or changed is a divergence as real as two replicas disagreeing.
    let mut push_groups: BTreeSet<&str> = BTreeSet::new();
    for r in &order {
        let Record::Push { t_ms, client, group, seq, from, cmid, .. } = r else { continue };
        let Some(log) = finals.get(group.as_str()).and_then(|reads| reads.first()) else { continue };
        let kept = log.entries.iter().find(|e| e.seq == *seq);
        let same = kept.is_some_and(|e| e.from == *from && (e.system || e.cmid == *cmid));
        if !same {
            push_groups.insert(group);
            d.add(|| {
                format!(
                    "divergent: group {group}: client {client} was pushed seq {seq} from {from} ({cmid:?}) at                      t={t_ms}ms, the final log holds {kept:?}"
                )
            });
        }
    }
    for group in push_groups {
        if !finals.get(group).is_some_and(|reads| {
            reads.split_first().is_some_and(|(first, rest)| rest.iter().any(|o| o.entries != first.entries))
        }) {
            v.divergent += 1;
        }
    }

    // Unavailability: the longest stretch of the workload window without an ack, per group.
    let start = workload_start.or_else(|| send_times.first().copied());
    let end = workload_end.or_else(|| send_times.last().copied());
    match (start, end) {
        (Some(start), Some(end)) if start <= end => {
            let workload_groups: BTreeSet<&str> =
                issued.iter().map(|(g, _, _)| *g).chain(ack_times.keys().copied()).collect();
            for group in workload_groups {
                let times = ack_times.get(group).map(Vec::as_slice).unwrap_or_default();
                let ms = longest_gap(start, end, times);
                v.max_unavailable_ms = v.max_unavailable_ms.max(ms);
                v.unavailable_ms_by_group.insert(group.to_string(), ms);
            }
        }
        (Some(start), Some(end)) => {
            v.malformed += 1;
            malformed.add(|| format!("malformed: the workload ends at t={end}ms before it starts at t={start}ms"));
        }
        _ => {}
    }

    // Violations first, then what could not be reconciled.
    let mut all = Details::default();
    for part in [d, regressions, malformed] {
        let extra = part.total - part.lines.len() as u64;
        for line in part.lines {
            all.add(|| line);
        }
        all.total += extra;
    }
    v.details = all.finish();
    v
}

/// `1, 5, 7`
fn list(seqs: &BTreeSet<u64>) -> String {
    seqs.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
}

/// The longest interval of `[start, end]` containing no time of `times` (`times` sorted).
fn longest_gap(start: u64, end: u64, times: &[u64]) -> u64 {
    debug_assert!(start <= end);
    debug_assert!(times.windows(2).all(|w| w[0] <= w[1]));
    let mut longest = 0;
    let mut last = start;
    for &t in times.iter().filter(|t| (start..=end).contains(*t)) {
        longest = longest.max(t - last);
        last = t;
    }
    longest.max(end - last)
}
