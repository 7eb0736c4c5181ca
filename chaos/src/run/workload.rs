//! The workload of a chaos run: exception groups whose members are connected to different
//! nodes, every member sending at a steady pace with unique `client_msg_id`s, retrying with
//! the same id after timeouts and `unavailable`, marking the group read now and then, and
//! every attempt, answer and pushed event written to the history.
//!
//! A member whose connection dies (its node was killed) reconnects, to its own node first and
//! then to the others, like a real client would.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::check::history::{FinalEntry, HistoryWriter, Record};
use crate::client::{Client, ClientError, ClientOptions, GroupOpen, Member};
use crate::token::{Claims, mint};

/// One member of one group: a user with its own connection.
#[derive(Debug, Clone)]
pub struct Seat {
    pub client: String,
    pub user: String,
    pub group: String,
    /// Index of the node it prefers.
    pub home: usize,
}

/// What the workload needs to know about the cluster.
#[derive(Clone)]
pub struct Target {
    pub secret: String,
    pub node_names: Vec<String>,
    pub client_urls: Vec<String>,
}

impl Target {
    fn token(&self, user: &str) -> String {
        mint(self.secret.as_bytes(), &Claims::new(user, ["driver", "dispatcher"], Duration::from_secs(24 * 3600)))
    }

    /// Connects `user` to node `home`, or to the next node that answers; (client, node index).
    async fn connect(&self, user: &str, home: usize, timeout: Duration) -> Result<(Client, usize), ClientError> {
        let opts =
            ClientOptions { request_timeout: timeout, connect_timeout: Duration::from_secs(2), ..Default::default() };
        let mut last = None;
        for k in 0..self.client_urls.len() {
            let i = (home + k) % self.client_urls.len();
            match Client::connect(&self.client_urls[i], opts.clone()).await {
                Ok(c) => match c.hello(&self.token(user), "chaos").await {
                    Ok(_) => return Ok((c, i)),
                    Err(e) => last = Some(e),
                },
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(ClientError::Timeout))
    }
}

/// The clock of the run: milliseconds since it started.
#[derive(Clone, Copy)]
pub struct Clock(pub Instant);

impl Clock {
    pub fn ms(&self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }
}

/// Seats for `groups` groups of `members`, spread over `nodes` nodes.
pub fn seats(run_id: &str, groups: usize, members: usize, nodes: usize) -> Vec<Vec<Seat>> {
    (0..groups)
        .map(|g| {
            (0..members)
                .map(|m| Seat {
                    client: format!("c{g}.{m}"),
                    user: format!("{run_id}-u{g}-{m}"),
                    group: format!("{run_id}-g{g}"),
                    home: (g + m) % nodes,
                })
                .collect()
        })
        .collect()
}

/// Opens every group (retrying while the cluster elects leaders), each by its first member.
pub async fn open_groups(target: &Target, groups: &[Vec<Seat>], deadline: Instant) -> Result<(), String> {
    for seats in groups {
        let opener = &seats[0];
        let open = GroupOpen::chat(
            opener.group.clone(),
            seats[1..].iter().map(|s| Member::new(s.user.clone(), "driver")).collect(),
        );
        loop {
            let result = match target.connect(&opener.user, opener.home, Duration::from_secs(5)).await {
                Ok((c, _)) => c.group_open(&open).await.map(|_| ()),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => break,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(group = %opener.group, error = %e, "group.open failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(format!("cannot open {}: {e}", opener.group)),
            }
        }
    }
    Ok(())
}

/// Shared counters for the live table.
#[derive(Default)]
pub struct Progress {
    pub attempts: AtomicU64,
    pub acks: AtomicU64,
    pub failures: AtomicU64,
    pub reconnects: AtomicU64,
}

/// One member's part in the workload.
pub struct MemberRun {
    pub seat: Seat,
    pub target: Target,
    /// Time between two new sends.
    pub interval: Duration,
    pub send_timeout: Duration,
    pub read_every: u32,
    pub history: Arc<HistoryWriter>,
    pub clock: Clock,
    pub stop: Arc<AtomicBool>,
    pub progress: Arc<Progress>,
}

/// Runs one member until `stop`: sends every `interval`, one at a time, each until acked.
pub async fn member(run: MemberRun) {
    let MemberRun { seat, target, interval, send_timeout, read_every, history, clock, stop, progress } = run;
    let mut conn: Option<(Client, usize)> = None;
    let mut n: u64 = 0;
    let mut acks_since_read = 0;
    let reading = Arc::new(AtomicBool::new(false));
    let mut next = Instant::now() + interval.mul_f64(rand::random::<f64>());
    'sends: while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep_until(next.into()).await;
        next += interval;
        n += 1;
        let cmid = format!("{}-{n}", seat.client);
        let mut attempt = 0u32;
        // Until acked: once the workload stops, an unacked send is abandoned (its fate is
        // whatever the final reads show; an abandoned send may or may not be stored).
        loop {
            if stop.load(Ordering::Relaxed) && attempt > 0 {
                break 'sends;
            }
            let (client, node) = match &conn {
                Some((c, i)) if !c.is_closed() => (c.clone(), *i),
                _ => match target.connect(&seat.user, seat.home, send_timeout).await {
                    Ok((c, i)) => {
                        progress.reconnects.fetch_add(1, Ordering::Relaxed);
                        spawn_push_recorder(&c, &seat, history.clone(), clock);
                        conn = Some((c.clone(), i));
                        (c, i)
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        if stop.load(Ordering::Relaxed) {
                            break 'sends;
                        }
                        continue;
                    }
                },
            };
            history.record(&Record::Send {
                t_ms: clock.ms(),
                client: seat.client.clone(),
                node: target.node_names[node].clone(),
                group: seat.group.clone(),
                user: seat.user.clone(),
                cmid: cmid.clone(),
                attempt,
            });
            progress.attempts.fetch_add(1, Ordering::Relaxed);
            let body = json!({"type": "text", "text": format!("{} says {n}", seat.user)});
            match client.msg_send(&seat.group, &cmid, body, false).await {
                Ok(sent) => {
                    history.record(&Record::Ack {
                        t_ms: clock.ms(),
                        client: seat.client.clone(),
                        group: seat.group.clone(),
                        cmid: cmid.clone(),
                        attempt,
                        seq: sent.seq,
                        duplicate: sent.duplicate,
                    });
                    progress.acks.fetch_add(1, Ordering::Relaxed);
                    acks_since_read += 1;
                    // Read marks run beside the sends, one at a time, as a client's UI would:
                    // a slow read must not hold back writes (nor their measured availability).
                    if acks_since_read >= read_every && !reading.swap(true, Ordering::AcqRel) {
                        acks_since_read = 0;
                        let (client, seat, history, reading) =
                            (client.clone(), seat.clone(), history.clone(), reading.clone());
                        tokio::spawn(async move {
                            mark_read(&client, &seat, sent.seq, &history, clock).await;
                            reading.store(false, Ordering::Release);
                        });
                    }
                    break;
                }
                Err(e) => {
                    history.record(&Record::Fail {
                        t_ms: clock.ms(),
                        client: seat.client.clone(),
                        group: seat.group.clone(),
                        cmid: cmid.clone(),
                        attempt,
                        code: e.code().to_string(),
                    });
                    progress.failures.fetch_add(1, Ordering::Relaxed);
                    attempt += 1;
                    if matches!(e, ClientError::Timeout) || client.is_closed() {
                        // A request lost in a dead or stuck node: use a fresh connection.
                        conn = None;
                    }
                    let pause = e.retry_after().unwrap_or(Duration::from_millis(100)).min(Duration::from_secs(1));
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
    if let Some((c, _)) = conn {
        c.close().await;
    }
}

/// Marks `seq` read and records the read position the server then reports.
async fn mark_read(client: &Client, seat: &Seat, seq: u64, history: &HistoryWriter, clock: Clock) {
    if client.msg_read(&seat.group, seq).await.is_err() {
        return;
    }
    if let Ok(groups) = client.inbox_sync().await
        && let Some(g) = groups.iter().find(|g| g.group == seat.group)
    {
        history.record(&Record::ReadMark {
            t_ms: clock.ms(),
            client: seat.client.clone(),
            user: seat.user.clone(),
            group: seat.group.clone(),
            seq: g.read_seq,
        });
    }
}

fn spawn_push_recorder(client: &Client, seat: &Seat, history: Arc<HistoryWriter>, clock: Clock) {
    let Some(mut events) = client.events() else { return };
    let (name, user) = (seat.client.clone(), seat.user.clone());
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if ev["ev"] != "msg" {
                continue;
            }
            history.record(&Record::Push {
                t_ms: clock.ms(),
                client: name.clone(),
                user: user.clone(),
                group: ev["group"].as_str().unwrap_or_default().to_string(),
                seq: ev["seq"].as_u64().unwrap_or(0),
                from: ev["from"].as_str().unwrap_or_default().to_string(),
                cmid: ev["client_msg_id"].as_str().map(str::to_string),
            });
        }
    });
}

/// Reads the whole log of `seat.group` as `seat.user` through node `node`, retrying
/// retryable failures until `deadline`.
pub async fn final_read(
    target: &Target,
    seat: &Seat,
    node: usize,
    deadline: Instant,
) -> Result<Vec<FinalEntry>, String> {
    loop {
        match read_all(target, seat, node).await {
            Ok(entries) => return Ok(entries),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(group = %seat.group, node, error = %e, "final read failed; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => {
                return Err(format!(
                    "{} could not read {} through {}: {e}",
                    seat.user, seat.group, target.node_names[node]
                ));
            }
        }
    }
}

async fn read_all(target: &Target, seat: &Seat, node: usize) -> Result<Vec<FinalEntry>, ClientError> {
    let opts = ClientOptions { request_timeout: Duration::from_secs(10), ..Default::default() };
    let client = Client::connect(&target.client_urls[node], opts).await?;
    client.hello(&target.token(&seat.user), "chaos-final").await?;
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = client.msg_sync(&seat.group, after, 500).await?;
        let Some(last) = page.messages.last() else { break };
        after = last["seq"].as_u64().unwrap_or(after + 1);
        out.extend(page.messages.iter().map(entry_of));
        if after >= page.last_seq {
            break;
        }
    }
    client.close().await;
    Ok(out)
}

fn entry_of(m: &Value) -> FinalEntry {
    FinalEntry {
        seq: m["seq"].as_u64().unwrap_or(0),
        from: m["from"].as_str().unwrap_or_default().to_string(),
        cmid: m["client_msg_id"].as_str().map(str::to_string),
        system: m["body"]["type"] == "system",
    }
}
