//! Raft RPCs between nodes. Every group's traffic shares one connection per peer
//! (`openraft-multi`'s `GroupRouter`); the connection itself is a `RaftTransport`, which
//! the cluster layer provides. A node with no peers uses `NoPeers`.

use std::future::Future;
use std::sync::Arc;

use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use openraft_multi::{GroupNetworkAdapter, GroupRouter};

use super::{NodeAddr, NodeId, RaftGroupId, TypeConfig, Vote};

pub use super::state_machine::{Snapshot, SnapshotData};

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("node {0} is not connected")]
    NotConnected(NodeId),
    #[error("{0}")]
    Failed(String),
}

fn unreachable(e: TransportError) -> Unreachable<TypeConfig> {
    Unreachable::new(&e)
}

/// Carries Raft RPCs for any group to a peer node.
pub trait RaftTransport: Send + Sync + 'static {
    fn append_entries(
        &self,
        target: NodeId,
        group: RaftGroupId,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> impl Future<Output = Result<AppendEntriesResponse<TypeConfig>, TransportError>> + Send;
    fn vote(
        &self,
        target: NodeId,
        group: RaftGroupId,
        rpc: VoteRequest<TypeConfig>,
        pre_vote: bool,
        option: RPCOption,
    ) -> impl Future<Output = Result<VoteResponse<TypeConfig>, TransportError>> + Send;
    fn snapshot(
        &self,
        target: NodeId,
        group: RaftGroupId,
        vote: Vote,
        snapshot: Snapshot,
        option: RPCOption,
    ) -> impl Future<Output = Result<SnapshotResponse<TypeConfig>, TransportError>> + Send;
    fn transfer_leader(
        &self,
        target: NodeId,
        group: RaftGroupId,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> impl Future<Output = Result<TransferLeaderResponse<TypeConfig>, TransportError>> + Send;
}

/// The transport of a node that has no peers: every RPC finds nobody.
#[derive(Clone, Default)]
pub struct NoPeers;

impl RaftTransport for NoPeers {
    async fn append_entries(
        &self,
        target: NodeId,
        _: RaftGroupId,
        _: AppendEntriesRequest<TypeConfig>,
        _: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, TransportError> {
        Err(TransportError::NotConnected(target))
    }
    async fn vote(
        &self,
        target: NodeId,
        _: RaftGroupId,
        _: VoteRequest<TypeConfig>,
        _: bool,
        _: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, TransportError> {
        Err(TransportError::NotConnected(target))
    }
    async fn snapshot(
        &self,
        target: NodeId,
        _: RaftGroupId,
        _: Vote,
        _: Snapshot,
        _: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, TransportError> {
        Err(TransportError::NotConnected(target))
    }
    async fn transfer_leader(
        &self,
        target: NodeId,
        _: RaftGroupId,
        _: TransferLeaderRequest<TypeConfig>,
        _: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, TransportError> {
        Err(TransportError::NotConnected(target))
    }
}

/// openraft's view of the transport: routes each RPC by (target, group).
pub struct Network<T> {
    transport: Arc<T>,
}

impl<T> Clone for Network<T> {
    fn clone(&self) -> Self {
        Network { transport: self.transport.clone() }
    }
}

impl<T: RaftTransport> Network<T> {
    pub fn new(transport: Arc<T>) -> Self {
        Network { transport }
    }
}

impl<T: RaftTransport> GroupRouter<TypeConfig, RaftGroupId> for Network<T> {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &self,
        target: NodeId,
        group: RaftGroupId,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.transport
            .append_entries(target, group, rpc, option)
            .await
            .map_err(|e| RPCError::Unreachable(unreachable(e)))
    }

    async fn vote(
        &self,
        target: NodeId,
        group: RaftGroupId,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.transport.vote(target, group, rpc, false, option).await.map_err(|e| RPCError::Unreachable(unreachable(e)))
    }

    async fn pre_vote(
        &self,
        target: NodeId,
        group: RaftGroupId,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.transport.vote(target, group, rpc, true, option).await.map_err(|e| RPCError::Unreachable(unreachable(e)))
    }

    async fn full_snapshot(
        &self,
        target: NodeId,
        group: RaftGroupId,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            sent = self.transport.snapshot(target, group, vote, snapshot, option) => {
                sent.map_err(|e| StreamingError::Unreachable(unreachable(e)))
            }
        }
    }

    async fn transfer_leader(
        &self,
        target: NodeId,
        group: RaftGroupId,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.transport
            .transfer_leader(target, group, req, option)
            .await
            .map_err(|e| RPCError::Unreachable(unreachable(e)))
    }
}

/// Creates per-(peer, group) clients for one group's Raft.
pub struct NetworkFactory<T> {
    network: Network<T>,
    group: RaftGroupId,
}

impl<T: RaftTransport> NetworkFactory<T> {
    pub fn new(network: Network<T>, group: RaftGroupId) -> Self {
        NetworkFactory { network, group }
    }
}

impl<T: RaftTransport> RaftNetworkFactory<TypeConfig> for NetworkFactory<T> {
    type Network = GroupNetworkAdapter<TypeConfig, RaftGroupId, Network<T>>;

    async fn new_client(&mut self, target: NodeId, _node: &NodeAddr) -> Self::Network {
        GroupNetworkAdapter::new(self.network.clone(), target, self.group)
    }
}
