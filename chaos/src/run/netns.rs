//! One network namespace per node, joined by veth pairs to a bridge in the host namespace,
//! and partitions cut with iptables inside the namespaces. Needs root (`ip`, `iptables`).
//!
//! Layout: bridge `cvy-br` at 10.77.0.1/24 in the host namespace; node i lives in namespace
//! `cvy-n<i+1>` at 10.77.0.<11+i>, its veth peer `cvy-v<i+1>` on the bridge. The host (and so
//! the workload's clients) reaches every node; a partition only cuts node-to-node traffic.

use std::collections::BTreeSet;
use std::process::Command;

const BRIDGE: &str = "cvy-br";
const BRIDGE_IP: &str = "10.77.0.1/24";

pub fn ns_name(i: usize) -> String {
    format!("cvy-n{}", i + 1)
}

pub fn node_ip(i: usize) -> String {
    format!("10.77.0.{}", 11 + i)
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("cannot run {}: {e} (install iproute2 and iptables, and run as root)", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!("`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

/// Creates the bridge and `nodes` namespaces (removing leftovers of an earlier run first).
pub fn create(nodes: usize) -> Result<(), String> {
    let _ = destroy(nodes);
    run(&["ip", "link", "add", BRIDGE, "type", "bridge"])?;
    run(&["ip", "addr", "add", BRIDGE_IP, "dev", BRIDGE])?;
    run(&["ip", "link", "set", BRIDGE, "up"])?;
    for i in 0..nodes {
        let (ns, host_end, ns_end) = (ns_name(i), format!("cvy-v{}", i + 1), format!("cvy-p{}", i + 1));
        run(&["ip", "netns", "add", &ns])?;
        run(&["ip", "link", "add", &host_end, "type", "veth", "peer", "name", &ns_end])?;
        run(&["ip", "link", "set", &ns_end, "netns", &ns])?;
        run(&["ip", "link", "set", &host_end, "master", BRIDGE])?;
        run(&["ip", "link", "set", &host_end, "up"])?;
        let addr = format!("{}/24", node_ip(i));
        run(&["ip", "-n", &ns, "addr", "add", &addr, "dev", &ns_end])?;
        run(&["ip", "-n", &ns, "link", "set", &ns_end, "up"])?;
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", &ns, "route", "add", "default", "via", "10.77.0.1"])?;
    }
    Ok(())
}

/// Removes the namespaces and the bridge; missing ones are not an error.
pub fn destroy(nodes: usize) -> Result<(), String> {
    for i in 0..nodes.max(1) {
        let _ = run(&["ip", "netns", "del", &ns_name(i)]);
        let _ = run(&["ip", "link", "del", &format!("cvy-v{}", i + 1)]);
    }
    let _ = run(&["ip", "link", "del", BRIDGE]);
    Ok(())
}

/// Blocks traffic between each pair in `cuts` (node indexes), in both directions, leaving
/// everything else (and the host's access to every node) open.
pub fn cut(cuts: &BTreeSet<(usize, usize)>) -> Result<(), String> {
    for &(a, b) in cuts {
        for (from, to) in [(a, b), (b, a)] {
            let ns = ns_name(from);
            let peer = node_ip(to);
            run(&["ip", "netns", "exec", &ns, "iptables", "-A", "INPUT", "-s", &peer, "-j", "DROP"])?;
            run(&["ip", "netns", "exec", &ns, "iptables", "-A", "OUTPUT", "-d", &peer, "-j", "DROP"])?;
        }
    }
    Ok(())
}

/// Removes every rule in every node's namespace.
pub fn heal(nodes: usize) -> Result<(), String> {
    for i in 0..nodes {
        run(&["ip", "netns", "exec", &ns_name(i), "iptables", "-F"])?;
    }
    Ok(())
}
