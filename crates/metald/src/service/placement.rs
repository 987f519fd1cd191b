//! Where a new VM goes in a fleet: the ranking of the UP hosts with room for it.

use crate::domain::VmConfig;
use crate::fleet::{HostId, HostLoad, HostRecord, HostStatus};

use super::Whereabouts;

/// The UP hosts with room for a VM of `config` (registered capacity less what their stored VMs
/// reserve, `headroom` of VMM memory per VM), best first: fewest of the customer's VMs (a
/// spread), then the least full by its tightest resource, then this host `me` (no hop), then
/// by id so equal hosts are taken in one order.
pub(super) fn rank(
    hosts: Vec<HostRecord>,
    loads: &[HostLoad],
    me: &HostId,
    config: &VmConfig,
    headroom: u64,
) -> Vec<Whereabouts> {
    let asked_memory = config.memory_bytes.saturating_add(headroom);
    let asked_vcpus = u64::from(config.vcpu_count);
    let fits = |used: u64, asked: u64, cap: Option<u64>| {
        cap.is_none_or(|c| used.saturating_add(asked) <= c)
    };
    // Used share in thousandths (no bound: empty).
    let share = |used: u64, cap: Option<u64>| {
        cap.filter(|c| *c > 0)
            .map_or(0, |c| used.saturating_mul(1000) / c)
    };
    let mut ranked: Vec<((u64, u64, bool, String), HostRecord)> = hosts
        .into_iter()
        .filter(|h| h.status == HostStatus::Up)
        .filter_map(|h| {
            let load = loads.iter().find(|l| l.host == h.registration.id);
            let (vms, vcpus, memory, mine) = load.map_or((0, 0, 0, 0), |l| {
                (l.vms, l.vcpus, l.memory_bytes, l.customer_vms)
            });
            let used_memory = memory.saturating_add(vms.saturating_mul(headroom));
            let cap = h.registration.capacity;
            if !fits(used_memory, asked_memory, cap.memory_bytes)
                || !fits(vcpus, asked_vcpus, cap.vcpus)
            {
                return None;
            }
            let fullness = share(used_memory, cap.memory_bytes).max(share(vcpus, cap.vcpus));
            let key = (
                mine,
                fullness,
                h.registration.id != *me,
                h.registration.id.to_string(),
            );
            Some((key, h))
        })
        .collect();
    ranked.sort_by(|a, b| a.0.cmp(&b.0));
    ranked
        .into_iter()
        .map(|(_, h)| {
            if h.registration.id == *me {
                Whereabouts::Here
            } else {
                Whereabouts::Peer(Box::new(h))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{HostCapacity, HostRegistration};

    fn host(id: &str, vcpus: u64, up: bool) -> HostRecord {
        HostRecord {
            registration: HostRegistration {
                id: id.parse().unwrap(),
                advertise_url: format!("https://{id}:8443"),
                capacity: HostCapacity {
                    memory_bytes: Some(64 << 30),
                    vcpus: Some(vcpus),
                },
                labels: Default::default(),
            },
            index: 0,
            lease_expires_ms: 0,
            status: if up { HostStatus::Up } else { HostStatus::Down },
            vms: 0,
        }
    }

    fn load(id: &str, vcpus: u64, mine: u64) -> HostLoad {
        HostLoad {
            host: id.parse().unwrap(),
            vms: vcpus,
            vcpus,
            memory_bytes: vcpus << 28,
            customer_vms: mine,
        }
    }

    fn order(w: &[Whereabouts]) -> Vec<String> {
        w.iter()
            .map(|w| match w {
                Whereabouts::Here => "here".to_string(),
                Whereabouts::Peer(h) => h.registration.id.to_string(),
            })
            .collect()
    }

    fn config() -> VmConfig {
        crate::store::testing::record("acme", crate::state::VmState::Created).config
    }

    #[test]
    fn the_customers_vms_spread_first_then_the_emptiest_host_then_this_one() {
        let me: HostId = "a".parse().unwrap();
        let hosts = || {
            vec![
                host("a", 10, true),
                host("b", 10, true),
                host("c", 10, true),
            ]
        };
        // The customer has 2 on a, 1 on b, 1 on c; c is emptier than b.
        let loads = [load("a", 2, 2), load("b", 6, 1), load("c", 3, 1)];
        assert_eq!(
            order(&rank(hosts(), &loads, &me, &config(), 0)),
            ["c", "b", "here"]
        );
        // Equal everywhere: this host first, then by id.
        assert_eq!(
            order(&rank(hosts(), &[], &me, &config(), 0)),
            ["here", "b", "c"]
        );
    }

    #[test]
    fn full_and_down_hosts_are_left_out() {
        let me: HostId = "a".parse().unwrap();
        let hosts = vec![
            host("a", 4, true),
            host("b", 10, false),
            host("c", 10, true),
        ];
        let loads = [load("a", 4, 0), load("c", 9, 5)];
        assert_eq!(order(&rank(hosts, &loads, &me, &config(), 0)), ["c"]);
        let hosts = vec![host("a", 4, true), host("c", 10, true)];
        let loads = [load("a", 4, 0), load("c", 10, 0)];
        assert!(rank(hosts, &loads, &me, &config(), 0).is_empty());
    }
}
