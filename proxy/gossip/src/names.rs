//! Duplicate node names while running.
//!
//! A starting member refuses to join when a seed already knows its name alive elsewhere
//! ([`crate::Cluster::start`]), but that check cannot see everything: the seed may not know the
//! other member yet, or two halves of a partition may each have started one. So every member
//! also looks at its view after each change ([`clashes`]): two *alive* members at different
//! gossip addresses with one name are a clash. The member with the lower identity generation
//! (it started first; the generation is about the start time, see [`crate::persist`]) keeps the
//! name; the other is the *newcomer*, which leaves the cluster and stops with
//! [`crate::ClusterError::NameConflict`]. Every member that sees a clash counts it once and logs
//! it.
//!
//! Only Alive members count: a member that crashed and restarted at another address is Suspect
//! within a probe period, and must not push its successor out.

use std::net::SocketAddr;

use crate::{MemberInfo, MemberState};

/// Two alive members at different addresses with one name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Clash {
    /// The contested name.
    pub name: String,
    /// The member that keeps it (lowest generation, then lowest address).
    pub incumbent: SocketAddr,
    /// The member that must give it up.
    pub newcomer: SocketAddr,
    /// The newcomer's generation (a later restart of it is a new clash).
    pub newcomer_generation: u64,
}

/// Every clash in `members` (one per newcomer), in name order.
pub fn clashes(members: &[MemberInfo]) -> Vec<Clash> {
    let mut alive: Vec<&MemberInfo> = members
        .iter()
        .filter(|m| m.state == MemberState::Alive)
        .collect();
    alive.sort_by(|a, b| {
        (&a.meta.name, a.generation, a.gossip_addr).cmp(&(
            &b.meta.name,
            b.generation,
            b.gossip_addr,
        ))
    });
    let mut out = Vec::new();
    for group in alive.chunk_by(|a, b| a.meta.name == b.meta.name) {
        let incumbent = group[0];
        for m in &group[1..] {
            if m.gossip_addr != incumbent.gossip_addr {
                out.push(Clash {
                    name: m.meta.name.clone(),
                    incumbent: incumbent.gossip_addr,
                    newcomer: m.gossip_addr,
                    newcomer_generation: m.generation,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NodeMeta, Role};

    fn member(name: &str, port: u16, generation: u64, state: MemberState) -> MemberInfo {
        MemberInfo {
            meta: NodeMeta::new(name, Role::Backend),
            gossip_addr: ([127, 0, 0, 1], port).into(),
            state,
            incarnation: 0,
            generation,
            meta_version: 1,
            last_change_ms: 0,
            is_self: false,
            suspectors: 0,
        }
    }

    #[test]
    fn the_later_generation_gives_the_name_up() {
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let members = vec![
            member("a", 1, 100, MemberState::Alive),
            member("b", 2, 300, MemberState::Alive),
            member("b", 3, 200, MemberState::Alive),
            member("b", 4, 400, MemberState::Suspect),
            member("c", 5, 100, MemberState::Alive),
            member("c", 6, 100, MemberState::Left),
        ];
        assert_eq!(
            clashes(&members),
            vec![Clash {
                name: "b".into(),
                incumbent: addr(3),
                newcomer: addr(2),
                newcomer_generation: 300,
            }]
        );
        // Equal generations: the higher address is the newcomer.
        let tie = vec![
            member("d", 8, 5, MemberState::Alive),
            member("d", 7, 5, MemberState::Alive),
        ];
        assert_eq!(clashes(&tie)[0].newcomer, addr(8));
        assert!(clashes(&members[..2]).is_empty());
    }
}
