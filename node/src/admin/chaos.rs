//! `/v1/chaos/...`: fault injection, answered only with `chaos.enabled = true`. Faults are
//! injected into this node only: into its traffic with one peer (dropped or delayed, see
//! `cluster::faults`), its storage writer (every write fails, or writes stall), or one
//! entity's actor (it crashes).
//!
//! Every change is logged at WARN and counted in `convoy_chaos_faults_injected_total{fault}`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::{AdminState, JsonReply, authorize, entity_key, refuse};
use crate::cluster::faults::{MAX_DELAY, PeerFault};
use crate::shard::NodeId;

type Answer = Result<axum::Json<Value>, JsonReply>;

/// Admin token, then `chaos.enabled`.
fn allowed(s: &AdminState, headers: &HeaderMap) -> Result<(), JsonReply> {
    authorize(s, headers)?;
    if !s.chaos {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "fault injection is disabled on this node: set chaos.enabled = true".into(),
        ));
    }
    Ok(())
}

fn injected(fault: &'static str) {
    metrics::counter!("convoy_chaos_faults_injected_total", "fault" => fault).increment(1);
}

/// The member named `name`: a peer of this node, not the node itself.
fn peer(s: &AdminState, name: &str) -> Result<NodeId, JsonReply> {
    let state = s.cluster.state.borrow().clone();
    let Some((&node, _)) = state.members.iter().find(|(_, m)| m.addr.name == name) else {
        let mut names: Vec<&str> = state.members.values().map(|m| m.addr.name.as_str()).collect();
        names.sort_unstable();
        return Err(refuse(StatusCode::NOT_FOUND, format!("no member named {name:?}; members: {}", names.join(", "))));
    };
    if node == s.cluster.transport.me() {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            format!("{name} is this node: name one of its peers (faults apply to the traffic with a peer)"),
        ));
    }
    Ok(node)
}

fn name_of(s: &AdminState, node: NodeId) -> String {
    s.cluster.state.borrow().name_of(node).map_or_else(|| format!("{node:x}"), str::to_string)
}

/// Local Raft groups that stopped on an error (a storage write that failed): shards start
/// again by themselves after a back-off; the metadata group needs a restart of the node.
fn stopped_groups(s: &AdminState) -> Vec<String> {
    let mut stopped: Vec<_> =
        s.router.local_hosts().into_iter().filter(|h| h.stopped().is_some()).map(|h| h.group()).collect();
    stopped.sort();
    stopped.into_iter().map(|g| g.to_string()).collect()
}

/// The faults in force on this node.
fn in_force(s: &AdminState) -> Value {
    let peers = s.cluster.transport.faults().snapshot();
    let dropped: Vec<String> = peers.iter().filter(|(_, f)| f.dropped).map(|(n, _)| name_of(s, *n)).collect();
    let delayed: BTreeMap<String, u64> =
        peers.iter().filter_map(|(n, f)| f.delay.map(|d| (name_of(s, *n), d.as_millis() as u64))).collect();
    let (failing, stalled) = (s.storage.is_failing(), s.storage.is_stalled());
    json!({
        "node": name_of(s, s.cluster.transport.me()),
        "active": !peers.is_empty() || failing || stalled,
        "peers": { "dropped": dropped, "delayed_ms": delayed },
        "storage": {
            "failing": failing,
            "stalled": stalled,
            "stopped_groups": stopped_groups(s),
            "restart_needed": super::meta_stopped(s).is_some(),
        },
    })
}

fn describe(fault: &PeerFault) -> Value {
    json!({ "dropped": fault.dropped, "delay_ms": fault.delay.map(|d| d.as_millis() as u64) })
}

/// `GET /v1/chaos`: the faults in force on this node.
pub(super) async fn faults(State(s): State<Arc<AdminState>>, headers: HeaderMap) -> Answer {
    allowed(&s, &headers)?;
    Ok(axum::Json(in_force(&s)))
}

/// A refusal of a missing or bad `?ms=N`, saying what to pass.
fn bad_ms(what: String) -> JsonReply {
    let max = MAX_DELAY.as_millis();
    refuse(StatusCode::BAD_REQUEST, format!("{what}: pass ?ms=N with N milliseconds, from 1 to {max}"))
}

/// `?ms=N`, from 1 to [`MAX_DELAY`] in milliseconds; `None` when absent.
fn ms_param(query: &HashMap<String, String>) -> Result<Option<Duration>, JsonReply> {
    let Some(raw) = query.get("ms") else { return Ok(None) };
    let ms: u64 = raw.trim().parse().map_err(|_| bad_ms(format!("ms={raw:?} is not a whole number")))?;
    if ms == 0 || u128::from(ms) > MAX_DELAY.as_millis() {
        return Err(bad_ms(format!("ms={ms} is out of range")));
    }
    Ok(Some(Duration::from_millis(ms)))
}

/// `POST /v1/chaos/peers/{name}/drop|delay|heal`: drop all traffic with peer `name`, delay
/// every message to it by `?ms=N`, or clear both.
pub(super) async fn peer_fault(
    State(s): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path((name, action)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Answer {
    allowed(&s, &headers)?;
    let node = peer(&s, &name)?;
    let faults = s.cluster.transport.faults();
    let mut reply = match action.as_str() {
        "drop" => {
            faults.drop_traffic(node);
            tracing::warn!(peer = %name, fault = "drop", "fault injected: all traffic with the peer is dropped");
            injected("peer_drop");
            json!({ "peer": name, "fault": "drop" })
        }
        "delay" => {
            let Some(delay) = ms_param(&query)? else { return Err(bad_ms("no delay given".into())) };
            let ms = delay.as_millis() as u64;
            faults.set_delay(node, delay);
            tracing::warn!(peer = %name, fault = "delay", delay_ms = ms, "fault injected: messages to the peer are delayed");
            injected("peer_delay");
            json!({ "peer": name, "fault": "delay", "delay_ms": ms })
        }
        "heal" => {
            let was = faults.heal(node);
            match &was {
                Some(f) => {
                    tracing::warn!(peer = %name, fault = "heal", was = ?f, "fault healed: traffic with the peer flows again")
                }
                None => tracing::warn!(peer = %name, fault = "heal", "fault heal asked for a peer without faults"),
            }
            injected("peer_heal");
            json!({ "peer": name, "fault": "heal", "healed": was.as_ref().map(describe) })
        }
        other => {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                format!("unknown peer fault {other:?}: use drop, delay or heal"),
            ));
        }
    };
    reply["in_force"] = in_force(&s);
    Ok(axum::Json(reply))
}

/// `POST /v1/chaos/peers/heal`: clears the faults towards every peer.
pub(super) async fn heal_peers(State(s): State<Arc<AdminState>>, headers: HeaderMap) -> Answer {
    allowed(&s, &headers)?;
    let was = s.cluster.transport.faults().heal_all();
    let healed: BTreeMap<String, Value> = was.iter().map(|(n, f)| (name_of(&s, *n), describe(f))).collect();
    let names: Vec<&str> = healed.keys().map(String::as_str).collect();
    tracing::warn!(peers = %names.join(","), fault = "heal", "fault healed: traffic with every peer flows again");
    injected("peer_heal");
    Ok(axum::Json(json!({ "fault": "heal", "healed": healed, "in_force": in_force(&s) })))
}

/// `POST /v1/chaos/storage/fail|stall|heal`: every storage write fails, writes stall until
/// healed, or both stop.
pub(super) async fn storage_fault(
    State(s): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path(action): Path<String>,
) -> Answer {
    allowed(&s, &headers)?;
    let storage = &s.storage;
    let mut reply = match action.as_str() {
        "fail" => {
            storage.fail.store(true, std::sync::atomic::Ordering::SeqCst);
            tracing::warn!(
                fault = "storage_fail",
                "fault injected: every storage write fails; Raft groups that hit a failed write stop, \
                 and shards start again by themselves once writes go through"
            );
            injected("storage_fail");
            json!({ "fault": "storage_fail" })
        }
        "stall" => {
            storage.set_stall(true);
            tracing::warn!(fault = "storage_stall", "fault injected: storage writes stall until healed");
            injected("storage_stall");
            json!({ "fault": "storage_stall" })
        }
        "heal" => {
            let (failing, stalled) = (storage.is_failing(), storage.is_stalled());
            storage.fail.store(false, std::sync::atomic::Ordering::SeqCst);
            storage.set_stall(false);
            tracing::warn!(
                fault = "storage_heal",
                was_failing = failing,
                was_stalled = stalled,
                "fault healed: storage writes go through again"
            );
            injected("storage_heal");
            json!({ "fault": "storage_heal", "healed": { "failing": failing, "stalled": stalled } })
        }
        other => {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                format!("unknown storage fault {other:?}: use fail, stall or heal"),
            ));
        }
    };
    if let Some(why) = super::meta_stopped(&s) {
        tracing::warn!(error = %why, "the metadata group stopped on a failed storage write; restart the node to bring it back");
    }
    reply["in_force"] = in_force(&s);
    Ok(axum::Json(reply))
}

/// `POST /v1/chaos/entities/{kind}/{id}/crash`: the entity's actor fails on purpose; with
/// `?ms=N` it first hangs N ms, so that requests queue up in its mailbox.
pub(super) async fn crash_entity(
    State(s): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path((kind, id)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Answer {
    allowed(&s, &headers)?;
    let hang = ms_param(&query)?.unwrap_or_default();
    let key = entity_key(&kind, &id)?;
    let group = s.router.shard_of(&key);
    let Some(host) = s.router.local(group) else {
        return Err(refuse(StatusCode::CONFLICT, format!("{key} lives in {group}, which this node does not hold")));
    };
    let crashed = host.entities().crash(&key, hang);
    let hang_ms = hang.as_millis() as u64;
    if crashed {
        tracing::warn!(entity = %key, fault = "entity_crash", hang_ms, "fault injected: the entity's actor crashes");
        injected("entity_crash");
    }
    Ok(axum::Json(json!({
        "entity": key.to_string(), "shard": group.to_string(), "crashed": crashed, "hang_ms": hang_ms
    })))
}
