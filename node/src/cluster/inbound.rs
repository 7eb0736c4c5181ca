//! What a node does with what its peers send: greetings and heartbeats, Raft RPCs for the
//! groups it hosts, client requests for shards it leads, control requests from the
//! controller, pushes for its connections and presence updates.

use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::meta::MetaCommand;
use super::presence::Presence;
use super::raft_net::{Chunk, ChunkOutcome, SnapshotAssembly};
use super::shards::Shards;
use super::transport::{Inbound, Transport};
use super::view::ClusterView;
use super::wire::{Call, CallReply, Cast, Control, RaftRpc};
use crate::gateway::hub::Hub;
use crate::router::Router;
use crate::shard::{Leadership, NodeId, RaftGroupId};

pub struct NodeInbound {
    pub transport: Arc<Transport>,
    pub shards: Arc<Shards>,
    pub view: Arc<ClusterView>,
    pub router: Router,
    pub presence: Arc<Presence>,
    pub hub: Arc<Hub>,
    pub snapshots: SnapshotAssembly,
}

impl Inbound for Arc<NodeInbound> {
    fn call(&self, from: NodeId, call: Call) -> BoxFuture<'static, CallReply> {
        let this = self.clone();
        async move {
            match call {
                Call::Hello(_) => CallReply::Hello(this.transport.hello()),
                Call::Heartbeat { reports } => {
                    this.view.update(from, reports);
                    CallReply::Heartbeat { reports: this.shards.reports() }
                }
                Call::Raft { group, rpc } => this.raft(from, group, rpc).await,
                Call::Route(routed, origin) => this.router.serve_local(routed, origin).await,
                Call::Control(control) => match control_here(&this, from, control).await {
                    Ok(()) => CallReply::Done,
                    Err(e) => CallReply::Failed(e),
                },
                Call::Presence(update) => {
                    this.presence.apply(from, update);
                    CallReply::Done
                }
            }
        }
        .boxed()
    }

    fn cast(&self, _from: NodeId, cast: Cast) {
        match cast {
            Cast::Push { users, frame, committed_at } => {
                self.hub.deliver(&users, &Utf8Bytes::from(frame), committed_at);
            }
        }
    }
}

impl NodeInbound {
    async fn raft(&self, from: NodeId, group: RaftGroupId, rpc: RaftRpc) -> CallReply {
        let Some(host) = self.shards.host(group) else {
            return CallReply::NotHere { leader: None, reason: format!("{group} is not hosted on this node") };
        };
        if let Some(why) = host.stopped() {
            // Answered here: a stopped Raft would log every call it refuses.
            return CallReply::Failed(format!("{group} stopped on this node until it starts again: {why}"));
        }
        let raft = host.raft();
        let failed = |e: &dyn std::fmt::Display| CallReply::Failed(format!("{group}: {e}"));
        match rpc {
            RaftRpc::Append(req) => raft.append_entries(req).await.map_or_else(|e| failed(&e), CallReply::Append),
            RaftRpc::Vote(req) => raft.vote(req).await.map_or_else(|e| failed(&e), CallReply::Vote),
            RaftRpc::PreVote(req) => raft.pre_vote(req).await.map_or_else(|e| failed(&e), CallReply::Vote),
            RaftRpc::TransferLeader(req) => {
                raft.handle_transfer_leader(req).await.map_or_else(|e| failed(&e), CallReply::TransferLeader)
            }
            RaftRpc::SnapshotChunk { vote, meta, offset, data, last } => {
                match self.snapshots.take(group, from, Chunk { vote, meta, offset, data, last }) {
                    Err(e) => CallReply::Failed(e),
                    Ok(ChunkOutcome::More) => CallReply::Snapshot(None),
                    Ok(ChunkOutcome::Complete(vote, snapshot)) => {
                        match raft.install_full_snapshot(vote, *snapshot).await {
                            Ok(resp) => CallReply::Snapshot(Some(resp)),
                            Err(e) => failed(&e),
                        }
                    }
                }
            }
        }
    }
}

async fn control_here(this: &NodeInbound, from: NodeId, request: Control) -> Result<(), String> {
    control(&this.shards, &this.view, &this.transport, from, request).await
}

/// Carries out a control request on this node. Metadata commands go to the metadata
/// group's leader, forwarded if it is elsewhere.
pub async fn control(
    shards: &Shards,
    view: &ClusterView,
    transport: &Transport,
    _from: NodeId,
    control: Control,
) -> Result<(), String> {
    let leading = |group: RaftGroupId| {
        let host = shards.host(group).ok_or_else(|| format!("{group} is not hosted here"))?;
        match host.leadership() {
            Leadership::Leading { .. } => Ok(host),
            Leadership::Following { .. } => Err(format!("{group} is not led here")),
        }
    };
    match control {
        Control::Join { node, addr, shards: theirs } => {
            let ours = shards.host(RaftGroupId::META).and_then(|m| m.data().cluster()).map(|c| c.borrow().shards);
            if let Some(ours) = ours
                && ours != theirs
            {
                return Err(format!(
                    "refused: cluster.shards is {theirs} on {} but the cluster was formed with {ours}; every node of \
                     a cluster needs the same cluster.shards",
                    addr.name
                ));
            }
            let cmd = MetaCommand::Join { node, addr };
            meta_command(shards, view, transport, cmd).await
        }
        Control::Meta(cmd) => meta_command(shards, view, transport, cmd).await,
        Control::InitShard { group, members } => shards.init(group, members).await.map_err(|e| e.to_string()),
        Control::Reconcile { group, members } => leading(group)?.reconcile(members).await,
        Control::TransferLeader { group, to } => leading(group)?.transfer_leader(to).await,
    }
}

/// Has the metadata group's leader apply `cmd` (this node, or forwarded to it).
pub async fn meta_command(
    shards: &Shards,
    view: &ClusterView,
    transport: &Transport,
    cmd: MetaCommand,
) -> Result<(), String> {
    if let Some(meta) = shards.host(RaftGroupId::META)
        && matches!(meta.leadership(), Leadership::Leading { .. })
    {
        return meta.propose_meta(cmd).await;
    }
    let leader = view
        .leader(RaftGroupId::META)
        .filter(|l| *l != transport.me())
        .ok_or("the metadata group has no leader yet")?;
    match transport.call(leader, &Call::Control(Control::Meta(cmd)), std::time::Duration::from_secs(5)).await {
        Ok(CallReply::Done) => Ok(()),
        Ok(CallReply::Failed(e)) => Err(e),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}
