//! Node identity and cluster operations on real sockets (loopback), several members in one
//! process: a name clash found while running, and cluster-wide key rotation with key files.

use std::net::SocketAddr;
use std::time::Duration;

use sluice_gossip::clock::wall_ms;
use sluice_gossip::rotation::KeyringState;
use sluice_gossip::testing::{config, eventually, member, state_of};
use sluice_gossip::{
    generate_key, persist, Cluster, ClusterError, ClusterHandle, MemberState, NodeMeta, Role,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_clash_found_while_running_makes_the_newcomer_leave() {
    let key = generate_key();
    let a = member(&key, &[], "same", Role::Backend).await;
    let b = member(&key, &[a.gossip_addr()], "b", Role::Proxy).await;
    // The newcomer starts alone (so the start-up check cannot see the clash), then is
    // given a seed, as when a partition heals.
    // Its generation is surely above a's (two starts within one millisecond would tie).
    let tmp = tempfile::tempdir().expect("scratch dir");
    let state = tmp.path().join("c.state");
    persist::write_generation(&state, wall_ms() + 1_000_000).expect("writable");
    let mut c_config = config(&key, &[]);
    c_config.state_file = Some(state);
    let c = Cluster::start(c_config, NodeMeta::new("same", Role::Backend))
        .await
        .expect("c starts alone");
    c.set_peers(vec![a.gossip_addr().to_string()])
        .expect("running");
    let why = tokio::time::timeout(Duration::from_secs(20), c.stopped())
        .await
        .expect("the newcomer stops");
    match why {
        Some(ClusterError::NameConflict { name, this, other }) => {
            assert_eq!(
                (name.as_str(), this, other),
                ("same", c.gossip_addr(), a.gossip_addr())
            );
        }
        other => panic!("expected a name conflict, got {other:?}"),
    }
    assert!(!c.is_running());
    let msg = c.refusal().expect("a refusal").to_string();
    assert!(
        msg.contains(&a.gossip_addr().to_string())
            && msg.contains(&c.gossip_addr().to_string())
            && msg.contains("node_name"),
        "{msg}"
    );
    // The newcomer counted the clash. (The others count it too when they see both alive,
    // which they may not: the newcomer may learn of the clash and leave first.) The
    // incumbent keeps serving; everyone sees the newcomer gone: Left, or not listed at all
    // when the newcomer left before that member fetched its metadata from it (metadata comes
    // only from its owner, see sluice_gossip::node, "Ownership").
    assert_eq!(c.stats().duplicate_names, 1);
    assert!(a.is_running());
    for h in [&a, &b] {
        eventually(10, "the newcomer left", || {
            h.members()
                .iter()
                .filter(|m| m.gossip_addr == c.gossip_addr())
                .all(|m| m.state == MemberState::Left)
        })
        .await;
    }
    assert!(b
        .members()
        .iter()
        .any(|m| m.gossip_addr == a.gossip_addr() && m.state == MemberState::Alive));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotation_reaches_every_member_and_their_key_files() {
    let tmp = tempfile::tempdir().expect("scratch dir");
    let dir = tmp.path().to_path_buf();
    let (old, new) = (generate_key(), generate_key());
    let mut handles: Vec<ClusterHandle> = Vec::new();
    for name in ["a", "b", "c"] {
        let seeds: Vec<SocketAddr> = handles
            .first()
            .map(|h| h.gossip_addr())
            .into_iter()
            .collect();
        let mut cfg = config(&old, &seeds);
        cfg.key_file = Some(dir.join(format!("{name}.key")));
        cfg.state_file = Some(dir.join(format!("{name}.state")));
        handles.push(
            Cluster::start(cfg, NodeMeta::new(name, Role::Backend))
                .await
                .expect("starts"),
        );
    }
    for h in &handles {
        eventually(10, "all three alive everywhere", || {
            ["a", "b", "c"]
                .iter()
                .all(|n| state_of(h, n) == Some(MemberState::Alive))
        })
        .await;
    }
    let generation = handles[0].members()[0].generation;
    assert_eq!(
        persist::read_generation(&dir.join("a.state")).expect("readable"),
        Some(generation)
    );
    let report = handles[1]
        .rotate_key(&new, Duration::from_secs(20))
        .await
        .expect("the rotation completes");
    assert_eq!(report.members.len(), 3, "{report:?}");
    for (h, name) in handles.iter().zip(["a", "b", "c"]) {
        eventually(5, "every keyring holds the new key alone", || {
            h.keys() == [new.clone()]
        })
        .await;
        let text = std::fs::read_to_string(dir.join(format!("{name}.key"))).expect("written");
        let keys: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(keys, [new.as_str()], "{name}");
    }
    // Still one cluster: a metadata change travels under the new key.
    let rejected = handles[0].stats().rejected_decrypt;
    handles[2]
        .set_meta(NodeMeta::new("c", Role::Proxy))
        .expect("running");
    eventually(10, "a sees c's new role", || {
        handles[0]
            .members()
            .iter()
            .any(|m| m.meta.name == "c" && m.meta.role == Role::Proxy)
    })
    .await;
    assert_eq!(handles[0].stats().rejected_decrypt, rejected);
    for h in &handles {
        assert!(["a", "b", "c"]
            .iter()
            .all(|n| state_of(h, n) == Some(MemberState::Alive)));
    }
    // A node with only the old key cannot join any more.
    assert!(matches!(
        handles[0].rotate_key("nope", Duration::from_secs(1)).await,
        Err(ClusterError::Key(_))
    ));
}

// Current-thread runtime: no member task runs between the announcement and the first
// check, so a rotation given no time at all stops at its first phase, every time.
#[tokio::test]
async fn an_unconfirmed_rotation_fails_naming_the_members_and_is_withdrawn() {
    let (old, new) = (generate_key(), generate_key());
    let a = member(&old, &[], "a", Role::Proxy).await;
    let b = member(&old, &[a.gossip_addr()], "b", Role::Backend).await;
    eventually(10, "a sees b", || {
        state_of(&a, "b") == Some(MemberState::Alive)
    })
    .await;
    let err = a
        .rotate_key(&new, Duration::ZERO)
        .await
        .expect_err("no time to confirm")
        .to_string();
    assert!(
        err.contains("phase install was not confirmed")
            && err.contains(&format!("b ({})", b.gossip_addr()))
            && err.contains("run the rotation again"),
        "{err}"
    );
    // The announcement is withdrawn: b's view of a carries no rotation (and so no key).
    eventually(10, "the rotation is withdrawn", || {
        b.members().iter().any(|m| {
            m.meta.name == "a"
                && KeyringState::of(&m.meta).is_some_and(|k| k.rotation.is_none() && k.applied > 0)
        })
    })
    .await;
    // Only the install phase was ever announced: both still encrypt with the old key and
    // read each other.
    assert_eq!(
        (a.keys()[0].clone(), b.keys()[0].clone()),
        (old.clone(), old)
    );
    let rejected = a.stats().rejected_decrypt;
    let mut meta = NodeMeta::new("b", Role::Backend);
    meta.draining = true;
    b.set_meta(meta).expect("running");
    eventually(10, "a sees b draining", || {
        a.members()
            .iter()
            .any(|m| m.meta.name == "b" && m.meta.draining)
    })
    .await;
    assert_eq!(a.stats().rejected_decrypt, rejected);
}
