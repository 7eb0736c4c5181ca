//! The cluster: metadata and placement (`meta`), the node-to-node transport
//! (`transport`, `wire`), the peer manager that keeps sessions to every peer up and notices
//! when one goes silent (`peers`), and the network faults an operator can inject (`faults`).

pub mod controller;
pub mod faults;
pub mod inbound;
pub mod meta;
pub mod peers;
pub mod presence;
pub mod raft_net;
pub mod shards;
pub mod transport;
pub mod view;
pub mod wire;
