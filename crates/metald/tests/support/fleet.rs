//! A test fleet: metald hosts sharing one real PostgreSQL (Debian's, started as `postgres` in a
//! temporary directory), each in its own network namespace with its own data, jail and run
//! directories and cgroup parent, joined by a test-made bridge ([`Fabric`]). They call each
//! other with mTLS, certificates made by the test; the [`ControlPlane`] is a trusted service
//! reaching every host through its relay.

use std::time::Duration;

use serde_json::{json, Value};

use super::netns::Fabric;
use super::*;
use metald_store::testing::pg::TestPostgres;

/// The control plane's SPIFFE id (a trusted service of every host).
pub const CONTROL_PLANE: &str = "spiffe://fleet.test/control-plane";
/// The port every host serves on inside its own namespace.
pub const FLEET_PORT: u16 = 8443;

/// One host of a test fleet.
pub struct FleetHost {
    /// The daemon.
    pub m: Metald,
    /// Its UNKEY_METALD_HOST_ID.
    pub id: String,
}

/// Hosts on one database.
pub struct Fleet {
    /// The hosts, in the fabric's order.
    pub hosts: Vec<FleetHost>,
    /// The client.
    pub cp: ControlPlane,
    /// The database server.
    pub pg: TestPostgres,
    /// The bridge joining the hosts' namespaces (after the hosts, which live in them).
    pub fabric: Fabric,
    /// The certificates.
    pub pki: Pki,
}

impl Fleet {
    /// Starts one host per entry of `cpu_overcommit` (its UNKEY_METALD_HOST_CPU_OVERCOMMIT),
    /// `host-a`, `host-b`, … with leases of `lease_seconds`, each with the default guest.
    pub fn start(cpu_overcommit: &[&str], lease_seconds: u64) -> Self {
        Self::start_on(cpu_overcommit, lease_seconds, true)
    }

    /// One host on its own SQLite file, set up as a fleet host otherwise (TLS, mTLS, its own
    /// namespace): what a fleet is measured against.
    pub fn sqlite_host() -> Self {
        Self::start_on(&["1000"], 10, false)
    }

    fn start_on(cpu_overcommit: &[&str], lease_seconds: u64, shared: bool) -> Self {
        let pg = TestPostgres::start().expect("test PostgreSQL");
        let url = pg.create_database().expect("database");
        let pki = Pki::new("fleet");
        let cp_pair = pki.client("control-plane", Some(CONTROL_PLANE), false);
        let mut fabric = Fabric::new();
        let ids: Vec<String> = (0..cpu_overcommit.len())
            .map(|i| format!("host-{}", char::from(b'a' + i as u8)))
            .collect();
        let trusted = std::iter::once(CONTROL_PLANE.to_string())
            .chain(ids.iter().map(|id| spiffe_of(id)))
            .collect::<Vec<_>>()
            .join(",");
        let guest = qemu_guest();
        let hosts = ids
            .iter()
            .zip(cpu_overcommit)
            .enumerate()
            .map(|(i, (id, overcommit))| {
                // The fabric numbers its members in order: this host's address, known before
                // its namespace exists, so its certificate and advertised URL can name it.
                let addr: std::net::IpAddr = format!("10.250.0.{}", i + 1).parse().unwrap();
                let pair = pki.host(id, addr, &spiffe_of(id));
                // The bench reads as fast as it can, as one customer.
                let mut b = metald()
                    .env("UNKEY_METALD_HOST_CPU_OVERCOMMIT", overcommit)
                    .env("UNKEY_METALD_RATE_LIMIT_PER_SECOND", "100000")
                    .env("UNKEY_METALD_RATE_LIMIT_BURST", "100000");
                if shared {
                    b = b
                        .env("UNKEY_METALD_DATABASE_URL", &url)
                        .env("UNKEY_METALD_FLEET_IPV6_PREFIX", "fd6d:7465:7300::/48")
                        .env("UNKEY_METALD_FLEET_IPV4_SUBNET", "10.213.0.0/16");
                }
                let mut m = b
                    .env("UNKEY_METALD_HOST_ID", id)
                    .env("UNKEY_METALD_HOST_LABELS", &format!("name={id}"))
                    .env(
                        "UNKEY_METALD_HOST_LEASE_SECONDS",
                        &lease_seconds.to_string(),
                    )
                    .env(
                        "UNKEY_METALD_ADVERTISE_URL",
                        &format!("https://{addr}:{FLEET_PORT}"),
                    )
                    .env("UNKEY_METALD_ADDRESS", "0.0.0.0")
                    .env("UNKEY_METALD_AUTH_MODE", "mtls")
                    .env("UNKEY_METALD_AUTH_TRUSTED_SERVICES", &trusted)
                    .env(
                        "UNKEY_METALD_TLS_CERT_FILE",
                        &pair.cert.display().to_string(),
                    )
                    .env("UNKEY_METALD_TLS_KEY_FILE", &pair.key.display().to_string())
                    .env(
                        "UNKEY_METALD_TLS_CLIENT_CA_FILE",
                        &pki.ca_file().display().to_string(),
                    )
                    .prepare(|m| m.import_default_guest(&guest));
                let netns = &m.iso.as_ref().expect("isolated").netns;
                assert_eq!(fabric.join(netns), addr);
                m.fixed_port = Some(FLEET_PORT);
                m.spawn();
                FleetHost { m, id: id.clone() }
            })
            .collect();
        let cp = ControlPlane::new(&pki.ca_file(), &cp_pair);
        Self {
            hosts,
            cp,
            pg,
            fabric,
            pki,
        }
    }
}

fn spiffe_of(host: &str) -> String {
    format!("spiffe://fleet.test/metald/{host}")
}

/// One answer: HTTP status and JSON body.
#[derive(Debug)]
pub struct Reply {
    /// HTTP status (0: no answer).
    pub status: u16,
    /// JSON body.
    pub body: Value,
}

/// A trusted service with its client certificate, acting for the customer each call names.
pub struct ControlPlane {
    rt: tokio::runtime::Runtime,
    client: ::reqwest::Client,
}

impl ControlPlane {
    /// A client trusting `ca` and presenting `pair`.
    pub fn new(ca: &std::path::Path, pair: &Pair) -> Self {
        let mut pem = std::fs::read(&pair.cert).unwrap();
        pem.extend(std::fs::read(&pair.key).unwrap());
        let client = ::reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                ::reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap(),
            )
            .identity(::reqwest::Identity::from_pem(&pem).unwrap())
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        Self { rt, client }
    }

    /// `method path` with `body` on `host`, as `customer`.
    pub fn call(
        &self,
        host: &FleetHost,
        customer: &str,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Reply {
        let url = format!("{}{path}", host.m.url.replace("http://", "https://"));
        let mut req = self
            .client
            .request(method.parse().unwrap(), url)
            .header("metald-customer", customer);
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        self.rt.block_on(async {
            match req.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let text = r.text().await.unwrap_or_default();
                    Reply {
                        status,
                        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
                    }
                }
                Err(e) => Reply {
                    status: 0,
                    body: Value::String(e.to_string()),
                },
            }
        })
    }

    /// GetFleet through `via`.
    pub fn fleet(&self, via: &FleetHost) -> Value {
        let r = self.call(via, "ops", "GET", "/v1/fleet", None);
        assert_eq!(r.status, 200, "{r:?}");
        r.body
    }

    /// Each host's VM count, as `via` reports the fleet.
    pub fn vm_counts(&self, via: &FleetHost) -> Vec<u64> {
        self.fleet(via)["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["vmCount"].as_str().unwrap_or("0").parse().unwrap())
            .collect()
    }

    /// Creates a VM of `customer` through `via`: its id.
    pub fn create(&self, via: &FleetHost, customer: &str) -> Reply {
        self.call(via, customer, "POST", "/v1/vms", Some(&fleet_vm_body()))
    }

    /// Deletes `ids` of `customer`, each through another host than the last.
    pub fn delete_all(&self, hosts: &[FleetHost], customer: &str, ids: &[String]) {
        for (i, id) in ids.iter().enumerate() {
            let r = self.call(
                &hosts[i % hosts.len()],
                customer,
                "DELETE",
                &format!("/v1/vms/{id}"),
                None,
            );
            assert_eq!(r.status, 200, "{r:?}");
        }
    }
}

/// The status `fleet` (a GetFleet answer) gives `host`.
pub fn status_of<'a>(fleet: &'a Value, host: &str) -> &'a str {
    fleet["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["hostId"] == host)
        .and_then(|h| h["status"].as_str())
        .unwrap_or("missing")
}

/// A one-vCPU VM of the default guest.
pub fn fleet_vm_body() -> Value {
    json!({"config": {"cpu": {"vcpu_count": 1}, "memory": {"size_bytes": 256u64 << 20},
        "kernel": {"image_id": KERNEL_ID}, "rootfs": {"image_id": ROOTFS_ID}}})
}
