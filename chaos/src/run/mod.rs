//! `convoy-chaos up`, `down` and `run`: launch a local cluster, drive the workload, inject a
//! scenario's faults on its timeline, heal, read everything back from every node, and check.

pub mod cluster;
pub mod netns;
pub mod scenario;
pub mod workload;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cluster::{LaunchOptions, LocalCluster};
use scenario::{Action, FaultSpec, Scenario};
use workload::{Clock, Progress, Target};

use crate::check::history::{HistoryWriter, Record};
use crate::check::{Verdict, check};

/// How long the final reads may keep retrying after healing.
const FINAL_READ_DEADLINE: Duration = Duration::from_secs(90);

/// What `run` needs besides the scenario.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub convoy: PathBuf,
    /// Where the cluster, the history and the report go.
    pub dir: PathBuf,
    pub base_port: u16,
    pub seed: u64,
    /// Keep the cluster running after the run (for inspection); `convoy-chaos down` removes it.
    pub keep: bool,
    /// No live table (CI logs).
    pub quiet: bool,
    /// Run against a cluster started elsewhere: (an admin URL, the cluster's client secret).
    pub attach: Option<(String, String)>,
}

/// Everything a run produced.
pub struct Outcome {
    pub verdict: Verdict,
    /// Snapshots the nodes installed from a leader during the run.
    pub snapshots_installed: u64,
    /// The scenario's expectations the run did not meet (see [`scenario::ExpectSpec`]).
    pub unmet: Vec<String>,
    pub history: PathBuf,
    pub report: PathBuf,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The live state of the cluster during a run: what is down, paused or cut.
struct Chaos {
    cluster: LocalCluster,
    convoy: PathBuf,
    http: reqwest::Client,
    token: String,
    paused: BTreeSet<usize>,
    cut: BTreeSet<(usize, usize)>,
    history: Arc<HistoryWriter>,
    clock: Clock,
    first_group: String,
    /// Snapshot installs counted so far (each node's counter is read before it goes away).
    snapshots_installed: u64,
}

impl Chaos {
    fn phase(&self, name: &str, detail: String) {
        tracing::info!(phase = name, "{detail}");
        self.history.record(&Record::Phase { t_ms: self.clock.ms(), name: name.into(), detail });
    }

    /// Asks each running node in turn for `path` on its admin API.
    async fn admin_get(&self, path: &str) -> Option<serde_json::Value> {
        for (i, node) in self.cluster.nodes.iter().enumerate() {
            if !self.cluster.is_running(i) || self.paused.contains(&i) {
                continue;
            }
            let req = self.http.get(format!("{}{path}", node.admin_url)).bearer_auth(&self.token);
            if let Ok(r) = req.send().await
                && r.status().is_success()
                && let Ok(v) = r.json::<serde_json::Value>().await
            {
                return Some(v);
            }
        }
        None
    }

    async fn admin_post(&self, i: usize, path: &str) -> Result<(), Error> {
        let node = &self.cluster.nodes[i];
        let r = self.http.post(format!("{}{path}", node.admin_url)).bearer_auth(&self.token).send().await?;
        if !r.status().is_success() {
            let status = r.status();
            return Err(format!("{} {path}: {status} {}", node.name, r.text().await.unwrap_or_default()).into());
        }
        Ok(())
    }

    /// Resolves a fault target to node indexes, asking the cluster where the first group lives.
    async fn resolve(&self, target: &str) -> Result<Vec<usize>, Error> {
        match target {
            "all" => Ok((0..self.cluster.nodes.len()).collect()),
            "leader" | "follower" => {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    if let Some(v) = self.admin_get(&format!("/v1/entities/group/{}", self.first_group)).await
                        && let Some(leader) = v["leader"].as_str().and_then(|l| self.cluster.index_of(l))
                    {
                        if target == "leader" {
                            return Ok(vec![leader]);
                        }
                        let replicas: Vec<usize> = v["replicas"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|r| r.as_str().and_then(|r| self.cluster.index_of(r)))
                            .filter(|&r| r != leader)
                            .collect();
                        if let Some(&f) = replicas.first() {
                            return Ok(vec![f]);
                        }
                    }
                    if Instant::now() > deadline {
                        return Err(format!("no {target} of {}'s shard found within 10 s", self.first_group).into());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            name => Ok(vec![self.cluster.index_of(name).ok_or_else(|| format!("no node named {name}"))?]),
        }
    }

    /// The node pairs a partition cuts.
    fn partition_cuts(&self, f: &FaultSpec, target: usize) -> BTreeSet<(usize, usize)> {
        let n = self.cluster.nodes.len();
        let pair = |a: usize, b: usize| (a.min(b), a.max(b));
        let mut cuts = BTreeSet::new();
        if let Some(sides) = &f.sides {
            let idx: Vec<Vec<usize>> =
                sides.iter().map(|s| s.iter().filter_map(|name| self.cluster.index_of(name)).collect()).collect();
            for (i, a) in idx.iter().enumerate() {
                for b in &idx[i + 1..] {
                    for &x in a {
                        for &y in b {
                            cuts.insert(pair(x, y));
                        }
                    }
                }
            }
            return cuts;
        }
        match f.shape.as_deref() {
            Some("bridge") => {
                let others: Vec<usize> = (0..n).filter(|&i| i != target).collect();
                let (left, right) = others.split_at(others.len() / 2);
                for &a in left {
                    for &b in right {
                        cuts.insert(pair(a, b));
                    }
                }
            }
            Some("ring") => {
                for a in 0..n {
                    for b in a + 1..n {
                        let neighbours = b == a + 1 || (a == 0 && b == n - 1);
                        if !neighbours {
                            cuts.insert(pair(a, b));
                        }
                    }
                }
            }
            _ => {
                for b in (0..n).filter(|&b| b != target) {
                    cuts.insert(pair(target, b));
                }
            }
        }
        cuts
    }

    async fn apply_cuts(&mut self, cuts: BTreeSet<(usize, usize)>) -> Result<(), Error> {
        if self.cluster.netns {
            netns::cut(&cuts)?;
        } else {
            for &(a, b) in &cuts {
                let (na, nb) = (self.cluster.nodes[a].name.clone(), self.cluster.nodes[b].name.clone());
                self.admin_post(a, &format!("/v1/chaos/peers/{nb}/drop")).await?;
                self.admin_post(b, &format!("/v1/chaos/peers/{na}/drop")).await?;
            }
        }
        self.cut.extend(cuts);
        Ok(())
    }

    async fn heal_partitions(&mut self) -> Result<(), Error> {
        if self.cut.is_empty() {
            return Ok(());
        }
        if self.cluster.netns {
            netns::heal(self.cluster.nodes.len())?;
        } else {
            let touched: BTreeSet<usize> = self.cut.iter().flat_map(|&(a, b)| [a, b]).collect();
            for i in touched {
                if self.cluster.is_running(i) {
                    self.admin_post(i, "/v1/chaos/peers/heal").await?;
                }
            }
        }
        self.cut.clear();
        Ok(())
    }

    /// Adds node `i`'s count of installed snapshots. Called once per node process, just
    /// before it dies (its counters die with it) or at the end of the run.
    async fn tally_snapshots(&mut self, i: usize) {
        if !self.cluster.is_running(i) || self.paused.contains(&i) {
            return;
        }
        let url = format!("{}/metrics", self.cluster.nodes[i].admin_url);
        if let Ok(r) = self.http.get(url).timeout(Duration::from_secs(2)).send().await
            && let Ok(text) = r.text().await
        {
            let n = crate::metrics::sum_metric(&text, "convoy_snapshots_installed_total").unwrap_or(0.0);
            self.snapshots_installed += n as u64;
        }
    }

    /// Kills `nodes` after reading their counters.
    async fn kill_counted(&mut self, nodes: &[usize]) -> Result<(), Error> {
        for &i in nodes {
            self.tally_snapshots(i).await;
        }
        self.kill(nodes).await
    }

    async fn kill(&mut self, nodes: &[usize]) -> Result<(), Error> {
        for &i in nodes {
            self.paused.remove(&i);
            self.cluster.kill9(i).await?;
        }
        Ok(())
    }

    async fn restart(&mut self, nodes: &[usize]) -> Result<(), Error> {
        Ok(self.cluster.restart(nodes, &self.convoy).await?)
    }

    /// Applies one fault; returns what undoes it, if anything.
    async fn apply(&mut self, f: &FaultSpec) -> Result<Option<Undo>, Error> {
        let nodes = self.resolve(&f.target).await?;
        let names: Vec<String> = nodes.iter().map(|&i| self.cluster.nodes[i].name.clone()).collect();
        self.phase("fault", format!("{:?} {}", f.action, names.join(",")));
        Ok(match f.action {
            Action::Kill => {
                self.kill_counted(&nodes).await?;
                f.duration.map(|_| Undo::Restart(nodes))
            }
            Action::Stop => {
                for &i in &nodes {
                    self.tally_snapshots(i).await;
                    self.paused.remove(&i);
                    self.cluster.stop(i, Duration::from_secs(30)).await?;
                }
                f.duration.map(|_| Undo::Restart(nodes))
            }
            Action::Restart => {
                self.restart(&nodes).await?;
                None
            }
            Action::Pause => {
                for &i in &nodes {
                    self.cluster.signal(i, libc::SIGSTOP)?;
                    self.paused.insert(i);
                }
                f.duration.map(|_| Undo::Resume(nodes))
            }
            Action::Resume => {
                self.resume(&nodes)?;
                None
            }
            Action::Flap => {
                let (times, every) = (f.times.unwrap_or(1), f.every.unwrap_or(Duration::from_secs(2)));
                for _ in 0..times {
                    self.kill_counted(&nodes).await?;
                    tokio::time::sleep(every / 2).await;
                    self.restart(&nodes).await?;
                    tokio::time::sleep(every / 2).await;
                }
                None
            }
            Action::Partition => {
                let cuts = self.partition_cuts(f, nodes[0]);
                let shown: Vec<String> = cuts
                    .iter()
                    .map(|&(a, b)| format!("{}-{}", self.cluster.nodes[a].name, self.cluster.nodes[b].name))
                    .collect();
                self.phase("fault", format!("cut {}", shown.join(" ")));
                self.apply_cuts(cuts).await?;
                f.duration.map(|_| Undo::Heal)
            }
            Action::Heal => {
                self.heal_partitions().await?;
                None
            }
            Action::PowerLoss => {
                let all: Vec<usize> = (0..self.cluster.nodes.len()).collect();
                for &i in &all {
                    self.tally_snapshots(i).await;
                }
                for &i in &all {
                    self.cluster.signal(i, libc::SIGKILL).ok();
                }
                self.kill(&all).await?;
                Some(Undo::Restart(all))
            }
            Action::StorageFail | Action::StorageStall => {
                let what = if f.action == Action::StorageFail { "fail" } else { "stall" };
                for &i in &nodes {
                    self.admin_post(i, &format!("/v1/chaos/storage/{what}")).await?;
                }
                f.duration.map(|_| Undo::Storage(nodes))
            }
            Action::Delay => {
                let ms = f.delay_ms.unwrap_or(100);
                for &i in &nodes {
                    for peer in (0..self.cluster.nodes.len()).filter(|&p| p != i) {
                        let name = self.cluster.nodes[peer].name.clone();
                        self.admin_post(i, &format!("/v1/chaos/peers/{name}/delay?ms={ms}")).await?;
                    }
                }
                f.duration.map(|_| Undo::PeersHeal(nodes))
            }
        })
    }

    /// Shards that hit a failed write start again by themselves, but a node whose metadata
    /// group did must restart (see docs/operations.md, "Fault injection"): restart such a
    /// node, as an operator would.
    async fn restart_if_stopped(&mut self, i: usize) -> Result<(), Error> {
        let node = &self.cluster.nodes[i];
        let r = self.http.get(format!("{}/v1/chaos", node.admin_url)).bearer_auth(&self.token).send().await?;
        let faults: serde_json::Value = r.json().await?;
        if faults["storage"]["restart_needed"] == true {
            self.phase("heal", format!("restarting {}: its metadata group stopped on a failed write", node.name));
            self.kill_counted(&[i]).await?;
            self.restart(&[i]).await?;
        }
        Ok(())
    }

    fn resume(&mut self, nodes: &[usize]) -> Result<(), Error> {
        for &i in nodes {
            if self.paused.remove(&i) {
                self.cluster.signal(i, libc::SIGCONT)?;
            }
        }
        Ok(())
    }

    async fn undo(&mut self, undo: Undo) -> Result<(), Error> {
        self.phase("heal", format!("{undo:?}"));
        match undo {
            Undo::Restart(nodes) => self.restart(&nodes).await,
            Undo::Resume(nodes) => self.resume(&nodes),
            Undo::Heal => self.heal_partitions().await,
            Undo::Storage(nodes) => {
                for i in nodes {
                    self.admin_post(i, "/v1/chaos/storage/heal").await?;
                    self.restart_if_stopped(i).await?;
                }
                Ok(())
            }
            Undo::PeersHeal(nodes) => {
                for i in nodes {
                    self.admin_post(i, "/v1/chaos/peers/heal").await?;
                }
                Ok(())
            }
        }
    }

    /// Undoes everything still in force: resume, heal, restart what is down.
    async fn heal_all(&mut self) -> Result<(), Error> {
        let paused: Vec<usize> = self.paused.iter().copied().collect();
        self.resume(&paused)?;
        self.heal_partitions().await?;
        for i in 0..self.cluster.nodes.len() {
            if self.cluster.is_running(i) {
                // Storage and delay faults are per node; healing them is idempotent.
                let _ = self.admin_post(i, "/v1/chaos/storage/heal").await;
                let _ = self.admin_post(i, "/v1/chaos/peers/heal").await;
                self.restart_if_stopped(i).await?;
            }
        }
        let down: Vec<usize> = (0..self.cluster.nodes.len()).filter(|&i| !self.cluster.is_running(i)).collect();
        self.restart(&down).await?;
        for i in 0..self.cluster.nodes.len() {
            self.cluster.wait_ready(i).await?;
        }
        Ok(())
    }
}

#[derive(Debug)]
enum Undo {
    Restart(Vec<usize>),
    Resume(Vec<usize>),
    Heal,
    Storage(Vec<usize>),
    PeersHeal(Vec<usize>),
}

/// Runs `scenario` on a freshly launched cluster in `opts.dir`.
pub async fn run(scenario: &Scenario, opts: &RunOptions) -> Result<Outcome, Error> {
    std::fs::create_dir_all(&opts.dir)?;
    let launch = LaunchOptions {
        nodes: scenario.cluster.nodes,
        dir: opts.dir.join("cluster"),
        convoy: opts.convoy.clone(),
        netns: scenario.cluster.netns,
        base_port: opts.base_port,
        config: scenario.cluster.config.clone(),
    };
    let cluster = match &opts.attach {
        Some((admin, secret)) => {
            let process = [
                Action::Kill,
                Action::Stop,
                Action::Restart,
                Action::Pause,
                Action::Resume,
                Action::Flap,
                Action::PowerLoss,
            ];
            if let Some(f) = scenario.faults.iter().find(|f| process.contains(&f.action)) {
                return Err(format!(
                    "{:?} at {:?} needs a cluster convoy-chaos launched; an attached cluster takes partition, delay and storage faults only",
                    f.action, f.at
                )
                .into());
            }
            let cluster = LocalCluster::attach(admin, secret, &opts.dir).await?;
            eprintln!("attached to {} nodes through {admin}", cluster.nodes.len());
            cluster
        }
        None => {
            eprintln!("starting {} nodes in {}", launch.nodes, launch.dir.display());
            LocalCluster::launch(&launch).await?
        }
    };
    let history_path = opts.dir.join("history.jsonl");
    let history = Arc::new(HistoryWriter::create(&history_path)?);
    let run_id = format!("r{:x}", opts.seed & 0xffff_ffff);
    let target = Target {
        secret: cluster.secret.clone(),
        node_names: cluster.nodes.iter().map(|n| n.name.clone()).collect(),
        client_urls: cluster.nodes.iter().map(|n| n.client_url.clone()).collect(),
    };
    let w = &scenario.workload;
    let groups = workload::seats(&run_id, w.groups, w.members, cluster.nodes.len());
    workload::open_groups(&target, &groups, Instant::now() + Duration::from_secs(60)).await?;
    let clock = Clock(Instant::now());
    let mut chaos = Chaos {
        http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?,
        token: cluster.admin_token(),
        cluster,
        convoy: opts.convoy.clone(),
        paused: BTreeSet::new(),
        cut: BTreeSet::new(),
        history: history.clone(),
        clock,
        first_group: groups[0][0].group.clone(),
        snapshots_installed: 0,
    };

    // The workload.
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Progress::default());
    let senders = w.groups * w.members;
    let interval = Duration::from_secs_f64(senders as f64 / f64::from(w.rate));
    chaos.phase("workload_start", format!("{senders} members sending {} msg/s for {:?}", w.rate, w.duration));
    let mut tasks = Vec::new();
    for seat in groups.iter().flatten() {
        tasks.push(tokio::spawn(workload::member(workload::MemberRun {
            seat: seat.clone(),
            target: target.clone(),
            interval,
            send_timeout: w.send_timeout,
            read_every: w.read_every,
            history: history.clone(),
            clock,
            stop: stop.clone(),
            progress: progress.clone(),
        })));
    }
    let live = (!opts.quiet).then(|| spawn_live_table(progress.clone(), clock, w.duration));

    // The faults, on the timeline; undos are scheduled like faults.
    let mut timeline: Vec<(Duration, Step)> =
        scenario.faults.iter().cloned().map(|f| (f.at, Step::Fault(Box::new(f)))).collect();
    let mut failures = Vec::new();
    while !timeline.is_empty() {
        timeline.sort_by_key(|(at, _)| *at);
        let (at, step) = timeline.remove(0);
        tokio::time::sleep_until((clock.0 + at).into()).await;
        match step {
            Step::Fault(f) => match chaos.apply(&f).await {
                Ok(Some(undo)) => {
                    let after = if f.action == Action::PowerLoss {
                        f.duration.unwrap_or(Duration::from_secs(2))
                    } else {
                        f.duration.unwrap_or_default()
                    };
                    timeline.push((clock.0.elapsed() + after, Step::Undo(undo)));
                }
                Ok(None) => {}
                Err(e) => failures.push(format!("fault {:?} at {:?}: {e}", f.action, f.at)),
            },
            Step::Undo(undo) => {
                if let Err(e) = chaos.undo(undo).await {
                    failures.push(format!("healing: {e}"));
                }
            }
        }
    }
    tokio::time::sleep_until((clock.0 + w.duration).into()).await;
    stop.store(true, Ordering::Relaxed);
    chaos.phase("workload_end", format!("{} acks", progress.acks.load(Ordering::Relaxed)));
    for t in tasks {
        let _ = tokio::time::timeout(w.send_timeout * 2, t).await;
    }
    if let Some(live) = live {
        live.abort();
    }

    // Heal everything and read every group back, as every member, through every node.
    chaos.heal_all().await?;
    chaos.phase("heal", "everything healed; final reads".into());
    let deadline = Instant::now() + FINAL_READ_DEADLINE;
    for seat in groups.iter().flatten() {
        for node in 0..target.client_urls.len() {
            match workload::final_read(&target, seat, node, deadline).await {
                Ok(entries) => history.record(&Record::FinalRead {
                    t_ms: clock.ms(),
                    node: target.node_names[node].clone(),
                    user: seat.user.clone(),
                    group: seat.group.clone(),
                    entries,
                }),
                Err(e) => failures.push(e),
            }
        }
    }
    history.finish()?;
    for i in 0..chaos.cluster.nodes.len() {
        chaos.tally_snapshots(i).await;
    }
    let mut unmet = Vec::new();
    if chaos.snapshots_installed < scenario.expect.snapshots_installed {
        unmet.push(format!(
            "expected at least {} snapshot installs, the nodes counted {}: the faults did not make a replica \
             fall behind the leaders' logs (lower raft.snapshot_every_entries or keep the node down longer)",
            scenario.expect.snapshots_installed, chaos.snapshots_installed
        ));
    }

    let records = crate::check::history::read_history(&history_path)?;
    let verdict = check(&records);
    let report = opts.dir.join("report.json");
    let doc = serde_json::json!({
        "scenario": scenario.name,
        "seed": opts.seed,
        "nodes": scenario.cluster.nodes,
        "netns": scenario.cluster.netns,
        "harness_failures": failures,
        "snapshots_installed": chaos.snapshots_installed,
        "unmet_expectations": unmet,
        "verdict": verdict,
    });
    std::fs::write(&report, serde_json::to_string_pretty(&doc)?)?;
    if !opts.keep {
        chaos.cluster.down().await?;
    }
    if !failures.is_empty() {
        return Err(format!("the run could not complete: {}", failures.join("; ")).into());
    }
    Ok(Outcome { verdict, snapshots_installed: chaos.snapshots_installed, unmet, history: history_path, report })
}

enum Step {
    Fault(Box<FaultSpec>),
    Undo(Undo),
}

/// Prints a line per second: elapsed, attempts, acks, failures, reconnects.
fn spawn_live_table(progress: Arc<Progress>, clock: Clock, total: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let bar = indicatif::ProgressBar::new(total.as_secs());
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len}s  {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            bar.set_position(clock.0.elapsed().as_secs().min(total.as_secs()));
            bar.set_message(format!(
                "attempts {:>7}  acks {:>7}  failures {:>5}  reconnects {:>4}",
                progress.attempts.load(Ordering::Relaxed),
                progress.acks.load(Ordering::Relaxed),
                progress.failures.load(Ordering::Relaxed),
                progress.reconnects.load(Ordering::Relaxed),
            ));
        }
    })
}

/// `convoy-chaos up`: launches a cluster and leaves it running.
pub async fn up(opts: &LaunchOptions) -> Result<LocalCluster, Error> {
    Ok(LocalCluster::launch(opts).await?)
}

/// `convoy-chaos down`: stops the cluster saved in `dir` and removes what `up` created.
pub async fn down(dir: &Path) -> Result<(), Error> {
    LocalCluster::open(dir)?.down().await?;
    Ok(())
}
