//! The key layout of the node's one keyspace. Big-endian integers so keys sort as numbers;
//! `0x00` separates variable-length parts (no id contains it).
//!
//! ```text
//! 00 <name>                                   node metadata (identity, generated secret)
//! 01 <group:u16> 01                           Raft vote
//! 01 <group:u16> 02                           Raft committed log id
//! 01 <group:u16> 03                           Raft last purged log id
//! 01 <group:u16> 10 <first index:u64>         Raft log segment (consecutive entries)
//! 02 <group:u16> 01                           state machine: last applied + membership
//! 02 <group:u16> 02 <entity>                  entity state
//! 02 <group:u16> 03 <entity> 00 <seq:u64>     entity log entry
//! 02 <group:u16> 04 <entity> 00 <idem key>    idempotency index -> (seq, ts)
//! 02 <group:u16> 05 <entity> 00 <timer>       timer -> due
//! 02 <group:u16> 06                           cluster metadata (metadata group only)
//! ```
//! Everything a group's state machine owns lies under `02 <group>`: a snapshot is that
//! prefix, and installing one replaces it.

use convoy_actors::EntityKey;

use crate::shard::RaftGroupId;

const NODE: u8 = 0x00;
const RAFT: u8 = 0x01;
const SM: u8 = 0x02;

const VOTE: u8 = 0x01;
const COMMITTED: u8 = 0x02;
const PURGED: u8 = 0x03;
const SEGMENT: u8 = 0x10;

const APPLIED: u8 = 0x01;
const STATE: u8 = 0x02;
const ENTRY: u8 = 0x03;
const IDEMPOTENCY: u8 = 0x04;
const TIMER: u8 = 0x05;
const CLUSTER: u8 = 0x06;

pub fn node_meta(name: &str) -> Vec<u8> {
    let mut k = vec![NODE];
    k.extend_from_slice(name.as_bytes());
    k
}

fn raft(group: RaftGroupId, tag: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(12);
    k.push(RAFT);
    k.extend_from_slice(&group.0.to_be_bytes());
    k.push(tag);
    k
}

/// `[start, end)` of everything a group's Raft log storage owns.
pub fn raft_group(group: RaftGroupId) -> (Vec<u8>, Vec<u8>) {
    let mut start = vec![RAFT];
    start.extend_from_slice(&group.0.to_be_bytes());
    let mut end = start.clone();
    end.push(0xFF);
    (start, end)
}

pub fn vote(group: RaftGroupId) -> Vec<u8> {
    raft(group, VOTE)
}
pub fn committed(group: RaftGroupId) -> Vec<u8> {
    raft(group, COMMITTED)
}
pub fn purged(group: RaftGroupId) -> Vec<u8> {
    raft(group, PURGED)
}
pub fn segment(group: RaftGroupId, first_index: u64) -> Vec<u8> {
    let mut k = raft(group, SEGMENT);
    k.extend_from_slice(&first_index.to_be_bytes());
    k
}
/// `[start, end)` of every log segment of `group`.
pub fn segments(group: RaftGroupId) -> (Vec<u8>, Vec<u8>) {
    (raft(group, SEGMENT), raft(group, SEGMENT + 1))
}
pub fn segment_index(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

fn sm(group: RaftGroupId, tag: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(48);
    k.push(SM);
    k.extend_from_slice(&group.0.to_be_bytes());
    k.push(tag);
    k
}

/// `[start, end)` of everything `group`'s state machine owns.
pub fn state_machine(group: RaftGroupId) -> (Vec<u8>, Vec<u8>) {
    let mut start = vec![SM];
    start.extend_from_slice(&group.0.to_be_bytes());
    let mut end = vec![SM];
    end.extend_from_slice(&group.0.to_be_bytes());
    end.push(0xFF);
    (start, end)
}

pub fn applied(group: RaftGroupId) -> Vec<u8> {
    sm(group, APPLIED)
}

pub fn cluster_state(group: RaftGroupId) -> Vec<u8> {
    sm(group, CLUSTER)
}

fn push_entity(k: &mut Vec<u8>, key: &EntityKey) {
    k.push(key.kind() as u8);
    k.extend_from_slice(key.id().as_bytes());
}

pub fn state(group: RaftGroupId, key: &EntityKey) -> Vec<u8> {
    let mut k = sm(group, STATE);
    push_entity(&mut k, key);
    k
}

fn entity_scoped(group: RaftGroupId, tag: u8, key: &EntityKey) -> Vec<u8> {
    let mut k = sm(group, tag);
    push_entity(&mut k, key);
    k.push(0x00);
    k
}

pub fn entry(group: RaftGroupId, key: &EntityKey, seq: u64) -> Vec<u8> {
    let mut k = entity_scoped(group, ENTRY, key);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}
/// `[start, end)` of an entity's entries.
pub fn entries(group: RaftGroupId, key: &EntityKey) -> (Vec<u8>, Vec<u8>) {
    let start = entity_scoped(group, ENTRY, key);
    let mut end = start.clone();
    *end.last_mut().expect("non-empty") = 0x01;
    (start, end)
}

pub fn idempotency(group: RaftGroupId, key: &EntityKey, idem: &str) -> Vec<u8> {
    let mut k = entity_scoped(group, IDEMPOTENCY, key);
    k.extend_from_slice(idem.as_bytes());
    k
}

pub fn timer(group: RaftGroupId, key: &EntityKey, timer: &[u8]) -> Vec<u8> {
    let mut k = entity_scoped(group, TIMER, key);
    k.extend_from_slice(timer);
    k
}
/// `[start, end)` of every timer of `group`.
pub fn timers(group: RaftGroupId) -> (Vec<u8>, Vec<u8>) {
    (sm(group, TIMER), sm(group, TIMER + 1))
}
