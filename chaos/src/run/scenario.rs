//! Scenario files: the cluster to break, the workload to drive, and the faults on a timeline.
//!
//! ```toml
//! name = "smoke"
//! description = "one leader kill and one partition"
//! [cluster]
//! nodes = 3
//! [workload]
//! groups = 4
//! rate = 200
//! duration = "60s"
//! [[fault]]
//! at = "10s"
//! action = "kill"
//! target = "leader"
//! for = "5s"
//! ```

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// Bounds that keep a scenario runnable on one machine.
pub const MAX_NODES: usize = 9;
pub const MAX_GROUPS: usize = 256;
pub const MAX_RATE: u32 = 20_000;
pub const MAX_DURATION: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub cluster: ClusterSpec,
    #[serde(default)]
    pub workload: WorkloadSpec,
    #[serde(default, rename = "fault")]
    pub faults: Vec<FaultSpec>,
    #[serde(default)]
    pub expect: ExpectSpec,
}

/// What the faults must have made happen for the run to prove what the scenario is about: a
/// snapshot-install scenario in which no snapshot was installed proves nothing.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExpectSpec {
    /// At least this many Raft snapshots installed from a leader, over all nodes and restarts.
    pub snapshots_installed: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSpec {
    pub nodes: usize,
    /// Each node in its own network namespace, joined by a bridge: partitions are then cut
    /// with iptables. Without it partitions use the nodes' fault injection endpoints.
    pub netns: bool,
    /// Extra configuration for every node, as `"section.key" = value`.
    pub config: toml::Table,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec { nodes: 3, netns: false, config: toml::Table::new() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Exception groups, each with members on different nodes.
    pub groups: usize,
    /// Members per group (each a client connected to one node, round-robin over nodes).
    pub members: usize,
    /// Sends per second over all senders.
    pub rate: u32,
    /// How long the workload sends; faults happen within it.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// How long a send waits for its ack before it is retried with the same client_msg_id.
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// A member marks the group read after every this many acks of its own.
    pub read_every: u32,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        WorkloadSpec {
            groups: 4,
            members: 3,
            rate: 200,
            duration: Duration::from_secs(60),
            send_timeout: Duration::from_secs(3),
            read_every: 10,
        }
    }
}

/// One fault on the timeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// When, from the start of the workload.
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    pub action: Action,
    /// Which node(s): `leader` (of the first group's shard, found when the fault fires),
    /// `follower` (a replica of it that does not lead), a node name (`n2`), or `all`.
    #[serde(default = "default_target")]
    pub target: String,
    /// Undo the fault after this long (restart a killed node, resume a paused one, heal).
    #[serde(default, rename = "for", with = "humantime_serde")]
    pub duration: Option<Duration>,
    /// `flap`: how many kill/restart cycles, and the time between them.
    #[serde(default)]
    pub times: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub every: Option<Duration>,
    /// `partition`: `isolate` (the target against the rest: with `target = "leader"` the leader
    /// is in the minority, with `follower` the majority keeps its leader), `bridge` (the target
    /// sees everyone, the other nodes are split in two halves that do not see each other),
    /// `ring` (each node sees only its two neighbours), or explicit `sides = [["n1"], ["n2", "n3"]]`.
    #[serde(default)]
    pub shape: Option<String>,
    #[serde(default)]
    pub sides: Option<Vec<Vec<String>>>,
    /// `delay`: milliseconds added to every message the target sends to its peers.
    #[serde(default)]
    pub delay_ms: Option<u64>,
}

fn default_target() -> String {
    "leader".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// SIGKILL.
    Kill,
    /// SIGTERM and wait for exit.
    Stop,
    /// Start a stopped or killed node.
    Restart,
    /// SIGSTOP.
    Pause,
    /// SIGCONT.
    Resume,
    /// kill -9 and restart, `times` times, `every` apart.
    Flap,
    /// Cut node-to-node traffic between sides.
    Partition,
    /// Remove every partition.
    Heal,
    /// SIGKILL every node at once (power loss), then restart them all after `for`.
    PowerLoss,
    /// The target's storage writes fail (fault injection endpoint); healed after `for`.
    StorageFail,
    /// The target's storage writes stall (fault injection endpoint); healed after `for`.
    StorageStall,
    /// The target delays every message to its peers by `delay_ms` (fault injection endpoint).
    Delay,
}

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not a valid scenario: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {key}: {problem}")]
    Invalid { path: String, key: String, problem: String },
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let shown = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| ScenarioError::Read { path: shown.clone(), source })?;
        let scenario: Scenario =
            toml::from_str(&text).map_err(|e| ScenarioError::Parse { path: shown.clone(), message: e.to_string() })?;
        scenario.validate().map_err(|(key, problem)| ScenarioError::Invalid { path: shown, key, problem })?;
        Ok(scenario)
    }

    /// The first problem found, as (key, what is wrong and how to fix it).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, problem: String| Err((key.to_string(), problem));
        let c = &self.cluster;
        if !(1..=MAX_NODES).contains(&c.nodes) {
            return bad("cluster.nodes", format!("{} is out of range: use 1..={MAX_NODES}", c.nodes));
        }
        let w = &self.workload;
        if !(1..=MAX_GROUPS).contains(&w.groups) {
            return bad("workload.groups", format!("{} is out of range: use 1..={MAX_GROUPS}", w.groups));
        }
        if !(1..=64).contains(&w.members) {
            return bad("workload.members", format!("{} is out of range: use 1..=64", w.members));
        }
        if !(1..=MAX_RATE).contains(&w.rate) {
            return bad("workload.rate", format!("{} is out of range: use 1..={MAX_RATE} sends per second", w.rate));
        }
        if w.duration.is_zero() || w.duration > MAX_DURATION {
            return bad("workload.duration", format!("{:?} is out of range: use 1s..1h", w.duration));
        }
        if w.send_timeout < Duration::from_millis(100) {
            return bad("workload.send_timeout", "must be at least 100ms".into());
        }
        let names: BTreeSet<String> = (1..=c.nodes).map(|i| format!("n{i}")).collect();
        for (i, f) in self.faults.iter().enumerate() {
            let key = |k: &str| format!("fault[{i}].{k}");
            if f.at >= w.duration {
                return bad(&key("at"), format!("{:?} is after the workload ends ({:?})", f.at, w.duration));
            }
            let t = f.target.as_str();
            if !matches!(t, "leader" | "follower" | "all") && !names.contains(t) {
                return bad(
                    &key("target"),
                    format!("{t:?}: use leader, follower, all or a node name (n1..n{})", c.nodes),
                );
            }
            match f.action {
                Action::Flap if f.times.is_none() || f.every.is_none() => {
                    return bad(&key("times"), "flap needs times = N and every = \"2s\"".into());
                }
                Action::Delay if !f.delay_ms.is_some_and(|d| (1..=10_000).contains(&d)) => {
                    return bad(&key("delay_ms"), "delay needs delay_ms = 1..=10000".into());
                }
                Action::Partition => {
                    if c.nodes < 2 {
                        return bad(&key("action"), "a partition needs at least 2 nodes".into());
                    }
                    match (&f.shape, &f.sides) {
                        (None, None) => {
                            return bad(&key("shape"), "partition needs shape = ... or sides = [...]".into());
                        }
                        (Some(s), _) if !matches!(s.as_str(), "isolate" | "bridge" | "ring") => {
                            return bad(&key("shape"), format!("{s:?}: use isolate, bridge or ring (or sides)"));
                        }
                        (_, Some(sides)) => {
                            for n in sides.iter().flatten() {
                                if !names.contains(n) {
                                    return bad(&key("sides"), format!("{n:?} is not a node of this cluster"));
                                }
                            }
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_scenarios_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("chaos/scenarios") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen >= 8, "only {seen} scenarios in {}", dir.display());
        let snapshots = Scenario::load(&dir.join("snapshot-install-kill.toml")).expect("snapshot-install-kill");
        assert!(snapshots.expect.snapshots_installed >= 1, "the snapshot scenario must prove snapshots were installed");
    }

    #[test]
    fn errors_name_the_key() {
        let s: Scenario = toml::from_str("name = \"x\"\n[workload]\nrate = 0").unwrap();
        assert_eq!(s.validate().unwrap_err().0, "workload.rate");
        let s: Scenario =
            toml::from_str("name = \"x\"\n[[fault]]\nat = \"90s\"\naction = \"kill\"\ntarget = \"n1\"").unwrap();
        assert_eq!(s.validate().unwrap_err().0, "fault[0].at");
        let s: Scenario =
            toml::from_str("name = \"x\"\n[[fault]]\nat = \"1s\"\naction = \"kill\"\ntarget = \"n7\"").unwrap();
        assert_eq!(s.validate().unwrap_err().0, "fault[0].target");
        assert!(toml::from_str::<Scenario>("name = \"x\"\n[[fault]]\nat = \"1s\"\naction = \"explode\"").is_err());
    }
}
