//! The cluster: membership and placement (`meta`), node-to-node transport, failure detection.

pub mod meta;
