//! The PostgreSQL store on a real, throwaway PostgreSQL server: the whole shared store suite
//! (as the SQLite store runs it in `src/tests.rs`), then what only PostgreSQL has: migrations
//! under concurrent opens, several hosts on one database, quotas under concurrent inserts from
//! two hosts, calls from inside tokio, and a server restart under an open store.
//!
//! libtest-mimic rather than `#[test]`: whether a server can be started (PostgreSQL 15's
//! programs, root to run it as `postgres`) is only known when the binary runs. Without them the
//! tests are listed as ignored, so cargo test and nextest count them as skipped, never passed,
//! and the reason is printed; under `METALD_REQUIRE_E2E=1` (as `make test` sets) they run and
//! fail with the reason instead.

// Tests: a failed step should panic with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::{Arc, Barrier};

use libtest_mimic::{Arguments, Failed, Trial};
use metald_domain::domain::VmRecord;
use metald_domain::ipam::AllocationPlan;
use metald_domain::state::VmState;
use metald_store::suite::Harness;
use metald_store::testing::pg::TestPostgres;
use metald_store::testing::record;
use metald_store::{
    BillingStore, FleetStore, HostLimits, OutboxRow, PgStore, RunLimits, SnapshotStore, StateStore,
    StoreError, StoredLimits, VmStore,
};

/// The host id the suite's stores run as.
const HOST: &str = "host-a";

/// One empty database per harness on the shared server.
struct Pg {
    url: String,
}

impl Pg {
    fn new(server: &TestPostgres) -> Self {
        Self {
            url: server.create_database().unwrap(),
        }
    }

    fn open_as(&self, host: &str) -> PgStore {
        PgStore::open(&self.url, host).unwrap()
    }

    /// A connection of the test's own, for what the store's interface cannot do.
    fn raw(&self) -> postgres::Client {
        postgres::Client::connect(&self.url, postgres::NoTls).unwrap()
    }
}

impl Harness for Pg {
    type Store = PgStore;

    fn open(&self) -> PgStore {
        self.open_as(HOST)
    }
}

type PgTest = fn(&TestPostgres);

/// PostgreSQL's own tests, each on the shared server.
const OWN: &[(&str, PgTest)] = &[
    (
        "migrations_apply_once_even_when_hosts_open_together",
        migrations_apply_once_even_when_hosts_open_together,
    ),
    ("a_newer_schema_is_refused", a_newer_schema_is_refused),
    (
        "hosts_share_customers_but_not_host_resources",
        hosts_share_customers_but_not_host_resources,
    ),
    (
        "a_quota_holds_under_concurrent_inserts_from_two_hosts",
        a_quota_holds_under_concurrent_inserts_from_two_hosts,
    ),
    (
        "placement_never_overbooks_a_host_under_concurrent_creates",
        placement_never_overbooks_a_host_under_concurrent_creates,
    ),
    (
        "the_store_works_inside_a_tokio_runtime",
        the_store_works_inside_a_tokio_runtime,
    ),
    (
        "errors_name_the_operation_and_keep_the_cause",
        errors_name_the_operation_and_keep_the_cause,
    ),
    (
        "the_store_is_a_shareable_state_store",
        the_store_is_a_shareable_state_store,
    ),
];

fn main() {
    let args = Arguments::from_args();
    let require = std::env::var("METALD_REQUIRE_E2E").is_ok_and(|v| v == "1");
    let why = TestPostgres::unavailable();
    let skip = why.is_some() && !require;
    if let (Some(why), true) = (&why, skip) {
        if !args.list && !args.exact {
            eprintln!("postgres: every test SKIPPED because {why}");
        }
    }
    // One server for the binary; none when skipping or listing.
    let server: Option<Result<Arc<TestPostgres>, String>> = (!skip && !args.list).then(|| {
        TestPostgres::start()
            .map(Arc::new)
            .map_err(|e| e.to_string())
    });
    let with_server = |run: Box<dyn FnOnce(&TestPostgres) + Send>| {
        let server = server.clone();
        move || -> Result<(), Failed> {
            match server {
                Some(Ok(s)) => {
                    run(&s);
                    Ok(())
                }
                Some(Err(e)) => Err(format!("no test PostgreSQL server: {e}").into()),
                None => Err("no test PostgreSQL server".into()),
            }
        }
    };
    let mut trials = Vec::new();
    for (name, test) in metald_store::store_suite!(list: Pg) {
        let run = with_server(Box::new(move |s| test(&Pg::new(s))));
        trials.push(Trial::test(format!("suite::{name}"), run).with_ignored_flag(skip));
    }
    for &(name, test) in OWN {
        let run = with_server(Box::new(test));
        trials.push(Trial::test(format!("pg::{name}"), run).with_ignored_flag(skip));
    }
    // A server of its own, listening with TLS.
    trials.push(
        Trial::test(
            "pg::a_database_over_tls_is_reached_only_with_its_ca",
            a_database_over_tls_is_reached_only_with_its_ca,
        )
        .with_ignored_flag(skip),
    );
    // Restarts its own server, so the others' connections are not cut.
    trials.push(
        Trial::test(
            "pg::a_server_restart_under_an_open_store_loses_nothing",
            move || match TestPostgres::start() {
                Ok(s) => {
                    a_server_restart_under_an_open_store_loses_nothing(&s);
                    Ok(())
                }
                Err(e) => Err(format!("no test PostgreSQL server: {e}").into()),
            },
        )
        .with_ignored_flag(skip),
    );
    let conclusion = libtest_mimic::run(&args, trials);
    // Stopped explicitly: exit() below runs no destructors.
    if let Some(Ok(s)) = &server {
        s.stop();
    }
    conclusion.exit();
}

fn plan() -> AllocationPlan {
    AllocationPlan {
        slots: 64,
        ipv6: "fd00:1::/64".parse().unwrap(),
        ipv4: Some("10.9.0.0/24".parse().unwrap()),
    }
}

fn schema_version(raw: &mut postgres::Client) -> i64 {
    raw.query_one("SELECT MAX(version) FROM schema_version", &[])
        .unwrap()
        .get(0)
}

/// Several hosts opening a new database at once: every open succeeds, the migrations are
/// applied once, and opening again applies nothing.
fn migrations_apply_once_even_when_hosts_open_together(server: &TestPostgres) {
    let h = Pg::new(server);
    let start = Barrier::new(6);
    std::thread::scope(|s| {
        for i in 0..6 {
            let (h, start) = (&h, &start);
            s.spawn(move || {
                start.wait();
                drop(h.open_as(&format!("host-{i}")));
            });
        }
    });
    drop(h.open());
    let mut raw = h.raw();
    let versions: i64 = raw
        .query_one("SELECT COUNT(*) FROM schema_version", &[])
        .unwrap()
        .get(0);
    assert_eq!(schema_version(&mut raw), versions, "each version once");
    assert!(versions >= 1);
}

fn a_newer_schema_is_refused(server: &TestPostgres) {
    let h = Pg::new(server);
    drop(h.open());
    h.raw()
        .execute("INSERT INTO schema_version (version) VALUES (99)", &[])
        .unwrap();
    match PgStore::open(&h.url, HOST) {
        Err(StoreError::TooNew { found: 99, .. }) => {}
        other => panic!("expected too new, got {other:?}"),
    }
}

/// Two hosts on one database: a customer's VMs and snapshots read from either host; each host
/// lists, counts, sizes and reserves only its own VMs, numbers its own jail slots and
/// addresses, and drains its own outbox; stored quotas count the customer's VMs on both.
fn hosts_share_customers_but_not_host_resources(server: &TestPostgres) {
    let h = Pg::new(server);
    let (a, b) = (h.open_as("host-a"), h.open_as("host-b"));
    let on_a = a
        .insert_vm(&record("c1", VmState::Created), Some(&plan()))
        .unwrap();
    let on_b = b
        .insert_vm(&record("c1", VmState::Created), Some(&plan()))
        .unwrap();
    // Numbered per host: both got the first slot and addresses.
    assert_eq!(on_a.net.as_ref().unwrap().slot, 0);
    assert_eq!(on_b.net.as_ref().unwrap().slot, 0);
    assert_eq!(
        on_a.net.as_ref().unwrap().ipv6,
        on_b.net.as_ref().unwrap().ipv6
    );
    let second_b = b
        .insert_vm(&record("c2", VmState::Created), Some(&plan()))
        .unwrap();
    assert_eq!(second_b.net.as_ref().unwrap().slot, 1);
    // Customer reads are fleet-wide.
    let c1 = on_a.customer.clone();
    for store in [&a, &b] {
        assert_eq!(store.get_vm(&c1, &on_b.id).unwrap(), Some(on_b.clone()));
        assert_eq!(store.get_vm_unscoped(&on_a.id).unwrap(), Some(on_a.clone()));
        assert_eq!(
            store.list_vms(&c1, None, 0, 10).unwrap(),
            vec![on_a.clone(), on_b.clone()]
        );
    }
    // Host reads are the host's.
    assert_eq!(a.all_vms().unwrap(), vec![on_a.clone()]);
    assert_eq!(b.all_vms().unwrap(), vec![on_b.clone(), second_b.clone()]);
    assert_eq!(a.count_by_state().unwrap(), vec![(VmState::Created, 1)]);
    assert_eq!(b.count_by_state().unwrap(), vec![(VmState::Created, 2)]);
    let room = HostLimits {
        memory_bytes: Some(512 << 20),
        vcpus: None,
    };
    a.reserve_run(&on_a, &RunLimits::default(), &room).unwrap();
    // B's capacity is B's: A's boot takes none of it.
    b.reserve_run(&on_b, &RunLimits::default(), &room).unwrap();
    assert_eq!(a.host_usage().unwrap().memory_bytes, 512 << 20);
    assert_eq!(
        (a.host_usage().unwrap().vms, b.host_usage().unwrap().vms),
        (1, 2)
    );
    // The running quota is the customer's, over both hosts.
    let one = RunLimits {
        vms: Some(2),
        ..RunLimits::default()
    };
    let third = a.insert_vm(&record("c1", VmState::Created), None).unwrap();
    assert!(matches!(
        a.reserve_run(&third, &one, &HostLimits::default()),
        Err(StoreError::QuotaExceeded { used: 2, .. })
    ));
    a.release_all_runs().unwrap();
    assert_eq!(a.host_usage().unwrap().memory_bytes, 0);
    assert_eq!(b.host_usage().unwrap().memory_bytes, 512 << 20);
    // So is the stored quota.
    let three = StoredLimits {
        vms: Some(3),
        ..StoredLimits::default()
    };
    assert!(matches!(
        b.insert_vm_within(&record("c1", VmState::Created), None, 0, &three),
        Err(StoreError::QuotaExceeded { used: 3, .. })
    ));
    // Each host drains its own outbox.
    let row = |key: &str, vm: &VmRecord| OutboxRow {
        key: key.into(),
        kind: "metrics".into(),
        vm_id: vm.id.to_string(),
        customer_id: vm.customer.to_string(),
        payload_json: "{}".into(),
    };
    a.enqueue_billing(&[row("ka", &on_a)], None).unwrap();
    b.enqueue_billing(&[row("kb", &on_b)], None).unwrap();
    assert_eq!(a.outbox_peek(10).unwrap().len(), 1);
    assert_eq!(a.outbox_peek(10).unwrap()[0].1.key, "ka");
    assert_eq!(b.outbox_depth().unwrap(), 1);
    // Held allocations are freed per host.
    a.delete_vm_holding_allocation(&on_a.id).unwrap();
    b.delete_vm_holding_allocation(&on_b.id).unwrap();
    assert_eq!(a.free_held_allocations().unwrap(), 1);
    let again = a
        .insert_vm(&record("c1", VmState::Created), Some(&plan()))
        .unwrap();
    assert_eq!(again.net.unwrap().slot, 0, "freed on A");
    let held = b
        .insert_vm(&record("c1", VmState::Created), Some(&plan()))
        .unwrap();
    assert_eq!(held.net.unwrap().slot, 2, "still held on B");
    // Snapshots: the customer's everywhere, the files' host's for reconciliation.
    let snap = metald_store::SnapshotRecord {
        id: "snap-1".into(),
        customer: c1.clone(),
        source_vm: on_b.id.clone(),
        state: metald_store::SnapshotState::Creating,
        backend: "qemu".into(),
        config: on_b.config.clone(),
        inner: None,
        bytes: 0,
        created_at_ms: 1,
    };
    b.insert_snapshot_within(&snap, &StoredLimits::default())
        .unwrap();
    assert_eq!(a.get_snapshot(&c1, "snap-1").unwrap(), Some(snap.clone()));
    assert_eq!(a.list_snapshots(&c1).unwrap().len(), 1);
    assert!(a.all_snapshots().unwrap().is_empty());
    assert_eq!(b.all_snapshots().unwrap(), vec![snap]);
}

/// Threads on two hosts inserting VMs of one customer at once, under a stored quota of K:
/// exactly K are stored, every other insert is refused as over quota.
fn a_quota_holds_under_concurrent_inserts_from_two_hosts(server: &TestPostgres) {
    const K: u64 = 7;
    let h = Pg::new(server);
    let stores = [h.open_as("host-a"), h.open_as("host-b")];
    let limits = StoredLimits {
        vms: Some(K),
        ..StoredLimits::default()
    };
    let start = Barrier::new(8);
    let results: Vec<Result<VmRecord, StoreError>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..8)
            .map(|i| {
                let (store, start, limits) = (&stores[i % 2], &start, &limits);
                s.spawn(move || {
                    start.wait();
                    (0..4)
                        .map(|_| {
                            store.insert_vm_within(
                                &record("q", VmState::Created),
                                Some(&plan()),
                                0,
                                limits,
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    assert_eq!(results.iter().filter(|r| r.is_ok()).count() as u64, K);
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(
            matches!(
                e,
                StoreError::QuotaExceeded {
                    used: K,
                    limit: K,
                    ..
                }
            ),
            "{e}"
        );
    }
    let customer = "q".parse().unwrap();
    assert_eq!(
        stores[0].list_vms(&customer, None, 0, 100).unwrap().len() as u64,
        K
    );
    let stored = stores[0].all_vms().unwrap().len() + stores[1].all_vms().unwrap().len();
    assert_eq!(stored as u64, K);
    // Slots were numbered per host without a collision.
    for store in &stores {
        let slots: HashSet<u32> = store
            .all_vms()
            .unwrap()
            .iter()
            .map(|v| v.net.as_ref().unwrap().slot)
            .collect();
        assert_eq!(slots, (0..slots.len() as u32).collect());
    }
}

/// Each VM stored on a host reserves its size against the capacity the host registered, in the
/// insert's transaction: 16 concurrent inserts on a host with room for 5 store exactly 5, the
/// rest are refused naming the resource, and the loads placement reads count them per host and
/// per customer. A delete gives the room back.
fn placement_never_overbooks_a_host_under_concurrent_creates(server: &TestPostgres) {
    use metald_domain::fleet::{HostCapacity, HostRegistration};
    let h = Pg::new(server);
    let stores = [h.open_as("host-a"), h.open_as("host-b")];
    for (store, id) in stores.iter().zip(["host-a", "host-b"]) {
        let reg = HostRegistration {
            id: id.parse().unwrap(),
            advertise_url: format!("https://{id}:8443"),
            capacity: HostCapacity {
                memory_bytes: None,
                vcpus: Some(5),
            },
            labels: Default::default(),
        };
        store
            .register_host(&reg, 8, std::time::Duration::from_secs(60))
            .unwrap();
    }
    let start = Barrier::new(4);
    let results: Vec<Result<VmRecord, StoreError>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let (store, start) = (&stores[0], &start);
                s.spawn(move || {
                    start.wait();
                    (0..4)
                        .map(|_| store.insert_vm(&record("p", VmState::Created), Some(&plan())))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let placed: Vec<&VmRecord> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(placed.len(), 5);
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(
            matches!(e, StoreError::HostExhausted(s) if s.resource == "vCPUs" && s.capacity == 5),
            "{e}"
        );
    }
    // Host b has its own room, and another customer's VM there counts for b only.
    stores[1]
        .insert_vm(&record("other", VmState::Created), Some(&plan()))
        .unwrap();
    let loads = stores[0].host_loads(&"p".parse().unwrap()).unwrap();
    let of = |host: &str| loads.iter().find(|l| l.host.as_str() == host).unwrap();
    assert_eq!((of("host-a").vcpus, of("host-a").customer_vms), (5, 5));
    assert_eq!((of("host-b").vms, of("host-b").customer_vms), (1, 0));
    stores[0].delete_vm(&placed[0].id).unwrap();
    stores[0]
        .insert_vm(&record("p", VmState::Created), Some(&plan()))
        .unwrap();
}

/// A client configuration trusting only `ca` (ring, as metald's).
fn trusting(ca: &rcgen::Certificate) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth()
}

/// A database reached over the network is reached over TLS, verified against the CA the
/// operator names: with it the store works; without TLS, or trusting another CA, it does not
/// open.
fn a_database_over_tls_is_reached_only_with_its_ca() -> Result<(), Failed> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca = |name: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        (rcgen::Issuer::new(p, key), cert)
    };
    let (issuer, ca_cert) = ca("db test CA");
    let (_, other_ca) = ca("another CA");
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &issuer).unwrap();
    let server = TestPostgres::start_tls(&cert.pem(), &key.serialize_pem())
        .map_err(|e| format!("no TLS test server: {e}"))?;
    let socket_url = server.create_database().unwrap();
    let db = socket_url
        .trim_start_matches("postgres:///")
        .split('?')
        .next()
        .unwrap()
        .to_string();
    let url = server.tls_url(&db).unwrap();
    let store = PgStore::open_with(&url, HOST, Some(trusting(&ca_cert))).unwrap();
    let vm = store
        .insert_vm(&record("tls", VmState::Created), Some(&plan()))
        .unwrap();
    assert_eq!(store.all_vms().unwrap()[0].id, vm.id);
    assert!(PgStore::open(&url, HOST).is_err(), "TLS is required");
    let err = PgStore::open_with(&url, HOST, Some(trusting(&other_ca))).unwrap_err();
    assert!(err.to_string().contains("connect"), "{err}");
    Ok(())
}

/// The daemon calls the store from tokio's worker threads, and may open it there too; the
/// synchronous client would panic there if it ran on the caller's thread.
fn the_store_works_inside_a_tokio_runtime(server: &TestPostgres) {
    let h = Pg::new(server);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = Arc::new(h.open());
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    store
                        .insert_vm(&record("t", VmState::Created), None)
                        .unwrap()
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(store.all_vms().unwrap().len(), 4);
        // Dropped inside the runtime too.
        drop(store);
    });
}

/// A refused statement is a `Postgres` error naming the operation, PostgreSQL's error its source.
fn errors_name_the_operation_and_keep_the_cause(server: &TestPostgres) {
    let h = Pg::new(server);
    let store = h.open();
    let vm = store
        .insert_vm(&record("a", VmState::Created), None)
        .unwrap();
    let err = store.insert_vm(&vm, None).unwrap_err();
    assert_eq!(err.to_string(), "database insert vm");
    let source = std::error::Error::source(&err)
        .and_then(|s| s.downcast_ref::<postgres::Error>())
        .unwrap();
    assert_eq!(
        source.code(),
        Some(&postgres::error::SqlState::UNIQUE_VIOLATION)
    );
    assert_eq!(store.all_vms().unwrap().len(), 1);
    match PgStore::open("postgres://nobody@/nope?host=/nonexistent", HOST) {
        Err(StoreError::Postgres { op: "connect", .. }) => {}
        other => panic!("expected a connect error, got {other:?}"),
    }
}

/// The daemon holds `Arc<dyn StateStore>`, shared between threads.
fn the_store_is_a_shareable_state_store(server: &TestPostgres) {
    let h = Pg::new(server);
    let store: Arc<dyn StateStore> = Arc::new(h.open());
    let other = Arc::clone(&store);
    std::thread::spawn(move || {
        other
            .insert_vm(&record("a", VmState::Created), None)
            .unwrap()
    })
    .join()
    .unwrap();
    assert_eq!(store.all_vms().unwrap().len(), 1);
}

/// A restart cuts every connection of an open store: the next calls reconnect and succeed, and
/// what was committed before is there.
fn a_server_restart_under_an_open_store_loses_nothing(server: &TestPostgres) {
    let h = Pg::new(server);
    let store = h.open();
    let before = store
        .insert_vm(&record("a", VmState::Created), Some(&plan()))
        .unwrap();
    // Every connection of the pool has been used, so each one breaks.
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| store.get_vm_unscoped(&before.id).unwrap());
        }
    });
    server.restart().unwrap();
    for _ in 0..8 {
        assert_eq!(
            store.get_vm_unscoped(&before.id).unwrap(),
            Some(before.clone())
        );
    }
    let after = store
        .insert_vm(&record("a", VmState::Created), Some(&plan()))
        .unwrap();
    assert_eq!(after.net.unwrap().slot, 1);
    assert_eq!(store.all_vms().unwrap().len(), 2);
    // Restarted again under concurrent writes: each insert is stored exactly once.
    let inserted: Vec<VmRecord> = std::thread::scope(|s| {
        let writers: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    (0..10)
                        .map(|_| {
                            store
                                .insert_vm(&record("a", VmState::Created), Some(&plan()))
                                .unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        server.restart().unwrap();
        writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let all = store.all_vms().unwrap();
    assert_eq!(all.len(), 42);
    for v in &inserted {
        assert_eq!(store.get_vm_unscoped(&v.id).unwrap().as_ref(), Some(v));
    }
}
