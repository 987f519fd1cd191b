//! The `hosts` table: registration, places in the fleet's address space, leases.

use std::collections::BTreeMap;
use std::time::Duration;

use super::Harness;
use crate::{FleetStore, StoreError};
use metald_domain::fleet::{HostCapacity, HostRegistration, HostStatus};

const LONG: Duration = Duration::from_secs(3600);

fn host(id: &str) -> HostRegistration {
    HostRegistration {
        id: id.parse().unwrap(),
        advertise_url: format!("https://{id}.example:8080"),
        capacity: HostCapacity {
            memory_bytes: Some(64 << 30),
            vcpus: None,
        },
        labels: BTreeMap::from([("zone".into(), "a".into())]),
    }
}

/// Hosts read back as registered, each in the lowest free place.
pub fn hosts_read_back_as_registered_in_their_own_places<H: Harness>(h: &H) {
    let s = h.open();
    let a = s.register_host(&host("a"), 8, LONG).unwrap();
    let b = s.register_host(&host("b"), 8, LONG).unwrap();
    assert_eq!(a.registration, host("a"));
    assert_eq!((a.index, b.index), (0, 1));
    assert_eq!(a.status, HostStatus::Up);
    let listed = s.list_hosts().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].registration, host("a"));
    assert_eq!(listed[1].registration, host("b"));
    assert_eq!(listed[1].index, 1);
}

/// A host registering again (a restart) keeps its place and takes its new details.
pub fn a_host_keeps_its_place_when_it_registers_again<H: Harness>(h: &H) {
    let s = h.open();
    s.register_host(&host("a"), 8, LONG).unwrap();
    s.register_host(&host("b"), 8, LONG).unwrap();
    let mut changed = host("a");
    changed.advertise_url = "https://a2.example:8080".into();
    changed.labels.insert("disk".into(), "nvme".into());
    let again = s.register_host(&changed, 8, LONG).unwrap();
    assert_eq!(again.index, 0);
    assert_eq!(again.registration, changed);
    assert_eq!(s.list_hosts().unwrap().len(), 2);
}

/// Past the fleet's places a new host is refused and not stored.
pub fn places_run_out_and_the_refused_host_is_not_stored<H: Harness>(h: &H) {
    let s = h.open();
    s.register_host(&host("a"), 2, LONG).unwrap();
    s.register_host(&host("b"), 2, LONG).unwrap();
    assert!(matches!(
        s.register_host(&host("c"), 2, LONG),
        Err(StoreError::Exhausted(_))
    ));
    let ids: Vec<String> = s
        .list_hosts()
        .unwrap()
        .iter()
        .map(|h| h.registration.id.to_string())
        .collect();
    assert_eq!(ids, ["a", "b"]);
}

/// A host is DOWN once its lease ends (on its own or at a clean stop), UP again once renewed.
pub fn a_host_whose_lease_ended_is_down_until_it_renews<H: Harness>(h: &H) {
    let s = h.open();
    let a = host("a");
    assert_eq!(
        s.register_host(&a, 8, Duration::ZERO).unwrap().status,
        HostStatus::Down
    );
    assert!(s.renew_lease(&a.id, LONG).unwrap());
    assert_eq!(s.list_hosts().unwrap()[0].status, HostStatus::Up);
    s.end_lease(&a.id).unwrap();
    assert_eq!(s.list_hosts().unwrap()[0].status, HostStatus::Down);
    assert!(!s.renew_lease(&"nobody".parse().unwrap(), LONG).unwrap());
    // A short lease runs out on its own.
    s.renew_lease(&a.id, Duration::from_millis(50)).unwrap();
    assert_eq!(s.list_hosts().unwrap()[0].status, HostStatus::Up);
    std::thread::sleep(Duration::from_millis(120));
    assert_eq!(s.list_hosts().unwrap()[0].status, HostStatus::Down);
}

/// Registrations survive a restart of the store.
pub fn hosts_survive_reopen<H: Harness>(h: &H) {
    {
        let s = h.open();
        s.register_host(&host("a"), 8, LONG).unwrap();
        s.register_host(&host("b"), 8, LONG).unwrap();
    }
    let s = h.open();
    let hosts = s.list_hosts().unwrap();
    assert_eq!(hosts.len(), 2);
    assert_eq!(hosts[1].registration, host("b"));
    assert_eq!(hosts[1].index, 1);
    assert_eq!(hosts[1].status, HostStatus::Up);
}
