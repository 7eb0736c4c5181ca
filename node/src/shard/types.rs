//! The Raft type configuration shared by every group a node runs: one per shard, plus the
//! metadata group.

use std::fmt;
use std::sync::Arc;

use convoy_actors::domain::{Command, Reply};
use convoy_actors::{EntityKey, Rejection, Timestamp};
use serde::{Deserialize, Serialize};

use crate::cluster::meta::{MetaCommand, MetaError};

/// A Raft group: shard `0..shards`, or the metadata group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RaftGroupId(pub u16);

impl RaftGroupId {
    /// The metadata group: cluster members and shard placement.
    pub const META: RaftGroupId = RaftGroupId(u16::MAX);

    pub fn is_meta(self) -> bool {
        self == Self::META
    }
}

impl fmt::Display for RaftGroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_meta() { f.write_str("meta") } else { write!(f, "shard-{}", self.0) }
    }
}

/// A node's Raft id: a hash of its name and the incarnation of its data directory, so a
/// node whose disk was wiped rejoins as a new member instead of reverting its log.
pub type NodeId = u64;

/// Where a node can be reached. Carried in Raft membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NodeAddr {
    pub name: String,
    pub cluster_addr: String,
    pub client_url: String,
    pub admin_url: String,
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.cluster_addr)
    }
}

/// One command for an entity, as it sits in the log. `at` is the proposing leader's clock:
/// every replica applies with the same time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntityCommand {
    pub key: EntityKey,
    pub cmd: Command,
    pub at: Timestamp,
    /// W3C traceparent of the request that caused it, so apply spans join its trace.
    pub traceparent: Option<String>,
    /// The client request it serves, if one (see [`RequestOrigin`]).
    pub origin: Option<RequestOrigin>,
}

/// One client request, wherever in the cluster it is served: random, and the same for every
/// attempt the cluster makes on the request's behalf (a retry after a leader failed). A
/// command's idempotency record keeps it, so an attempt that finds the record of an earlier
/// attempt of its own request answers as that attempt would have (`duplicate: false`),
/// not as a client's retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RequestOrigin(pub u64);

tokio::task_local! {
    static ORIGIN: RequestOrigin;
}

impl RequestOrigin {
    /// A new request's origin.
    pub fn random() -> RequestOrigin {
        RequestOrigin(rand::random())
    }

    /// The request the current task serves, if it serves one.
    pub fn current() -> Option<RequestOrigin> {
        ORIGIN.try_with(|o| *o).ok()
    }

    /// Runs `f` on behalf of this request: commands proposed within it carry it.
    pub async fn scope<F: std::future::Future>(self, f: F) -> F::Output {
        ORIGIN.scope(self, f).await
    }
}

/// A stored idempotency record: where the entry went, and the request that wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub seq: u64,
    pub ts: Timestamp,
    pub origin: Option<RequestOrigin>,
}

/// A log entry's application payload: entity commands in shard groups, cluster metadata
/// commands in the metadata group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RaftRequest {
    /// Boxed: the command is most of an entry's size, and the metadata group's are small.
    Entity(Box<EntityCommand>),
    Meta(MetaCommand),
}

impl fmt::Display for RaftRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RaftRequest::Entity(c) => write!(f, "{} at {}", c.key, c.at.0),
            RaftRequest::Meta(c) => write!(f, "{c:?}"),
        }
    }
}

/// What applying an entry answered. Only ever handed to the local proposer, never stored
/// or sent, so its serde impls refuse to work rather than invent a wire form.
#[derive(Debug, Clone)]
pub enum ApplyResult {
    /// `batch`: how many entries were applied (and written) together with this one.
    Entity {
        reply: Arc<Result<Reply, Rejection>>,
        batch: u32,
    },
    Meta(Result<(), MetaError>),
    Nothing,
}

impl Serialize for ApplyResult {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("apply results are local to the proposer and never serialized"))
    }
}

impl<'de> Deserialize<'de> for ApplyResult {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(serde::de::Error::custom("apply results are local to the proposer and never deserialized"))
    }
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = RaftRequest,
        R = ApplyResult,
        NodeId = NodeId,
        Node = NodeAddr,
        AsyncRuntime = super::timer_grid::GridRuntime,
);

pub type Raft = openraft::Raft<TypeConfig, super::state_machine::ShardStateMachine>;
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
