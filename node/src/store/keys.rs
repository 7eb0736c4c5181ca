//! The key layout of the node's one keyspace. Big-endian integers so keys sort as numbers;
//! `0x00` separates variable-length parts (no id contains it).
//!
//! ```text
//! 00 <name>                                   node metadata (identity, generated secret)
//! 02 <group:u16> 01                           state machine: last applied + membership
//! 02 <group:u16> 02 <entity>                  entity state
//! 02 <group:u16> 03 <entity> 00 <seq:u64>     entity log entry
//! 02 <group:u16> 04 <entity> 00 <idem key>    idempotency index -> (seq, ts, request)
//! 02 <group:u16> 05 <entity> 00 <timer>       timer -> due
//! 02 <group:u16> 06                           cluster metadata (metadata group only)
//! ```
//! Everything a group's state machine owns lies under `02 <group>`: a snapshot is that
//! prefix, and installing one replaces it. Entity log entries and idempotency records are
//! written once and never changed (`append_only`); the rest may change with every apply.
//! Raft logs are in their own files (`log_files.rs`).

use convoy_actors::EntityKey;

use crate::shard::RaftGroupId;

const NODE: u8 = 0x00;
// 0x01 held the Raft logs before they had files of their own (format version 2).
const SM: u8 = 0x02;

const APPLIED: u8 = 0x01;
const STATE: u8 = 0x02;
const ENTRY: u8 = 0x03;
const IDEMPOTENCY: u8 = 0x04;
const TIMER: u8 = 0x05;
const CLUSTER: u8 = 0x06;
// `append_only` is one contiguous range.
const _: () = assert!(IDEMPOTENCY == ENTRY + 1);

pub fn node_meta(name: &str) -> Vec<u8> {
    let mut k = vec![NODE];
    k.extend_from_slice(name.as_bytes());
    k
}

/// `02 <group:u16>`: the bytes before a state machine row's tag.
const SM_PREFIX: usize = 3;

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

/// `[start, end)` of the rows of `group`'s state machine that are written once and never
/// changed: entity log entries and idempotency records.
pub fn append_only(group: RaftGroupId) -> (Vec<u8>, Vec<u8>) {
    (sm(group, ENTRY), sm(group, IDEMPOTENCY + 1))
}

/// A row of `append_only`, by what it belongs to. `entity` is the entity's part of the key,
/// as `state_entity` returns it for the entity's state.
#[derive(Debug, PartialEq, Eq)]
pub enum AppendOnlyRow<'k> {
    Entry {
        entity: &'k [u8],
        seq: u64,
    },
    /// Its seq is in the value.
    Idempotency {
        entity: &'k [u8],
    },
}

/// What the `append_only` row `key` belongs to; `None` if it is not one.
pub fn append_only_row(key: &[u8]) -> Option<AppendOnlyRow<'_>> {
    if key.first() != Some(&SM) {
        return None;
    }
    let (&tag, rest) = key.get(SM_PREFIX..)?.split_first()?;
    // The entity is its kind byte (which may be 0x00) and its id, up to the separator.
    let end = 1 + rest.get(1..)?.iter().position(|&b| b == 0x00)?;
    let entity = &rest[..end];
    match tag {
        ENTRY => {
            let seq: [u8; 8] = rest[end + 1..].try_into().ok()?;
            Some(AppendOnlyRow::Entry { entity, seq: u64::from_be_bytes(seq) })
        }
        IDEMPOTENCY => Some(AppendOnlyRow::Idempotency { entity }),
        _ => None,
    }
}

/// The entity's part of an entity state key; `None` if `key` is not one.
pub fn state_entity(key: &[u8]) -> Option<&[u8]> {
    let (&tag, entity) = key.get(SM_PREFIX..)?.split_first()?;
    (key[0] == SM && tag == STATE).then_some(entity)
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

/// `[start, end)` of every idempotency record of `group`.
pub fn idempotency_records(group: RaftGroupId) -> (Vec<u8>, Vec<u8>) {
    (sm(group, IDEMPOTENCY), sm(group, IDEMPOTENCY + 1))
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

#[cfg(test)]
mod tests {
    use convoy_actors::ids::{GroupId, UserId};

    use super::*;

    #[test]
    fn append_only_rows_name_the_entity_of_its_state_row() {
        let group = RaftGroupId(7);
        let key = EntityKey::Group(GroupId::parse("g-1").unwrap());
        let state_key = state(group, &key);
        let entity = state_entity(&state_key).expect("a state key");
        assert_eq!(append_only_row(&entry(group, &key, 42)), Some(AppendOnlyRow::Entry { entity, seq: 42 }));
        assert_eq!(append_only_row(&idempotency(group, &key, "u-1/m-1")), Some(AppendOnlyRow::Idempotency { entity }));
        let other = EntityKey::User(UserId::parse("g-1").unwrap());
        assert_ne!(state_entity(&state(group, &other)), Some(entity), "kinds are part of the entity");

        let (lo, hi) = append_only(group);
        for k in [entry(group, &key, 1), entry(group, &key, u64::MAX), idempotency(group, &key, "x")] {
            assert!(lo <= k && k < hi, "{k:?} is append-only");
        }
        for k in [state(group, &key), applied(group), timer(group, &key, b"t"), cluster_state(group)] {
            assert!(k < lo || k >= hi, "{k:?} is not append-only");
            assert_eq!(append_only_row(&k), None);
        }
        let elsewhere = entry(RaftGroupId(8), &key, 1);
        assert!(elsewhere < lo || elsewhere >= hi, "another group's entries are outside the range");
        assert_eq!(state_entity(&entry(group, &key, 1)), None);
        assert_eq!(append_only_row(&[SM]), None);
    }
}
