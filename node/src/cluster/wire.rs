//! What nodes say to each other. Every message is an `Envelope` encoded with the store's
//! codec (a version byte, then bincode), carried as bytes by the transport: ractor only
//! sees `Vec<u8>`, so a peer running another version fails to decode instead of
//! misreading, and decoding never panics.

use convoy_actors::behavior::Request;
use convoy_actors::domain::{Command, Query, Reply};
use convoy_actors::ids::UserId;
use convoy_actors::{EntityKey, Rejection, Timestamp};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use super::meta::MetaCommand;
use crate::shard::{NodeAddr, NodeId, RaftGroupId, SnapshotMeta, TypeConfig, Vote};

/// Largest encoded message: well under ractor_cluster's 16 MiB frame limit, one frame over
/// which tears down the whole session.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;
/// Snapshot bytes per chunk.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub from: NodeId,
    /// W3C traceparent of the request that caused this message, if traced.
    pub traceparent: Option<String>,
    pub body: T,
}

/// Who a node is, exchanged when a session opens.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hello {
    pub node: NodeId,
    pub addr: NodeAddr,
    /// The cluster this node belongs to (0: not bootstrapped yet).
    pub cluster_id: u64,
}

/// One Raft group as a node sees it locally.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GroupReport {
    pub group: RaftGroupId,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    pub last_applied: u64,
    pub last_log: u64,
}

/// Requests that want an answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum Call {
    Hello(Hello),
    Heartbeat {
        reports: Vec<GroupReport>,
    },
    Raft {
        group: RaftGroupId,
        rpc: RaftRpc,
    },
    /// A client request for an entity whose shard this node leads.
    Route(Routed),
    Control(Control),
    /// Which users are connected to the sender; answered once applied.
    Presence(PresenceUpdate),
}

impl Call {
    /// What kind of request this is, as metrics label it.
    pub fn kind(&self) -> &'static str {
        match self {
            Call::Hello(_) => "hello",
            Call::Heartbeat { .. } => "heartbeat",
            Call::Raft { rpc: RaftRpc::Append(_), .. } => "raft_append",
            Call::Raft { rpc: RaftRpc::Vote(_) | RaftRpc::PreVote(_), .. } => "raft_vote",
            Call::Raft { rpc: RaftRpc::TransferLeader(_), .. } => "raft_transfer",
            Call::Raft { rpc: RaftRpc::SnapshotChunk { .. }, .. } => "raft_snapshot",
            Call::Route(_) => "route",
            Call::Control(_) => "control",
            Call::Presence(_) => "presence",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Routed {
    Request { key: EntityKey, request: Request },
    Propose { key: EntityKey, command: Command },
    Query { key: EntityKey, query: Query },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<TypeConfig>),
    PreVote(VoteRequest<TypeConfig>),
    TransferLeader(TransferLeaderRequest<TypeConfig>),
    /// One piece of a snapshot; the receiver assembles them and installs after `last`.
    SnapshotChunk {
        vote: Vote,
        meta: SnapshotMeta,
        offset: u64,
        data: Vec<u8>,
        last: bool,
    },
}

/// What the metadata leader (or an operator) asks a node to do.
#[derive(Debug, Serialize, Deserialize)]
pub enum Control {
    /// A node asks to join the cluster (sent to any member, forwarded to the metadata leader).
    Join { node: NodeId, addr: NodeAddr },
    /// A metadata command for the metadata leader to propose.
    Meta(MetaCommand),
    /// Start hosting `group` and make it a Raft group of `members` if it never was.
    InitShard { group: RaftGroupId, members: Vec<(NodeId, NodeAddr)> },
    /// As the group's leader: make its voters exactly `members`.
    Reconcile { group: RaftGroupId, members: Vec<(NodeId, NodeAddr)> },
    /// As the group's leader: hand leadership to `to`.
    TransferLeader { group: RaftGroupId, to: NodeId },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum CallReply {
    Hello(Hello),
    Heartbeat {
        reports: Vec<GroupReport>,
    },
    Append(AppendEntriesResponse<TypeConfig>),
    Vote(VoteResponse<TypeConfig>),
    TransferLeader(TransferLeaderResponse<TypeConfig>),
    /// A chunk was taken; `Some` once the whole snapshot is installed.
    Snapshot(Option<SnapshotResponse<TypeConfig>>),
    Routed(Result<Reply, Rejection>),
    Done,
    /// The request reached a node that cannot serve it; `leader` is its best guess.
    NotHere {
        leader: Option<NodeId>,
        reason: String,
    },
    Failed(String),
}

/// One-way messages.
#[derive(Debug, Serialize, Deserialize)]
pub enum Cast {
    /// Deliver `frame` to every local connection of `users`.
    Push { users: Vec<UserId>, frame: String, committed_at: Option<Timestamp> },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PresenceUpdate {
    /// Everyone connected now (sent when a session opens).
    Full(Vec<UserId>),
    /// Changes since the last update, in order.
    Delta { connected: Vec<UserId>, disconnected: Vec<UserId> },
}
