//! One `convoy` node process: configuration, start, stop, kill, restart.

use convoy_chaos::run::cluster;
use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rand::RngExt;
use rand::distr::{Alphanumeric, SampleString};
use tempfile::TempDir;

/// How long a node may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Ports are picked below the kernel's ephemeral range (32768 and up on Linux), so that no
/// outgoing connection can take a node's port while the node is down between restarts.
const PORT_RANGE: std::ops::Range<u16> = 20_000..32_000;

/// How a node is configured beyond the harness's own settings.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Node id (`node.id`).
    pub id: String,
    /// Configuration keys by dotted path (`"limits.max_frame_bytes"`, `"timeouts.receipt_timeout"`,
    /// `"auth.hello_timeout"`, ...), applied over the harness's defaults.
    pub overrides: BTreeMap<String, toml::Value>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions { id: "n1".into(), overrides: BTreeMap::new() }
    }
}

impl NodeOptions {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets one configuration key, e.g. `.set("timeouts.entity_idle", "300ms")` or
    /// `.set("limits.max_text_chars", 100)`.
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        assert!(key.contains('.'), "configuration keys are dotted paths such as limits.max_frame_bytes, got {key:?}");
        self.overrides.insert(key.to_string(), value.into());
        self
    }
}

/// The path of the `convoy` binary: `$CONVOY_BIN`, else `$CARGO_TARGET_DIR/release/convoy`, else
/// `<workspace>/target/release/convoy`. Panics when none exists: tests never build it themselves.
pub fn convoy_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("CONVOY_BIN") {
        let bin = PathBuf::from(bin);
        assert!(bin.is_file(), "CONVOY_BIN={} does not exist", bin.display());
        return bin;
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        let dir = if dir.is_relative() { workspace_root().join(dir) } else { dir };
        candidates.push(dir.join("release").join("convoy"));
    }
    candidates.push(workspace_root().join("target").join("release").join("convoy"));
    for candidate in &candidates {
        if candidate.is_file() {
            return candidate.clone();
        }
    }
    let looked: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
    panic!(
        "the convoy binary was not found (looked in {}). Build it first with \
         `cargo build --release -p convoy-node` (with the same CARGO_TARGET_DIR), or point CONVOY_BIN at it",
        looked.join(", ")
    );
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ lives in the workspace").to_path_buf()
}

/// A port no other node of this process has been given and that is free right now.
fn free_port() -> u16 {
    static TAKEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let taken = TAKEN.get_or_init(Default::default);
    let mut rng = rand::rng();
    for _ in 0..10_000 {
        let port = rng.random_range(PORT_RANGE);
        let mut taken = taken.lock().unwrap_or_else(|e| e.into_inner());
        if taken.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return port;
        }
    }
    panic!("no free port found in {PORT_RANGE:?}");
}

/// A running (or stopped) node process with its own data directory.
pub struct Node {
    dir: Option<TempDir>,
    config_path: PathBuf,
    log_path: PathBuf,
    data_dir: PathBuf,
    secret: String,
    id: String,
    client_url: String,
    admin_url: String,
    cluster_addr: String,
    child: Option<Child>,
}

/// The three listeners of a node.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub client: u16,
    pub admin: u16,
    pub cluster: u16,
}

impl Ports {
    /// Ports no other node of this process has.
    pub fn free() -> Ports {
        Ports { client: free_port(), admin: free_port(), cluster: free_port() }
    }
}

impl Node {
    /// Writes a configuration into a fresh temporary directory, starts `convoy start --config` on it
    /// and waits for its ready line. Panics (with the node's log) if it does not become ready.
    ///
    /// This blocks the calling thread until the node is ready (milliseconds, usually); async tests
    /// use the multi-threaded runtime so that their clients keep running meanwhile.
    pub fn start(opts: NodeOptions) -> Node {
        let secret = Alphanumeric.sample_string(&mut rand::rng(), 48);
        let mut node = Node::configure(opts, Ports::free(), secret);
        node.spawn();
        node
    }

    /// Writes the configuration of a node without starting it: [`Node::spawn`] does (and
    /// waits for its ready line). Cluster members share `secret` and list each other as seeds.
    pub fn configure(opts: NodeOptions, ports: Ports, secret: String) -> Node {
        let dir = tempfile::Builder::new().prefix("convoy-test-").tempdir().expect("creating a temp dir");
        let data_dir = dir.path().join("data");
        let config_path = dir.path().join("convoy.toml");
        let log_path = dir.path().join("convoy.log");
        let Ports { client, admin, cluster } = ports;
        let scheme = if opts.overrides.contains_key("client.tls_cert") { "wss" } else { "ws" };

        let mut config = toml::Table::new();
        set_key(&mut config, "node.id", opts.id.clone().into());
        set_key(&mut config, "node.data_dir", data_dir.display().to_string().into());
        set_key(&mut config, "client.listen", format!("127.0.0.1:{client}").into());
        set_key(&mut config, "admin.listen", format!("127.0.0.1:{admin}").into());
        set_key(&mut config, "cluster.listen", format!("127.0.0.1:{cluster}").into());
        set_key(&mut config, "auth.secret", secret.clone().into());
        // Small enough that many nodes fit on a test machine at once.
        set_key(&mut config, "storage.cache_capacity_bytes", (16i64 << 20).into());
        // Openraft logs every shard's lifecycle at info: keep the log readable.
        set_key(&mut config, "telemetry.log_level", "info,openraft=warn".into());
        for (key, value) in &opts.overrides {
            set_key(&mut config, key, value.clone());
        }
        let text = toml::to_string_pretty(&config).expect("a TOML table serializes");
        std::fs::write(&config_path, text).expect("writing the node configuration");

        Node {
            dir: Some(dir),
            config_path,
            log_path,
            data_dir,
            secret,
            id: opts.id,
            client_url: format!("{scheme}://127.0.0.1:{client}/v1/ws"),
            admin_url: format!("http://127.0.0.1:{admin}"),
            cluster_addr: format!("127.0.0.1:{cluster}"),
            child: None,
        }
    }

    /// Starts the node again on the same data directory, configuration and ports, and waits for it
    /// to be ready. The previous process must have exited ([`Node::kill9`], [`Node::terminate`]).
    pub fn restart(&mut self) {
        if let Some(child) = self.child.as_mut() {
            match child.try_wait() {
                Ok(Some(_)) => {}
                _ => panic!("restart: node {} (pid {}) is still running; stop it first", self.id, child.id()),
            }
        }
        self.child = None;
        self.spawn();
    }

    /// Starts the process and waits for its ready line.
    pub fn spawn(&mut self) {
        let log = OpenOptions::new().create(true).append(true).open(&self.log_path).expect("opening the node log");
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut child = Command::new(convoy_bin())
            .arg("start")
            .arg("--config")
            .arg(&self.config_path)
            .env_remove("CONVOY_AUTH_SECRET")
            .env("RUST_BACKTRACE", "1")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("could not run {}: {e}", convoy_bin().display()));
        let stdout = child.stdout.take().expect("stdout is piped");
        self.child = Some(child);

        // A reader thread drains stdout for the node's whole life, so that it never blocks on a
        // full pipe; the first line that announces readiness is handed over.
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::Builder::new()
            .name(format!("convoy-{}-stdout", self.id))
            .spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if line.starts_with("convoy ready ")
                        && let Some(tx) = tx.take()
                    {
                        let _ = tx.send(line);
                    }
                }
            })
            .expect("spawning a reader thread");

        let started = Instant::now();
        let line = loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => break line,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.as_mut().and_then(|c| c.wait().ok());
                    panic!(
                        "node {} exited before it was ready ({status:?}); log:\n{}",
                        self.id,
                        log_tail(&self.log_path, log_start, 60)
                    );
                }
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "node {} exited before it was ready ({status}); log:\n{}",
                    self.id,
                    log_tail(&self.log_path, log_start, 60)
                );
            }
            if started.elapsed() > READY_TIMEOUT {
                panic!(
                    "node {} was not ready after {READY_TIMEOUT:?}; log:\n{}",
                    self.id,
                    log_tail(&self.log_path, log_start, 60)
                );
            }
        };
        let ready = ReadyLine::parse(&line).unwrap_or_else(|| panic!("malformed ready line {line:?}"));
        assert_eq!(ready.node, self.id, "ready line {line:?} names another node");
        assert_eq!(ready.client, self.client_url, "ready line {line:?}: unexpected client URL");
        assert_eq!(ready.admin, self.admin_url, "ready line {line:?}: unexpected admin URL");
    }

    /// `ws://127.0.0.1:PORT/v1/ws`.
    pub fn client_url(&self) -> &str {
        &self.client_url
    }

    /// `http://127.0.0.1:PORT`.
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    /// `127.0.0.1:PORT` of the node-to-node listener.
    pub fn cluster_addr(&self) -> &str {
        &self.cluster_addr
    }

    /// Stops the process with SIGSTOP: alive, silent.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Resumes a paused process with SIGCONT.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid()).expect("pids fit in pid_t");
        // SAFETY: signals our own child, which is still running (the caller knows).
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({sig}) failed: {}", std::io::Error::last_os_error());
    }

    /// The client token secret (`auth.secret`).
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The node id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The process id of the current process. Panics if the node was never started.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the node has a process").id()
    }

    /// The node's temporary directory: its configuration (`convoy.toml`), its log (`convoy.log`) and
    /// its persistent state (`data/`). Kept when a test fails.
    pub fn dir(&self) -> &Path {
        self.config_path.parent().expect("the configuration lives in the node's directory")
    }

    /// The node's persistent state (`node.data_dir`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The node's stderr log (all runs appended).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill9(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits for the process to exit. Panics if it takes longer than
    /// [`STOP_TIMEOUT`] (the process is then killed).
    pub fn terminate(&mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("the node has a process");
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        let pid = libc::pid_t::try_from(child.id()).expect("pids fit in pid_t");
        // SAFETY: sends a signal to our own child, which has not been reaped yet (checked above).
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed: {}", std::io::Error::last_os_error());
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("waiting for the node") {
                return status;
            }
            if started.elapsed() > STOP_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!("node {} did not exit within {STOP_TIMEOUT:?} of SIGTERM", self.id);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last `lines` lines of the node's log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path, 0, lines)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            let path = dir.keep();
            eprintln!("node {}: data kept for inspection in {}", self.id, path.display());
            eprintln!("node {} log tail:\n{}", self.id, log_tail(&self.log_path, 0, 30));
        }
    }
}

/// `convoy ready node=<id> client=<ws url> admin=<http url>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyLine {
    pub node: String,
    pub client: String,
    pub admin: String,
}

impl ReadyLine {
    pub fn parse(line: &str) -> Option<ReadyLine> {
        let rest = line.trim_end().strip_prefix("convoy ready ")?;
        let mut fields = BTreeMap::new();
        for part in rest.split_whitespace() {
            let (key, value) = part.split_once('=')?;
            fields.insert(key, value.to_string());
        }
        Some(ReadyLine {
            node: fields.remove("node")?,
            client: fields.remove("client")?,
            admin: fields.remove("admin")?,
        })
    }
}

/// Sets a dotted configuration key; a conflicting key is a mistake in the test.
fn set_key(table: &mut toml::Table, key: &str, value: toml::Value) {
    cluster::set_key(table, key, value).unwrap_or_else(|e| panic!("{e}"));
}

/// The last `lines` lines of the log written from byte `from` on.
fn log_tail(path: &Path, from: u64, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let _ = file.seek(SeekFrom::Start(from));
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_parses() {
        let line = "convoy ready node=n1 client=ws://127.0.0.1:7600/v1/ws admin=http://127.0.0.1:7601\n";
        let ready = ReadyLine::parse(line).unwrap();
        assert_eq!(ready.node, "n1");
        assert_eq!(ready.client, "ws://127.0.0.1:7600/v1/ws");
        assert_eq!(ready.admin, "http://127.0.0.1:7601");
        assert_eq!(ReadyLine::parse("convoy starting"), None);
        assert_eq!(ReadyLine::parse("convoy ready node=n1"), None);
    }

    #[test]
    fn dotted_keys_build_nested_tables() {
        let mut t = toml::Table::new();
        set_key(&mut t, "limits.max_frame_bytes", 4096.into());
        set_key(&mut t, "limits.max_text_chars", 10.into());
        set_key(&mut t, "timeouts.entity_idle", "300ms".into());
        let text = toml::to_string(&t).unwrap();
        let back: toml::Table = text.parse().unwrap();
        assert_eq!(back["limits"]["max_frame_bytes"].as_integer(), Some(4096));
        assert_eq!(back["limits"]["max_text_chars"].as_integer(), Some(10));
        assert_eq!(back["timeouts"]["entity_idle"].as_str(), Some("300ms"));
    }

    #[test]
    fn ports_are_never_handed_out_twice() {
        let ports: HashSet<u16> = (0..50).map(|_| free_port()).collect();
        assert_eq!(ports.len(), 50);
        assert!(ports.iter().all(|p| PORT_RANGE.contains(p)));
    }
}
