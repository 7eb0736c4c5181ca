use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;

use super::history::phase;
use super::*;

fn send(t_ms: u64, client: &str, node: &str, group: &str, user: &str, cmid: &str, attempt: u32) -> Record {
    Record::Send {
        t_ms,
        client: client.into(),
        node: node.into(),
        group: group.into(),
        user: user.into(),
        cmid: cmid.into(),
        attempt,
    }
}

fn ack(t_ms: u64, client: &str, group: &str, cmid: &str, attempt: u32, seq: u64) -> Record {
    Record::Ack { t_ms, client: client.into(), group: group.into(), cmid: cmid.into(), attempt, seq, duplicate: false }
}

fn fail(t_ms: u64, client: &str, group: &str, cmid: &str, attempt: u32, code: &str) -> Record {
    Record::Fail { t_ms, client: client.into(), group: group.into(), cmid: cmid.into(), attempt, code: code.into() }
}

fn read_mark(t_ms: u64, client: &str, user: &str, group: &str, seq: u64) -> Record {
    Record::ReadMark { t_ms, client: client.into(), user: user.into(), group: group.into(), seq }
}

fn phase(t_ms: u64, name: &str) -> Record {
    Record::Phase { t_ms, name: name.into(), detail: String::new() }
}

fn entry(seq: u64, from: &str, cmid: &str) -> FinalEntry {
    FinalEntry { seq, from: from.into(), cmid: Some(cmid.into()), system: false }
}

fn system(seq: u64) -> FinalEntry {
    FinalEntry { seq, from: "system".into(), cmid: None, system: true }
}

fn final_read(t_ms: u64, node: &str, user: &str, group: &str, entries: Vec<FinalEntry>) -> Record {
    Record::FinalRead { t_ms, node: node.into(), user: user.into(), group: group.into(), entries }
}

/// Two groups, two clients; every message acknowledged once (one after a retry), every final read
/// identical.
///
/// g1: c1 (alice via n1) sends m1..m3 at 100/200/300, acked 110/220/310 at seqs 2..4 (seq 1 is a
/// system entry); c2 (bob via n2) sends b1 at 400: fails (timeout), retried at 500, acked at 900
/// (seq 5). g2: c2 sends x1 at 150, acked at 160 (seq 1). Window 0..1000: g1 waits 590 ms at
/// most (310 -> 900), g2 840 ms (160 -> end).
fn clean() -> Vec<Record> {
    let g1 = vec![
        system(1),
        entry(2, "alice", "m1"),
        entry(3, "alice", "m2"),
        entry(4, "alice", "m3"),
        entry(5, "bob", "b1"),
    ];
    let g2 = vec![entry(1, "bob", "x1")];
    vec![
        phase(0, phase::WORKLOAD_START),
        send(100, "c1", "n1", "g1", "alice", "m1", 0),
        ack(110, "c1", "g1", "m1", 0, 2),
        send(150, "c2", "n2", "g2", "bob", "x1", 0),
        ack(160, "c2", "g2", "x1", 0, 1),
        send(200, "c1", "n1", "g1", "alice", "m2", 0),
        ack(220, "c1", "g1", "m2", 0, 3),
        read_mark(230, "c1", "alice", "g1", 3),
        send(300, "c1", "n1", "g1", "alice", "m3", 0),
        ack(310, "c1", "g1", "m3", 0, 4),
        Record::Push {
            t_ms: 320,
            client: "c2".into(),
            user: "bob".into(),
            group: "g1".into(),
            seq: 4,
            from: "alice".into(),
            cmid: Some("m3".into()),
        },
        send(400, "c2", "n2", "g1", "bob", "b1", 0),
        phase(450, phase::FAULT),
        fail(480, "c2", "g1", "b1", 0, "timeout"),
        send(500, "c2", "n1", "g1", "bob", "b1", 1),
        phase(800, phase::HEAL),
        ack(900, "c2", "g1", "b1", 1, 5),
        read_mark(950, "c1", "alice", "g1", 5),
        phase(1000, phase::WORKLOAD_END),
        final_read(1100, "n1", "alice", "g1", g1.clone()),
        final_read(1101, "n2", "bob", "g1", g1),
        final_read(1102, "n1", "bob", "g2", g2.clone()),
        final_read(1103, "n2", "bob", "g2", g2),
    ]
}

/// Replaces the entries of every final read of `group` by `f(entries)`, or only the one via `node`.
fn edit_final(records: &mut [Record], group: &str, node: Option<&str>, f: impl Fn(&mut Vec<FinalEntry>)) {
    for r in records {
        if let Record::FinalRead { group: g, node: n, entries, .. } = r
            && g == group
            && node.is_none_or(|node| node == n)
        {
            f(entries);
        }
    }
}

fn assert_only(v: &Verdict, what: &str) {
    let counts = [
        ("lost", v.lost),
        ("unexpected", v.unexpected),
        ("duplicated", v.duplicated),
        ("reordered", v.reordered),
        ("divergent", v.divergent),
        ("read_regressions", v.read_regressions),
        ("malformed", v.malformed),
    ];
    for (name, n) in counts {
        if name != what {
            assert_eq!(n, 0, "{name} should be 0: {}", v.summary());
        }
    }
    assert!(!v.ok());
    assert!(v.line().starts_with("verdict: violated "), "{}", v.line());
    assert!(!v.details.is_empty());
}

#[test]
fn clean_history_is_ok() {
    let v = check(&clean());
    assert!(v.ok(), "{}", v.summary());
    assert_eq!(v.sends, 5);
    assert_eq!(v.attempts, 6);
    assert_eq!(v.acked, 5);
    assert_eq!(v.failures_by_code, BTreeMap::from([("timeout".to_string(), 1)]));
    assert_eq!(v.pushes, 1);
    assert_eq!(v.read_marks, 2);
    assert_eq!(v.groups, 2);
    assert_eq!(v.final_reads, 4);
    assert!(v.details.is_empty(), "{:?}", v.details);
    assert_eq!(v.line(), "verdict: ok lost=0 unexpected=0 duplicated=0 reordered=0 divergent=0 max_unavailable_ms=840");
    let summary = v.summary();
    assert!(summary.starts_with(&v.line()));
    assert!(summary.contains("840 ms (group g2)"), "{summary}");
}

#[test]
fn empty_history_is_ok() {
    let v = check(&[]);
    assert!(v.ok());
    assert_eq!(v, Verdict::default());
    assert_eq!(v.line(), "verdict: ok lost=0 unexpected=0 duplicated=0 reordered=0 divergent=0 max_unavailable_ms=0");
}

#[test]
fn acked_but_absent_is_lost() {
    let mut h = clean();
    // Without the push of m3, whose changed seq would also count as a divergence.
    h.retain(|r| !matches!(r, Record::Push { .. }));
    // m2 (seq 3) vanished from every read; the following seqs are renumbered to stay contiguous.
    edit_final(&mut h, "g1", None, |e| {
        *e = vec![system(1), entry(2, "alice", "m1"), entry(3, "alice", "m3"), entry(4, "bob", "b1")];
    });
    let v = check(&h);
    // m3 and b1 now sit at other seqs than acknowledged: moved, hence lost too.
    assert_eq!(v.lost, 3, "{}", v.summary());
    assert_eq!(v.moved, 2);
    assert_only(&v, "lost");
    assert!(v.details.iter().any(|d| d.starts_with("lost: group g1 cmid m2 from alice")), "{:?}", v.details);
    assert!(v.line().starts_with("verdict: violated lost=3 unexpected=0 "));
}

#[test]
fn absent_from_one_read_is_lost_and_divergent() {
    let mut h = clean();
    edit_final(&mut h, "g1", Some("n2"), |e| {
        e.pop();
    });
    let v = check(&h);
    assert_eq!(v.lost, 1, "{}", v.summary());
    assert_eq!(v.moved, 0);
    assert_eq!(v.divergent, 1);
    assert_eq!(v.reordered, 0);
    assert!(v.details.iter().any(|d| d.contains("read via n2 as bob; 1 of 2 final reads")), "{:?}", v.details);
}

#[test]
fn acked_at_another_seq_is_lost_as_moved() {
    let mut h = clean();
    // x1 is stored at seq 1 in both reads, but acknowledged at seq 7.
    for r in &mut h {
        if let Record::Ack { cmid, seq, .. } = r
            && cmid == "x1"
        {
            *seq = 7;
        }
    }
    let v = check(&h);
    assert_eq!(v.lost, 1, "{}", v.summary());
    assert_eq!(v.moved, 1);
    assert_only(&v, "lost");
    assert!(v.details.iter().any(|d| d.starts_with("moved: group g2 cmid x1 from bob")), "{:?}", v.details);
}

#[test]
fn group_without_final_read_is_lost() {
    let h: Vec<Record> =
        clean().into_iter().filter(|r| !matches!(r, Record::FinalRead { group, .. } if group == "g2")).collect();
    let v = check(&h);
    assert_eq!(v.lost, 1, "{}", v.summary());
    assert_only(&v, "lost");
    assert!(v.details.iter().any(|d| d.contains("group g2 has no final read")));
}

#[test]
fn same_cmid_at_two_seqs_is_duplicated() {
    let mut h = clean();
    edit_final(&mut h, "g1", None, |e| e.push(entry(6, "alice", "m2")));
    let v = check(&h);
    assert_eq!(v.duplicated, 1, "{}", v.summary());
    assert_only(&v, "duplicated");
    assert!(v.details.iter().any(|d| d.contains("duplicated: group g1 cmid m2 from alice stored at seqs 3, 6")));
}

#[test]
fn gap_is_reordered() {
    let mut h = clean();
    edit_final(&mut h, "g1", None, |e| {
        e.retain(|e| e.seq != 3);
        e.push(entry(6, "alice", "m2"));
    });
    // Seqs 1, 2, 4, 5, 6 in both reads: m2 was moved too.
    let v = check(&h);
    assert_eq!(v.reordered, 2, "{}", v.summary());
    assert_eq!(v.lost, 1);
    assert_eq!(v.moved, 1);
    assert_eq!(v.divergent, 0);

    let mut h = clean();
    edit_final(&mut h, "g2", Some("n1"), |e| {
        *e = vec![entry(1, "bob", "x1"), entry(2, "bob", "x2"), entry(4, "bob", "x4")];
    });
    h.push(send(170, "c2", "n1", "g2", "bob", "x2", 0));
    h.push(send(171, "c2", "n1", "g2", "bob", "x4", 0));
    let v = check(&h);
    assert!(v.reordered >= 1, "{}", v.summary());
    assert!(v.details.iter().any(|d| d.contains("entry 3 has seq 4 (expected 3)")), "{:?}", v.details);
}

#[test]
fn out_of_order_is_reordered() {
    let mut h = clean();
    edit_final(&mut h, "g1", None, |e| e.swap(1, 2));
    let v = check(&h);
    assert_eq!(v.reordered, 2, "{}", v.summary());
    assert_only(&v, "reordered");
}

#[test]
fn differing_reads_are_divergent() {
    let mut h = clean();
    edit_final(&mut h, "g1", Some("n2"), |e| e[0] = entry(1, "carol", "zz"));
    h.push(send(50, "c3", "n3", "g1", "carol", "zz", 0));
    let v = check(&h);
    assert_eq!(v.divergent, 1, "{}", v.summary());
    assert_only(&v, "divergent");
    assert!(v.details.iter().any(|d| d.contains("first difference at entry 1")), "{:?}", v.details);
}

#[test]
fn never_sent_entry_is_unexpected() {
    let mut h = clean();
    edit_final(&mut h, "g2", None, |e| e.push(entry(2, "mallory", "evil")));
    let v = check(&h);
    assert_eq!(v.unexpected, 1, "{}", v.summary());
    assert_only(&v, "unexpected");
    // The right cmid from the wrong sender is unexpected as well.
    let mut h = clean();
    edit_final(&mut h, "g2", None, |e| e.push(entry(2, "mallory", "m1")));
    assert_eq!(check(&h).unexpected, 1);
}

#[test]
fn read_mark_regression_is_detected() {
    let mut h = clean();
    h.push(read_mark(960, "c1", "alice", "g1", 2));
    // Another client's lower position is not a regression.
    h.push(read_mark(970, "c2", "bob", "g1", 1));
    let v = check(&h);
    assert_eq!(v.read_regressions, 1, "{}", v.summary());
    assert_only(&v, "read_regressions");
    assert!(v.line().contains("lost=0 unexpected=0 duplicated=0 reordered=0 divergent=0"));
    assert!(v.details.iter().any(|d| d.starts_with("read regression: client c1 in group g1")));
}

#[test]
fn unavailability_of_a_known_timeline() {
    // Window 1000..=5000. g1 acks at 1200, 1500, 4000: gaps 200, 300, 2500, 1000. g2 has no ack at
    // all: 4000. g3 acks at 500 (before the window, ignored) and 4800: gaps 3800, 200.
    let h = vec![
        phase(1000, phase::WORKLOAD_START),
        send(1100, "c1", "n1", "g1", "u1", "a", 0),
        ack(1200, "c1", "g1", "a", 0, 1),
        send(1300, "c1", "n1", "g1", "u1", "b", 0),
        ack(1500, "c1", "g1", "b", 0, 2),
        send(1600, "c1", "n1", "g1", "u1", "c", 0),
        ack(4000, "c1", "g1", "c", 0, 3),
        send(1100, "c2", "n2", "g2", "u2", "d", 0),
        fail(2100, "c2", "g2", "d", 0, "unavailable"),
        send(400, "c3", "n3", "g3", "u3", "e", 0),
        ack(500, "c3", "g3", "e", 0, 1),
        send(4700, "c3", "n3", "g3", "u3", "f", 0),
        ack(4800, "c3", "g3", "f", 0, 2),
        phase(5000, phase::WORKLOAD_END),
        final_read(6000, "n1", "u1", "g1", vec![entry(1, "u1", "a"), entry(2, "u1", "b"), entry(3, "u1", "c")]),
        final_read(6000, "n1", "u2", "g2", vec![]),
        final_read(6000, "n1", "u3", "g3", vec![entry(1, "u3", "e"), entry(2, "u3", "f")]),
    ];
    let v = check(&h);
    assert!(v.ok(), "{}", v.summary());
    assert_eq!(
        v.unavailable_ms_by_group,
        BTreeMap::from([("g1".to_string(), 2500), ("g2".to_string(), 4000), ("g3".to_string(), 3800)])
    );
    assert_eq!(v.max_unavailable_ms, 4000);
    assert!(v.line().ends_with(" max_unavailable_ms=4000"));

    // Without workload phases the window is first send (400) to last send (4700).
    let h: Vec<Record> = h.into_iter().filter(|r| !matches!(r, Record::Phase { .. })).collect();
    let v = check(&h);
    assert_eq!(
        v.unavailable_ms_by_group,
        BTreeMap::from([("g1".to_string(), 2500), ("g2".to_string(), 4300), ("g3".to_string(), 4200)])
    );
    assert_eq!(v.max_unavailable_ms, 4300);
}

#[test]
fn inconsistent_records_are_malformed_not_panics() {
    let mut h = clean();
    h.push(ack(990, "c9", "g1", "ghost", 0, 99));
    h.push(send(995, "c1", "n1", "g2", "alice", "m1", 3));
    h.push(phase(1200, phase::WORKLOAD_START));
    h.push(final_read(1300, "n3", "eve", "g3", vec![]));
    let v = check(&h);
    assert_eq!(v.malformed, 2, "{}", v.summary());
    // The ghost ack (seq 99) is in no final read: lost.
    assert_eq!(v.lost, 1);
    assert!(!v.ok());
    assert!(v.details.iter().any(|d| d.contains("without a send")), "{:?}", v.details);

    // Workload end before its start.
    let v = check(&[phase(10, phase::WORKLOAD_END), phase(20, phase::WORKLOAD_START)]);
    assert_eq!(v.malformed, 1);
    assert!(v.unavailable_ms_by_group.is_empty());
}

#[test]
fn details_are_capped() {
    let mut h = Vec::new();
    for i in 0..200 {
        let cmid = format!("m{i}");
        h.push(send(i, "c1", "n1", "g1", "u1", &cmid, 0));
        h.push(ack(i + 1, "c1", "g1", &cmid, 0, i + 1));
    }
    h.push(final_read(1000, "n1", "u1", "g1", vec![]));
    let v = check(&h);
    assert_eq!(v.lost, 200);
    assert_eq!(v.details.len(), MAX_DETAILS);
    assert_eq!(v.details.last().map(String::as_str), Some("... and 151 more"));
}

/// A small deterministic generator (SplitMix64), enough to shuffle.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

#[test]
fn record_order_does_not_change_the_verdict() {
    let mut histories = vec![clean()];
    let mut h = clean();
    edit_final(&mut h, "g1", Some("n2"), |e| {
        e.pop();
        e.push(entry(5, "alice", "m1"));
    });
    h.push(read_mark(960, "c1", "alice", "g1", 2));
    h.push(read_mark(960, "c1", "alice", "g1", 4));
    h.push(ack(990, "c9", "g1", "ghost", 0, 99));
    h.push(fail(1000, "c1", "g2", "x", 0, "closed"));
    histories.push(h);

    for (i, h) in histories.iter().enumerate() {
        let expected = check(h);
        if i > 0 {
            assert!(!expected.ok());
        }
        let mut rng = Mix(i as u64 + 1);
        for _ in 0..50 {
            let mut shuffled = h.clone();
            rng.shuffle(&mut shuffled);
            assert_eq!(check(&shuffled), expected);
        }
    }
}

fn temp_path(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    std::env::temp_dir().join(format!("convoy-chaos-{name}-{}-{nanos}.jsonl", std::process::id()))
}

#[test]
fn history_round_trips_through_a_file() {
    let path = temp_path("round-trip");
    let h = clean();
    write_history(&path, &h).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), h.len());
    assert!(text.starts_with(r#"{"kind":"phase","t_ms":0,"name":"workload_start","detail":""}"#), "{text}");
    assert!(text.contains(r#"{"kind":"read_mark","t_ms":230,"client":"c1","user":"alice","group":"g1","seq":3}"#));
    assert_eq!(read_history(&path).unwrap(), h);
    std::fs::remove_file(&path).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_is_shared_by_tasks() {
    let path = temp_path("tasks");
    let writer = Arc::new(HistoryWriter::create(&path).unwrap());
    let mut tasks = Vec::new();
    for c in 0..8 {
        let writer = writer.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..250 {
                let t = writer.t_ms();
                writer.record(&send(t, &format!("c{c}"), "n1", "g1", "u", &format!("m{c}-{i}"), 0));
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(writer.finish().unwrap(), 2000);
    let records = read_history(&path).unwrap();
    assert_eq!(records.len(), 2000);
    assert_eq!(check(&records).sends, 2000);
    std::fs::remove_file(&path).ok();
}

#[test]
fn malformed_line_names_its_number() {
    let text = concat!(
        r#"{"kind":"phase","t_ms":0,"name":"workload_start","detail":""}"#,
        "\n\n",
        r#"{"kind":"ack","t_ms":5,"client":"c1","group":"g1","cmid":"m1","attempt":0,"duplicate":false}"#,
        "\n",
    );
    let err = read_history_from(Cursor::new(text), "h.jsonl").unwrap_err();
    assert_eq!(err.line(), Some(3));
    let msg = err.to_string();
    assert!(msg.starts_with("h.jsonl: line 3, column "), "{msg}");
    assert!(msg.contains("missing field `seq`"), "{msg}");

    let err = read_history_from(Cursor::new("{\"kind\":\"ack\"\n"), "h").unwrap_err();
    assert_eq!(err.line(), Some(1));
    let err = read_history_from(Cursor::new("\n{\"kind\":\"teleport\",\"t_ms\":1}"), "h").unwrap_err();
    assert_eq!(err.line(), Some(2));
    assert!(err.to_string().contains("unknown variant `teleport`"), "{err}");
    let err = read_history_from(Cursor::new("not json\n"), "h").unwrap_err();
    assert_eq!(err.line(), Some(1));

    // Through a file too.
    let path = temp_path("malformed");
    std::fs::write(&path, text).unwrap();
    let err = read_history(&path).unwrap_err();
    assert_eq!(err.line(), Some(3));
    assert!(err.to_string().contains(&path.display().to_string()));
    std::fs::remove_file(&path).ok();

    assert!(matches!(read_history(temp_path("missing")), Err(HistoryError::Open { .. })));
}

#[test]
fn reading_accepts_crlf_and_no_trailing_newline() {
    let text = "{\"kind\":\"phase\",\"t_ms\":0,\"name\":\"fault\",\"detail\":\"kill n2\"}\r\n{\"kind\":\"push\",\"t_ms\":3,\"client\":\"c1\",\"user\":\"u\",\"group\":\"g\",\"seq\":1,\"from\":\"v\",\"cmid\":null}";
    let records = read_history_from(Cursor::new(text), "h").unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].kind(), "phase");
    assert_eq!(records[1].t_ms(), 3);
    assert_eq!(records[1].group(), Some("g"));
}

#[test]
fn a_pushed_entry_the_log_lost_is_divergent() {
    let mut records = clean();
    // Bob was pushed alice's m3 at seq 4; the final log holds something else there.
    edit_final(&mut records, "g1", None, |entries| entries[3] = entry(4, "alice", "m9"));
    let v = check(&records);
    assert!(v.divergent >= 1, "{v:?}");
    assert!(v.details.iter().any(|d| d.contains("was pushed seq 4")), "{:?}", v.details);
    assert!(!v.ok());
    assert!(check(&clean()).ok(), "the clean history stays ok");
}
