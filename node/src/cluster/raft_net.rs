//! Raft RPCs over the peer transport, for every group. Snapshots travel in chunks of
//! `SNAPSHOT_CHUNK_BYTES` (one frame over ractor_cluster's limit would tear the session
//! down); the receiver assembles them and installs the whole.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use parking_lot::Mutex;

use super::transport::Transport;
use super::wire::{Call, CallReply, RaftRpc, SNAPSHOT_CHUNK_BYTES};
use crate::shard::network::{RaftTransport, Snapshot, SnapshotData, TransportError as RaftTransportError};
use crate::shard::{NodeId, RaftGroupId, SnapshotMeta, TypeConfig, Vote};

/// A snapshot larger than this is refused by the receiver (it is held in memory).
pub const MAX_SNAPSHOT_BYTES: u64 = 4 << 30;
/// How long a snapshot chunk may take.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(10);

pub struct PeerRaft {
    transport: Arc<Transport>,
}

impl PeerRaft {
    pub fn new(transport: Arc<Transport>) -> PeerRaft {
        PeerRaft { transport }
    }

    async fn call(
        &self,
        target: NodeId,
        group: RaftGroupId,
        rpc: RaftRpc,
        timeout: Duration,
    ) -> Result<CallReply, RaftTransportError> {
        match self.transport.call(target, &Call::Raft { group, rpc }, timeout).await {
            Ok(CallReply::NotHere { reason, .. }) => Err(RaftTransportError::Failed(reason)),
            Ok(CallReply::Failed(reason)) => Err(RaftTransportError::Failed(reason)),
            Ok(reply) => Ok(reply),
            Err(e) => Err(RaftTransportError::Failed(e.to_string())),
        }
    }
}

fn unexpected(reply: CallReply) -> RaftTransportError {
    RaftTransportError::Failed(format!("unexpected answer to a raft request: {reply:?}"))
}

impl RaftTransport for PeerRaft {
    async fn append_entries(
        &self,
        target: NodeId,
        group: RaftGroupId,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RaftTransportError> {
        match self.call(target, group, RaftRpc::Append(rpc), option.hard_ttl()).await? {
            CallReply::Append(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn vote(
        &self,
        target: NodeId,
        group: RaftGroupId,
        rpc: VoteRequest<TypeConfig>,
        pre_vote: bool,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RaftTransportError> {
        let rpc = if pre_vote { RaftRpc::PreVote(rpc) } else { RaftRpc::Vote(rpc) };
        match self.call(target, group, rpc, option.hard_ttl()).await? {
            CallReply::Vote(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn snapshot(
        &self,
        target: NodeId,
        group: RaftGroupId,
        vote: Vote,
        snapshot: Snapshot,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, RaftTransportError> {
        let data = snapshot
            .snapshot
            .into_rows()
            .await
            .map_err(|e| RaftTransportError::Failed(format!("reading the snapshot to send: {e}")))?;
        let total = data.len();
        let mut offset = 0;
        loop {
            let end = (offset + SNAPSHOT_CHUNK_BYTES).min(total);
            let last = end == total;
            let rpc = RaftRpc::SnapshotChunk {
                vote,
                meta: snapshot.meta.clone(),
                offset: offset as u64,
                data: data[offset..end].to_vec(),
                last,
            };
            match self.call(target, group, rpc, CHUNK_TIMEOUT).await? {
                CallReply::Snapshot(Some(done)) if last => return Ok(done),
                CallReply::Snapshot(None) if !last => {}
                other => return Err(unexpected(other)),
            }
            metrics::counter!("convoy_snapshot_bytes_sent_total").increment((end - offset) as u64);
            offset = end;
        }
    }

    async fn transfer_leader(
        &self,
        target: NodeId,
        group: RaftGroupId,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RaftTransportError> {
        match self.call(target, group, RaftRpc::TransferLeader(req), option.hard_ttl()).await? {
            CallReply::TransferLeader(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }
}

/// One snapshot chunk as it arrived.
pub struct Chunk {
    pub vote: Vote,
    pub meta: SnapshotMeta,
    pub offset: u64,
    pub data: Vec<u8>,
    pub last: bool,
}

/// A snapshot being received: what it is, and the bytes so far.
type Partial = (SnapshotMeta, Vec<u8>);

/// Snapshots being received, by (group, sender).
#[derive(Default)]
pub struct SnapshotAssembly {
    parts: Mutex<HashMap<(RaftGroupId, NodeId), Partial>>,
}

/// A snapshot chunk taken in; `Some` once the last chunk made it whole.
pub enum ChunkOutcome {
    More,
    Complete(Vote, Box<Snapshot>),
}

impl SnapshotAssembly {
    pub fn take(&self, group: RaftGroupId, from: NodeId, chunk: Chunk) -> Result<ChunkOutcome, String> {
        let Chunk { vote, meta, offset, data, last } = chunk;
        let mut parts = self.parts.lock();
        let key = (group, from);
        if offset == 0 {
            parts.insert(key, (meta.clone(), Vec::with_capacity(data.len())));
        }
        let Some((started_meta, buf)) = parts.get_mut(&key) else {
            return Err(format!("snapshot chunk at offset {offset} without its start"));
        };
        if *started_meta != meta || buf.len() as u64 != offset {
            parts.remove(&key);
            return Err(format!("snapshot chunk at offset {offset} does not continue the transfer; restart it"));
        }
        if offset + data.len() as u64 > MAX_SNAPSHOT_BYTES {
            parts.remove(&key);
            return Err(format!("snapshot larger than {MAX_SNAPSHOT_BYTES} bytes"));
        }
        buf.extend_from_slice(&data);
        if !last {
            return Ok(ChunkOutcome::More);
        }
        let (meta, data) = parts.remove(&key).expect("present");
        metrics::counter!("convoy_snapshots_received_total").increment(1);
        Ok(ChunkOutcome::Complete(vote, Box::new(Snapshot { meta, snapshot: SnapshotData::Rows(data) })))
    }
}
