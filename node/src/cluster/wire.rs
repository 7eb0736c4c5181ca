//! What nodes say to each other. Every message is an `Envelope` encoded with the store's
//! codec (a version byte, then bincode), carried as bytes by the transport: ractor only
//! sees `Vec<u8>`, so a peer running another version fails to decode instead of
//! misreading, and decoding never panics.
//!
//! Messages to a peer travel in batches (`Batch`): requests, their answers and one-way
//! messages as `Frame`s, each encoded on its own, requests and answers matched by id.

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
use crate::shard::{NodeAddr, NodeId, RaftGroupId, RequestOrigin, SnapshotMeta, TypeConfig, Vote};

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
    /// A client request for an entity whose shard this node leads, and the client request it
    /// serves, if one.
    Route(Routed, Option<RequestOrigin>),
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
            Call::Route(..) => "route",
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
    /// `shards` is its `cluster.shards`: a node that counts shards differently is refused.
    Join { node: NodeId, addr: NodeAddr, shards: u16 },
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

/// One message in a batch.
#[derive(Debug, Deserialize)]
pub enum Frame {
    Call { id: u64, call: Call },
    Reply { id: u64, reply: CallReply },
    Cast(Cast),
}

/// A `Frame` as it is sent, borrowing what it carries; it encodes exactly as `Frame` decodes.
#[derive(Debug, Serialize)]
pub enum FrameRef<'a> {
    Call { id: u64, call: &'a Call },
    Reply { id: u64, reply: &'a CallReply },
    Cast(&'a Cast),
}

/// Frames sent to a peer as one transport message: each is its length (u32, little
/// endian), then its encoded envelope.
#[derive(Debug, Default)]
pub struct Batch {
    bytes: Vec<u8>,
    frames: usize,
}

impl Batch {
    pub fn push(&mut self, frame: &[u8]) {
        let len = u32::try_from(frame.len()).expect("frames are limited to MAX_MESSAGE_BYTES");
        self.bytes.extend_from_slice(&len.to_le_bytes());
        self.bytes.extend_from_slice(frame);
        self.frames += 1;
    }

    pub fn frames(&self) -> usize {
        self.frames
    }

    pub fn bytes(&self) -> usize {
        self.bytes.len()
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// The frames of a received batch, in order; an error, and nothing after it, where a
    /// length runs past the end.
    pub fn frames_of(bytes: &[u8]) -> impl Iterator<Item = Result<&[u8], String>> {
        let mut rest = bytes;
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let taken = std::mem::take(&mut rest);
            let Some((len, tail)) = taken.split_first_chunk::<4>() else {
                return Some(Err(format!("a frame length cut short ({} bytes)", taken.len())));
            };
            let len = u32::from_le_bytes(*len) as usize;
            if tail.len() < len {
                return Some(Err(format!("a frame of {len} bytes with only {} left", tail.len())));
            }
            let (frame, after) = tail.split_at(len);
            rest = after;
            Some(Ok(frame))
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::codec;

    #[test]
    fn frames_sent_borrowed_decode_as_frames() {
        let cast = Cast::Push { users: vec![UserId::parse("u1").unwrap()], frame: "{}".into(), committed_at: None };
        let call = Call::Presence(PresenceUpdate::Full(vec![UserId::parse("u2").unwrap()]));
        let reply = CallReply::NotHere { leader: Some(3), reason: "moved".into() };
        let sent =
            [FrameRef::Call { id: 7, call: &call }, FrameRef::Reply { id: 8, reply: &reply }, FrameRef::Cast(&cast)];
        let mut batch = Batch::default();
        for frame in &sent {
            batch.push(&codec::encode(&Envelope { from: 1, traceparent: None, body: frame }));
        }
        assert_eq!(batch.frames(), 3);
        let got: Vec<Frame> = Batch::frames_of(&batch.into_bytes())
            .map(|f| codec::decode::<Envelope<Frame>>("frame", f.unwrap()).unwrap().body)
            .collect();
        assert!(
            matches!(&got[0], Frame::Call { id: 7, call: Call::Presence(PresenceUpdate::Full(u)) } if u.len() == 1)
        );
        assert!(matches!(&got[1], Frame::Reply { id: 8, reply: CallReply::NotHere { leader: Some(3), .. } }));
        assert!(matches!(&got[2], Frame::Cast(Cast::Push { users, .. }) if users.len() == 1));
    }

    #[test]
    fn a_torn_batch_yields_its_whole_frames_then_one_error() {
        let mut batch = Batch::default();
        batch.push(b"abc");
        batch.push(b"defgh");
        let mut bytes = batch.into_bytes();
        bytes.truncate(bytes.len() - 2);
        let frames: Vec<_> = Batch::frames_of(&bytes).collect();
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0], Ok(&b"abc"[..]));
        assert!(frames[1].as_ref().is_err_and(|e| e.contains("5 bytes with only 3 left")), "{frames:?}");
        assert_eq!(Batch::frames_of(&[1, 0]).collect::<Vec<_>>().len(), 1, "a cut length is one error");
        assert_eq!(Batch::frames_of(&[]).count(), 0);
    }
}
