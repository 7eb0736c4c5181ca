//! A local cluster of `convoy` processes the tool launches itself: generated configurations,
//! one data directory per node, optionally one network namespace per node, and the process
//! faults (kill, stop, restart, pause, resume). Its layout is saved in `cluster.json` in the
//! work directory so that `convoy-chaos down` (or a later run) can find and remove it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::distr::{Alphanumeric, SampleString};
use serde::{Deserialize, Serialize};

use super::netns;
use crate::token::{Claims, mint};

/// How long a node may take to answer `/readyz` after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeSpec {
    pub name: String,
    pub client_url: String,
    pub admin_url: String,
    pub cluster_addr: String,
    pub config: PathBuf,
    pub log: PathBuf,
    /// The namespace the node runs in, when the cluster uses namespaces.
    pub netns: Option<String>,
    /// The node's address inside its namespace (127.0.0.1 without namespaces).
    pub ip: String,
    pub pid: Option<u32>,
}

/// The saved description of a launched cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalCluster {
    pub dir: PathBuf,
    pub secret: String,
    pub netns: bool,
    pub nodes: Vec<NodeSpec>,
    /// A cluster someone else started: reached through its admin API only, so process faults
    /// are impossible and nothing is stopped when the run ends.
    #[serde(default)]
    pub attached: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0}")]
    Io(String),
    #[error("node {node} was not ready within {timeout:?}; its log ends with:\n{tail}")]
    NotReady { node: String, timeout: Duration, tail: String },
    #[error("no cluster in {0}: start one with `convoy-chaos up`")]
    Missing(String),
    #[error("network namespaces: {0}")]
    Netns(String),
}

fn io(context: impl std::fmt::Display, e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Io(format!("{context}: {e}"))
}

/// How to launch a cluster.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    pub nodes: usize,
    pub dir: PathBuf,
    pub convoy: PathBuf,
    pub netns: bool,
    /// Client port of n1; node i uses base + 10 (i-1) for clients, +1 admin, +2 cluster.
    pub base_port: u16,
    /// Extra `section.key = value` settings for every node.
    pub config: toml::Table,
}

impl LocalCluster {
    /// Writes configurations, creates namespaces if asked, starts every node and waits until
    /// all are ready.
    pub async fn launch(opts: &LaunchOptions) -> Result<LocalCluster, ClusterError> {
        if opts.dir.join("cluster.json").exists() {
            return Err(ClusterError::Io(format!(
                "{} already holds a cluster: run `convoy-chaos down --dir {}` first",
                opts.dir.display(),
                opts.dir.display()
            )));
        }
        std::fs::create_dir_all(&opts.dir).map_err(|e| io(opts.dir.display(), e))?;
        let secret = Alphanumeric.sample_string(&mut rand::rng(), 48);
        let cookie = Alphanumeric.sample_string(&mut rand::rng(), 24);
        if opts.netns {
            netns::create(opts.nodes).map_err(ClusterError::Netns)?;
        }
        let mut nodes = Vec::new();
        for i in 0..opts.nodes {
            let name = format!("n{}", i + 1);
            let ip = if opts.netns { netns::node_ip(i) } else { "127.0.0.1".to_string() };
            let port = opts.base_port + 10 * i as u16;
            nodes.push(NodeSpec {
                client_url: format!("ws://{ip}:{port}/v1/ws"),
                admin_url: format!("http://{ip}:{}", port + 1),
                cluster_addr: format!("{ip}:{}", port + 2),
                config: opts.dir.join(format!("{name}.toml")),
                log: opts.dir.join(format!("{name}.log")),
                netns: opts.netns.then(|| netns::ns_name(i)),
                ip,
                pid: None,
                name,
            });
        }
        for node in &nodes {
            let seeds: Vec<toml::Value> =
                nodes.iter().filter(|n| n.name != node.name).map(|n| n.cluster_addr.clone().into()).collect();
            let mut config = toml::Table::new();
            let mut settings: Vec<(String, toml::Value)> = Vec::new();
            let mut set = |key: &str, value: toml::Value| settings.push((key.to_string(), value));
            set("node.id", node.name.clone().into());
            set("node.data_dir", opts.dir.join(&node.name).display().to_string().into());
            set("client.listen", node.client_url.trim_start_matches("ws://").trim_end_matches("/v1/ws").into());
            set("admin.listen", node.admin_url.trim_start_matches("http://").into());
            set("cluster.listen", node.cluster_addr.clone().into());
            set("cluster.cookie", cookie.clone().into());
            set("cluster.seeds", seeds.into());
            set("auth.secret", secret.clone().into());
            set("chaos.enabled", true.into());
            set("limits.requests_per_second", 100_000.into());
            set("limits.request_burst", 100_000.into());
            for (key, value) in &opts.config {
                set(key, value.clone());
            }
            for (key, value) in settings {
                set_key(&mut config, &key, value).map_err(ClusterError::Io)?;
            }
            let text = toml::to_string_pretty(&config).map_err(|e| io("writing a node configuration", e))?;
            std::fs::write(&node.config, text).map_err(|e| io(node.config.display(), e))?;
        }
        let mut cluster = LocalCluster { dir: opts.dir.clone(), secret, netns: opts.netns, nodes, attached: false };
        for i in 0..cluster.nodes.len() {
            cluster.spawn(i, &opts.convoy)?;
        }
        cluster.save()?;
        for i in 0..cluster.nodes.len() {
            cluster.wait_ready(i).await?;
        }
        Ok(cluster)
    }

    /// A running cluster, found through the admin API at `admin_url` (its `GET /v1/cluster`
    /// lists every member's URLs). `secret` is the cluster's client secret (admin tokens are
    /// minted from it); its nodes must have `chaos.enabled` for partitions and storage faults.
    pub async fn attach(admin_url: &str, secret: &str, dir: &Path) -> Result<LocalCluster, ClusterError> {
        let mut cluster = LocalCluster {
            dir: dir.to_path_buf(),
            secret: secret.to_string(),
            netns: false,
            nodes: Vec::new(),
            attached: true,
        };
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().map_err(|e| io("http", e))?;
        let url = format!("{}/v1/cluster", admin_url.trim_end_matches('/'));
        let resp = http.get(&url).bearer_auth(cluster.admin_token()).send().await.map_err(|e| io(&url, e))?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.map_err(|e| io(&url, e))?;
        if !status.is_success() {
            return Err(ClusterError::Io(format!(
                "{url} answered {status}: {body} (is --secret the cluster's client secret?)"
            )));
        }
        for m in body["members"].as_array().into_iter().flatten() {
            let field = |k: &str| m[k].as_str().unwrap_or_default().to_string();
            cluster.nodes.push(NodeSpec {
                name: field("name"),
                client_url: field("client_url"),
                admin_url: field("admin_url"),
                cluster_addr: field("cluster_addr"),
                config: PathBuf::new(),
                log: PathBuf::new(),
                netns: None,
                ip: String::new(),
                pid: None,
            });
        }
        if cluster.nodes.is_empty() {
            return Err(ClusterError::Io(format!("{url} lists no members: {body}")));
        }
        Ok(cluster)
    }

    /// The cluster saved in `dir`.
    pub fn open(dir: &Path) -> Result<LocalCluster, ClusterError> {
        let path = dir.join("cluster.json");
        let text = std::fs::read_to_string(&path).map_err(|_| ClusterError::Missing(dir.display().to_string()))?;
        serde_json::from_str(&text).map_err(|e| io(path.display(), e))
    }

    fn save(&self) -> Result<(), ClusterError> {
        let path = self.dir.join("cluster.json");
        let text = serde_json::to_string_pretty(self).map_err(|e| io("cluster.json", e))?;
        std::fs::write(&path, text).map_err(|e| io(path.display(), e))
    }

    /// Starts node `i` (which must not be running) in its own process group, so that it
    /// outlives this process when launched by `up`.
    pub fn spawn(&mut self, i: usize, convoy: &Path) -> Result<(), ClusterError> {
        use std::os::unix::process::CommandExt;
        let node = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(|e| io(node.log.display(), e))?;
        let log2 = log.try_clone().map_err(|e| io(node.log.display(), e))?;
        let mut cmd = match &node.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(convoy);
                c
            }
            None => Command::new(convoy),
        };
        cmd.arg("start")
            .arg("--config")
            .arg(&node.config)
            .env_remove("CONVOY_AUTH_SECRET")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        let child = cmd.spawn().map_err(|e| io(format!("starting {} ({})", node.name, convoy.display()), e))?;
        self.nodes[i].pid = Some(child.id());
        // Dropping the handle neither kills nor waits; `is_running` reaps the exit status.
        drop(child);
        self.save()
    }

    /// Waits until node `i` answers `/readyz` with 200.
    pub async fn wait_ready(&self, i: usize) -> Result<(), ClusterError> {
        let node = &self.nodes[i];
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().map_err(|e| io("http", e))?;
        let began = Instant::now();
        loop {
            if let Ok(r) = http.get(format!("{}/readyz", node.admin_url)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if !self.is_running(i) || began.elapsed() > READY_TIMEOUT {
                let tail = tail(&node.log, 30);
                return Err(ClusterError::NotReady { node: node.name.clone(), timeout: READY_TIMEOUT, tail });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn is_running(&self, i: usize) -> bool {
        if self.attached {
            // Not ours to watch: assume it runs, and let its admin API say otherwise.
            return true;
        }
        let Some(pid) = self.nodes[i].pid else { return false };
        reap(pid);
        // A zombie has no /proc/PID/status "State: Z" for us once reaped; check the state.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }

    pub fn signal(&self, i: usize, sig: i32) -> Result<(), ClusterError> {
        if self.attached {
            return Err(ClusterError::Io(format!(
                "{}: process faults (kill, stop, pause, flap, power-loss) need a cluster convoy-chaos launched",
                self.nodes[i].name
            )));
        }
        let Some(pid) = self.nodes[i].pid else {
            return Err(ClusterError::Io(format!("{} was never started", self.nodes[i].name)));
        };
        // SAFETY: kill(2) with a pid we started; no memory is involved.
        if unsafe { libc::kill(pid as i32, sig) } != 0 {
            return Err(io(format!("signalling {}", self.nodes[i].name), std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// SIGKILL, then waits until the process is gone.
    pub async fn kill9(&mut self, i: usize) -> Result<(), ClusterError> {
        if self.is_running(i) {
            self.signal(i, libc::SIGCONT)?;
            self.signal(i, libc::SIGKILL)?;
        }
        self.wait_exit(i, Duration::from_secs(10)).await
    }

    /// SIGTERM, then waits for a clean exit (SIGKILL after `grace`).
    pub async fn stop(&mut self, i: usize, grace: Duration) -> Result<(), ClusterError> {
        if self.is_running(i) {
            self.signal(i, libc::SIGCONT)?;
            self.signal(i, libc::SIGTERM)?;
        }
        if self.wait_exit(i, grace).await.is_err() {
            self.kill9(i).await?;
        }
        Ok(())
    }

    async fn wait_exit(&self, i: usize, timeout: Duration) -> Result<(), ClusterError> {
        let began = Instant::now();
        while self.is_running(i) {
            if began.elapsed() > timeout {
                return Err(ClusterError::Io(format!("{} did not exit within {timeout:?}", self.nodes[i].name)));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Starts every node of `nodes` that is down, on its data, then waits until all are ready:
    /// a node is ready only once its cluster serves, which after a power loss needs the others.
    pub async fn restart(&mut self, nodes: &[usize], convoy: &Path) -> Result<(), ClusterError> {
        for &i in nodes {
            if !self.is_running(i) {
                self.spawn(i, convoy)?;
            }
        }
        for &i in nodes {
            self.wait_ready(i).await?;
        }
        Ok(())
    }

    /// Stops every node, removes the namespaces and `cluster.json` (data and logs stay).
    pub async fn down(mut self) -> Result<(), ClusterError> {
        if self.attached {
            return Ok(());
        }
        for i in 0..self.nodes.len() {
            self.stop(i, Duration::from_secs(10)).await?;
        }
        if self.netns {
            netns::destroy(self.nodes.len()).map_err(ClusterError::Netns)?;
        }
        let path = self.dir.join("cluster.json");
        std::fs::remove_file(&path).map_err(|e| io(path.display(), e))
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// A short-lived admin token for the nodes' admin APIs.
    pub fn admin_token(&self) -> String {
        mint(self.secret.as_bytes(), &Claims::new("convoy-chaos", ["admin"], Duration::from_secs(3600)))
    }
}

/// Collects the exit status of `pid` if it is our exited child, so it does not linger as a zombie.
fn reap(pid: u32) {
    let mut status = 0;
    // SAFETY: waitpid with WNOHANG on a pid; `status` is a valid out pointer.
    unsafe {
        libc::waitpid(pid as i32, &mut status, libc::WNOHANG);
    }
}

/// The last `lines` lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Sets a dotted key (`limits.max_frame_bytes`) in a TOML table; an error when a section on
/// the way already holds a value.
pub fn set_key(table: &mut toml::Table, dotted: &str, value: toml::Value) -> Result<(), String> {
    let mut parts: Vec<&str> = dotted.split('.').collect();
    let last = parts.pop().unwrap_or_default();
    let mut t = table;
    for part in parts {
        let entry = t.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = match entry {
            toml::Value::Table(section) => section,
            other => return Err(format!("configuration key {dotted:?}: {part:?} is {other}, not a section")),
        };
    }
    t.insert(last.to_string(), value);
    Ok(())
}
