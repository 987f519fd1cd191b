//! Jail slots and addresses, allocated with the VM's insert and freed with its delete.

use std::collections::HashSet;

use super::{plan, vm, Harness};
use crate::domain::{VmNet, VmRecord};
use crate::{StoreError, VmStore};
use metald_domain::ipam::{mac_for, AllocationPlan};

fn insert<S: VmStore>(store: &S, customer: &str, plan: &AllocationPlan) -> VmRecord {
    store.insert_vm(&vm(customer), Some(plan)).unwrap()
}

fn net(vm: &VmRecord) -> VmNet {
    vm.net.clone().unwrap()
}

/// Inserts VMs until the pool runs out: the last insert fails with `what` exhausted, stores
/// nothing, and after one delete the same VM fits.
fn exhaust<S: VmStore>(store: &S, plan: &AllocationPlan, fits: usize, what: &str) {
    let mut live = vec![];
    for _ in 0..fits {
        live.push(insert(store, "a", plan));
    }
    let late = vm("b");
    match store.insert_vm(&late, Some(plan)) {
        Err(StoreError::Exhausted(w)) => assert_eq!(w, what),
        other => panic!("expected {what} exhausted, got {other:?}"),
    }
    assert_eq!(
        store.get_vm_unscoped(&late.id).unwrap(),
        None,
        "rolled back"
    );
    assert_eq!(store.all_vms().unwrap().len(), fits);
    let freed = live.swap_remove(fits / 2);
    store.delete_vm(&freed.id).unwrap();
    let late = store.insert_vm(&late, Some(plan)).unwrap();
    assert_eq!(
        late.net,
        freed.net.map(|n| VmNet {
            mac: mac_for(&late.id),
            ..n
        })
    );
}

/// The first VMs get the lowest slots and the addresses after the gateway, a MAC derived from
/// their id, and read back with every read of the VM.
pub fn allocation_takes_the_lowest_free_slot_and_addresses<H: Harness>(h: &H) {
    let store = h.open();
    let p = plan(3, "fd00:1::/64", Some("10.9.0.0/29"));
    let a = insert(&store, "a", &p);
    let b = insert(&store, "b", &p);
    let (na, nb) = (net(&a), net(&b));
    assert_eq!(
        (na.slot, na.ipv6.to_string(), na.ipv4.unwrap().to_string()),
        (0, "fd00:1::2".into(), "10.9.0.2".into())
    );
    assert_eq!(
        (nb.slot, nb.ipv6.to_string(), nb.ipv4.unwrap().to_string()),
        (1, "fd00:1::3".into(), "10.9.0.3".into())
    );
    assert_eq!(na.mac, mac_for(&a.id));
    assert_eq!(nb.mac, mac_for(&b.id));
    assert_eq!(store.get_vm(&a.customer, &a.id).unwrap(), Some(a.clone()));
    assert_eq!(store.get_vm_unscoped(&b.id).unwrap(), Some(b.clone()));
    assert_eq!(
        store.list_vms(&a.customer, None, 0, 10).unwrap(),
        vec![a.clone()]
    );
    assert_eq!(store.all_vms().unwrap(), vec![a, b]);
}

/// A VM inserted without a plan holds nothing, and the next VM with a plan still gets the
/// lowest slot and address.
pub fn without_a_plan_nothing_is_allocated<H: Harness>(h: &H) {
    let store = h.open();
    let bare = store.insert_vm(&vm("a"), None).unwrap();
    assert_eq!(bare.net, None);
    assert_eq!(store.get_vm_unscoped(&bare.id).unwrap().unwrap().net, None);
    let p = plan(2, "fd00:1::/64", Some("10.9.0.0/29"));
    let n = net(&insert(&store, "a", &p));
    assert_eq!((n.slot, n.ipv6.to_string()), (0, "fd00:1::2".into()));
    assert_eq!(n.ipv4.map(|a| a.to_string()), Some("10.9.0.2".into()));
}

/// Without an IPv4 subnet in the plan a VM gets no IPv4 address, and takes none from a later
/// VM whose plan has one.
pub fn an_ipv6_only_plan_gives_no_ipv4<H: Harness>(h: &H) {
    let store = h.open();
    let v6 = insert(&store, "a", &plan(4, "fd00:1::/64", None));
    assert_eq!(net(&v6).ipv4, None);
    assert_eq!(store.get_vm_unscoped(&v6.id).unwrap().unwrap().net, v6.net);
    let dual = net(&insert(
        &store,
        "a",
        &plan(4, "fd00:1::/64", Some("10.9.0.0/29")),
    ));
    assert_eq!(dual.ipv6.to_string(), "fd00:1::3");
    assert_eq!(dual.ipv4.map(|a| a.to_string()), Some("10.9.0.2".into()));
}

/// Through inserts and deletes, no two live VMs ever share a slot, address or MAC, and every
/// address is a host address of the pool (never the network, gateway or broadcast address).
pub fn addresses_are_never_handed_out_twice<H: Harness>(h: &H) {
    let store = h.open();
    let p = plan(5, "fd00:1::/120", Some("10.9.0.0/29"));
    let mut live: Vec<VmRecord> = (0..5).map(|_| insert(&store, "a", &p)).collect();
    for round in 0..3 {
        let gone = live.remove(round % live.len());
        store.delete_vm(&gone.id).unwrap();
        let gone = live.remove((round * 3) % live.len());
        store.delete_vm(&gone.id).unwrap();
        live.push(insert(&store, "b", &p));
        live.push(insert(&store, "c", &p));
        let nets: Vec<VmNet> = store.all_vms().unwrap().iter().map(net).collect();
        assert_eq!(nets.len(), 5);
        let distinct = |key: fn(&VmNet) -> String| {
            nets.iter().map(key).collect::<HashSet<_>>().len() == nets.len()
        };
        assert!(distinct(|n| n.slot.to_string()), "slots {nets:?}");
        assert!(distinct(|n| n.ipv6.to_string()), "IPv6 {nets:?}");
        assert!(distinct(|n| format!("{:?}", n.ipv4)), "IPv4 {nets:?}");
        assert!(distinct(|n| n.mac.clone()), "MACs {nets:?}");
        for n in &nets {
            assert!(n.slot < 5, "{n:?}");
            let last = n.ipv4.unwrap().octets()[3];
            assert!((2..=6).contains(&last), "{n:?}");
            let host = n.ipv6.segments()[7];
            assert!((2..=255).contains(&host), "{n:?}");
        }
    }
}

/// Creates racing from several threads still never share a slot or an address.
pub fn concurrent_inserts_get_distinct_addresses<H: Harness>(h: &H) {
    let store = h.open();
    let p = plan(64, "fd00:1::/64", Some("10.9.0.0/24"));
    let nets: Vec<VmNet> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    (0..8)
                        .map(|_| net(&insert(&store, "a", &p)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    assert_eq!(nets.len(), 32);
    let slots: HashSet<u32> = nets.iter().map(|n| n.slot).collect();
    let ipv6: HashSet<_> = nets.iter().map(|n| n.ipv6).collect();
    let ipv4: HashSet<_> = nets.iter().map(|n| n.ipv4).collect();
    assert_eq!((slots.len(), ipv6.len(), ipv4.len()), (32, 32, 32));
    // Lowest free: 32 creates on an empty pool fill exactly the first 32.
    assert_eq!(slots, (0..32).collect());
    assert_eq!(store.all_vms().unwrap().len(), 32);
}

/// A delete frees the VM's slot and addresses; the next VM gets the lowest free ones.
pub fn delete_frees_the_lowest_for_the_next_vm<H: Harness>(h: &H) {
    let store = h.open();
    let p = plan(3, "fd00:1::/64", Some("10.9.0.0/29"));
    let a = insert(&store, "a", &p);
    let b = insert(&store, "a", &p);
    let c = insert(&store, "a", &p);
    store.delete_vm(&b.id).unwrap();
    let d = net(&insert(&store, "a", &p));
    assert_eq!(
        (d.slot, d.ipv6, d.ipv4),
        (net(&b).slot, net(&b).ipv6, net(&b).ipv4)
    );
    store.delete_vm(&a.id).unwrap();
    store.delete_vm(&c.id).unwrap();
    let e = net(&insert(&store, "a", &p));
    assert_eq!(
        (e.slot, e.ipv6, e.ipv4),
        (net(&a).slot, net(&a).ipv6, net(&a).ipv4)
    );
    let f = net(&insert(&store, "a", &p));
    assert_eq!(
        (f.slot, f.ipv6, f.ipv4),
        (net(&c).slot, net(&c).ipv6, net(&c).ipv4)
    );
}

/// With every jail slot taken the insert fails as exhausted and stores nothing.
pub fn slots_run_out_and_the_failed_insert_stores_nothing<H: Harness>(h: &H) {
    let store = h.open();
    exhaust(
        &store,
        &plan(2, "fd00:1::/64", Some("10.9.0.0/24")),
        2,
        "jail uid/gid slots",
    );
}

/// A /29 has five VM addresses (.2 to .6); a sixth VM is refused.
pub fn ipv4_addresses_run_out<H: Harness>(h: &H) {
    let store = h.open();
    exhaust(
        &store,
        &plan(100, "fd00:1::/64", Some("10.9.0.0/29")),
        5,
        "IPv4 addresses",
    );
}

/// A /120 has 254 VM addresses (::2 to ::ff); the next VM is refused.
pub fn ipv6_addresses_run_out<H: Harness>(h: &H) {
    let store = h.open();
    exhaust(
        &store,
        &plan(300, "fd00:1::/120", None),
        254,
        "IPv6 addresses",
    );
}

/// Allocations are still held after a restart: the next VM does not get a live VM's.
pub fn allocations_survive_reopen<H: Harness>(h: &H) {
    let p = plan(3, "fd00:1::/64", Some("10.9.0.0/29"));
    let (a, b) = {
        let store = h.open();
        (insert(&store, "a", &p), insert(&store, "b", &p))
    };
    let store = h.open();
    assert_eq!(store.get_vm(&a.customer, &a.id).unwrap(), Some(a.clone()));
    assert_eq!(store.get_vm_unscoped(&b.id).unwrap(), Some(b));
    let c = net(&insert(&store, "c", &p));
    assert_eq!((c.slot, c.ipv6.to_string()), (2, "fd00:1::4".into()));
    store.delete_vm(&a.id).unwrap();
    let d = net(&insert(&store, "d", &p));
    assert_eq!((d.slot, d.ipv6), (net(&a).slot, net(&a).ipv6));
    assert!(matches!(
        store.insert_vm(&vm("e"), Some(&p)),
        Err(StoreError::Exhausted("jail uid/gid slots"))
    ));
}

/// A VM deleted while its network and jail are still being removed keeps its slot and
/// addresses from every new VM until they are freed, one at a time or all at start.
pub fn a_held_allocation_stays_taken_until_freed<H: Harness>(h: &H) {
    let store = h.open();
    let p = plan(2, "fd00:1::/64", Some("10.9.0.0/29"));
    let a = insert(&store, "a", &p);
    let b = insert(&store, "a", &p);
    store.delete_vm_holding_allocation(&a.id).unwrap();
    assert_eq!(
        store.get_vm_unscoped(&a.id).unwrap(),
        None,
        "the VM is gone"
    );
    match store.insert_vm(&vm("c"), Some(&p)) {
        Err(StoreError::Exhausted(w)) => assert_eq!(w, "jail uid/gid slots"),
        other => panic!("the held slot was handed out again: {other:?}"),
    }
    store.free_held_allocation(&a.id).unwrap();
    let c = insert(&store, "c", &p);
    assert_eq!(
        (net(&c).slot, net(&c).ipv6, net(&c).ipv4),
        (net(&a).slot, net(&a).ipv6, net(&a).ipv4),
        "freed: the lowest again"
    );
    store.delete_vm_holding_allocation(&b.id).unwrap();
    store.delete_vm_holding_allocation(&c.id).unwrap();
    assert_eq!(store.free_held_allocations().unwrap(), 2);
    let d = insert(&store, "d", &p);
    assert_eq!(net(&d).slot, 0);
}
