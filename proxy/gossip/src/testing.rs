//! Helpers for tests of real members in one process (this crate's and its integration tests).
//! Not part of the API.

use std::net::SocketAddr;
use std::time::Duration;

use crate::{Cluster, ClusterConfig, ClusterHandle, MemberState, NodeMeta, Profile, Role};

/// A member on 127.0.0.1 with the fast local profile, joining `peers`.
pub fn config(key: &str, peers: &[SocketAddr]) -> ClusterConfig {
    let mut c = ClusterConfig::new("test", "127.0.0.1:0".parse().expect("valid"), key);
    c.profile = Profile::Local;
    c.expected_size = 4;
    c.compression = true;
    c.peers = peers.iter().map(|p| p.to_string()).collect();
    c
}

/// A member started with [`config`], joining `peers`, named `name`.
pub async fn member(key: &str, peers: &[SocketAddr], name: &str, role: Role) -> ClusterHandle {
    Cluster::start(config(key, peers), NodeMeta::new(name, role))
        .await
        .unwrap_or_else(|e| panic!("{name} does not start: {e}"))
}

/// Polls `cond` every 50 ms for at most `secs` seconds.
pub async fn eventually(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..secs * 20 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {secs} s waiting for: {what}");
}

pub fn state_of(h: &ClusterHandle, name: &str) -> Option<MemberState> {
    h.members()
        .into_iter()
        .find(|m| m.meta.name == name)
        .map(|m| m.state)
}
