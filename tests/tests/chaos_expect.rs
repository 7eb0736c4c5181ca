//! The chaos runner's `[expect]` section, run for real: a scenario whose faults did not cause
//! what it is about fails (exit 3) instead of passing vacuously, and one whose faults did
//! counts the snapshot installs the nodes made.

use std::path::Path;

use convoy_chaos::run::scenario::Scenario;
use convoy_chaos::run::{Outcome, RunOptions, run};
use convoy_tests::node::convoy_bin;

/// Below the ephemeral range the other tests' ports come from; 10 ports per node.
const BASE_PORT: u16 = 24_600;

async fn run_scenario(text: &str, dir: &Path, base_port: u16) -> Outcome {
    std::fs::create_dir_all(dir).expect("creating the run directory");
    let path = dir.join("scenario.toml");
    std::fs::write(&path, text).expect("writing the scenario");
    let scenario = Scenario::load(&path).expect("a valid scenario");
    let opts = RunOptions {
        convoy: convoy_bin(),
        dir: dir.join("run"),
        base_port,
        seed: 7,
        keep: false,
        quiet: true,
        attach: None,
    };
    run(&scenario, &opts).await.unwrap_or_else(|e| panic!("the run did not complete: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_expectations_fail_a_run_without_installs_and_count_real_ones() {
    let dir = tempfile::tempdir().expect("temp dir");

    // No follower ever falls behind a compacted log: nothing to install.
    let calm = r#"
name = "calm"
[cluster]
nodes = 3
[workload]
groups = 2
members = 3
rate = 60
duration = "4s"
[expect]
snapshots_installed = 1
"#;
    let outcome = run_scenario(calm, &dir.path().join("calm"), BASE_PORT).await;
    assert!(outcome.verdict.ok(), "{}", outcome.verdict.line());
    assert_eq!(outcome.snapshots_installed, 0);
    assert_eq!(outcome.unmet.len(), 1, "{:?}", outcome.unmet);
    assert!(outcome.unmet[0].contains("snapshot"), "{:?}", outcome.unmet);

    // A follower down while its leaders compact their logs must install snapshots.
    let behind = r#"
name = "behind"
[cluster]
nodes = 3
[cluster.config]
"raft.snapshot_every_entries" = 20
"raft.keep_entries_after_snapshot" = 5
[workload]
groups = 4
members = 3
rate = 150
duration = "12s"
[[fault]]
at = "1s"
action = "kill"
target = "follower"
for = "5s"
[expect]
snapshots_installed = 1
"#;
    let outcome = run_scenario(behind, &dir.path().join("behind"), BASE_PORT + 100).await;
    assert!(outcome.verdict.ok(), "{}", outcome.verdict.line());
    assert!(outcome.unmet.is_empty(), "{:?}", outcome.unmet);
    assert!(outcome.snapshots_installed >= 1);
}
