//! Receipt deadlines: `require_receipt` messages unread after `receipt_timeout` get exactly one
//! `receipt_overdue` system entry, also across kill -9.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use convoy_tests::*;
use serde_json::Value;

/// The `receipt_overdue` entries of `group`.
async fn overdue_entries(client: &Client, group: &str) -> Vec<Value> {
    sync_all(client, group, 0, 500)
        .await
        .into_iter()
        .filter(|e| e["body"]["type"] == "system" && e["body"]["event"] == "receipt_overdue")
        .collect()
}

fn pending_of(entry: &Value) -> BTreeSet<String> {
    entry["body"]["pending"]
        .as_array()
        .unwrap_or_else(|| panic!("receipt_overdue without a pending list: {entry}"))
        .iter()
        .map(|u| u.as_str().expect("pending users are strings").to_string())
        .collect()
}

/// Waits until `group` has at least one `receipt_overdue` entry, up to `timeout`.
async fn wait_for_overdue(client: &Client, group: &str, timeout: Duration) -> bool {
    wait_until(timeout, || async { !overdue_entries(client, group).await.is_empty() }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_receipts_become_overdue_exactly_once() {
    let node = Node::start(NodeOptions::new().set("timeouts.receipt_timeout", "1s"));
    let (a, b, c) = (unique("a"), unique("b"), unique("c"));
    let ac = connect(&node, &a, &["dispatcher"]).await;
    let bc = connect(&node, &b, &["driver"]).await;
    let cc = connect(&node, &c, &["customer"]).await;
    let mut b_events = bc.events().unwrap();
    let members = || vec![Member::new(&b, "driver"), Member::new(&c, "customer")];
    let (unread, all_read, no_receipt) = (unique("unread"), unique("allread"), unique("noreceipt"));
    for g in [&unread, &all_read, &no_receipt] {
        open_group(&ac, g, members()).await;
    }

    // `unread`: B reads, C does not.
    let sent = Instant::now();
    let s = ac.msg_send(&unread, "rr-1", text("please confirm"), true).await.unwrap().seq;
    bc.msg_read(&unread, s).await.unwrap();
    // `all_read`: everyone reads well before the deadline.
    let t = ac.msg_send(&all_read, "rr-2", text("please confirm"), true).await.unwrap().seq;
    bc.msg_read(&all_read, t).await.unwrap();
    cc.msg_read(&all_read, t).await.unwrap();
    // `no_receipt`: nobody reads, but no receipt was asked for.
    ac.msg_send(&no_receipt, "plain", text("fyi"), false).await.unwrap();

    assert!(wait_for_overdue(&ac, &unread, Duration::from_secs(10)).await, "no receipt_overdue within 10 s");
    let fired_after = sent.elapsed();
    assert!(fired_after >= Duration::from_millis(900), "receipt_overdue after {fired_after:?}, before the 1 s timeout");
    let entries = overdue_entries(&bc, &unread).await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["body"]["seq"], s, "{}", entries[0]);
    assert_eq!(pending_of(&entries[0]), BTreeSet::from([c.clone()]), "only C has not read: {}", entries[0]);
    // The entry is pushed like any other.
    let pushed = next_event(&mut b_events, Duration::from_secs(5), |ev| {
        ev["ev"] == "msg" && ev["group"] == unread.as_str() && ev["body"]["event"] == "receipt_overdue"
    })
    .await;
    assert!(pushed.is_some(), "receipt_overdue entry was not pushed to members");

    // Past every deadline by a wide margin: still exactly one entry, and none elsewhere.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(overdue_entries(&ac, &unread).await.len(), 1, "receipt_overdue fired more than once");
    assert!(overdue_entries(&ac, &all_read).await.is_empty(), "a message read by everyone became overdue");
    assert!(overdue_entries(&ac, &no_receipt).await.is_empty(), "a message without require_receipt became overdue");
    // Reading late does not add anything either.
    cc.msg_read(&unread, s).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(overdue_entries(&ac, &unread).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipt_watches_survive_kill9_and_fire_once() {
    const TIMEOUT: Duration = Duration::from_secs(3);
    let mut node = Node::start(NodeOptions::new().set("timeouts.receipt_timeout", "3s"));
    let (a, b) = (unique("a"), unique("b"));
    let (early, late) = (unique("early"), unique("late"));
    let ac = connect(&node, &a, &["dispatcher"]).await;
    open_group(&ac, &early, drivers(&[&b])).await;
    open_group(&ac, &late, drivers(&[&b])).await;

    // `early` is due while the node is down; `late` is due after it is back.
    let early_sent = Instant::now();
    let early_seq = ac.msg_send(&early, "rr-early", text("confirm"), true).await.unwrap().seq;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let late_seq = ac.msg_send(&late, "rr-late", text("confirm"), true).await.unwrap().seq;
    drop(ac);
    node.kill9();
    // Stay down past `early`'s deadline (but not `late`'s).
    let down_until = early_sent + TIMEOUT + Duration::from_millis(500);
    tokio::time::sleep(down_until.saturating_duration_since(Instant::now())).await;
    node.restart();

    let ac = connect(&node, &a, &["dispatcher"]).await;
    for (g, seq) in [(&early, early_seq), (&late, late_seq)] {
        assert!(wait_for_overdue(&ac, g, Duration::from_secs(15)).await, "{g}: the watch did not fire after restart");
        let entries = overdue_entries(&ac, g).await;
        assert_eq!(entries.len(), 1, "{g}: {entries:?}");
        assert_eq!(entries[0]["body"]["seq"], seq, "{g}: {}", entries[0]);
        assert_eq!(pending_of(&entries[0]), BTreeSet::from([b.clone()]), "{g}: {}", entries[0]);
    }

    // Once fired, a watch stays fired: another crash and restart add nothing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(ac);
    node.kill9();
    node.restart();
    let ac = connect(&node, &a, &["dispatcher"]).await;
    tokio::time::sleep(TIMEOUT / 2).await;
    for g in [&early, &late] {
        assert_eq!(overdue_entries(&ac, g).await.len(), 1, "{g}: receipt_overdue fired again after a restart");
    }
}
